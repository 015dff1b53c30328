"""XLA flags this project's measurements chose; a flag the user sets in XLA_FLAGS wins.

On GPUs, cuBLAS for every matmul instead of XLA's Triton GEMMs: 10-11% more train tokens/s for
the base and big models on an H200 (docs/benchmarks.md). Other backends ignore GPU flags. The
command line adds them to XLA_FLAGS before JAX starts; `t2t-jax compile` also hands them to
each GPU compilation (`gpu_compiler_options`), so that a program compiled for a GPU from the
library is the one training would run.
"""

from __future__ import annotations

import os

DEFAULT_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def _name(flag: str) -> str:
    return flag.split("=")[0]


def with_default_xla_flags(current: str) -> str:
    """`current` XLA_FLAGS plus each of DEFAULT_XLA_FLAGS whose name it does not set."""
    names = {_name(flag) for flag in current.split()}
    extra = [flag for flag in DEFAULT_XLA_FLAGS if _name(flag) not in names]
    return " ".join([current.strip(), *extra]).strip()


def _value(text: str) -> bool | int | str:
    """A flag's value as `Lowered.compile` takes it: booleans and integers typed."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def gpu_compiler_options() -> dict[str, bool | int | str]:
    """DEFAULT_XLA_FLAGS that XLA_FLAGS does not set, as `Lowered.compile` options."""
    names = {_name(flag) for flag in os.environ.get("XLA_FLAGS", "").split()}
    return {_name(flag).lstrip("-"): _value(flag.split("=", 1)[1])
            for flag in DEFAULT_XLA_FLAGS if _name(flag) not in names}
