"""Each attention kernel against the float32 einsum reference, on this machine's device.

`t2t-jax check-attention` runs this: a kernel that compiles on one accelerator may still differ
from the paper's formula there (mask handling, precision), and its fallback may silently take
over. For each mask kind (self, causal, cross; padded rows, packed rows, and for cuDNN packed
rows as spans) it reports the largest error of the output and of the gradients against the
reference, on real positions only, and the custom calls in the compiled program, which show
whether the fused kernel (cuDNN's `__cudnn$fmha...`, Pallas' `tpu_custom_call`) really ran.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from t2t_jax.model import kernels
from t2t_jax.model.masks import AttentionMask

# (causal, cross) per case: cross attends from half as many queries.
CASES = {"self": (False, False), "causal": (True, False), "cross": (False, True)}
# Padded rows; packed rows (two examples a row); packed rows with a bound on the examples a row
# holds (model.max_segments_per_row), which only cuDNN treats differently: as spans.
ROWS = ("padded", "packed", "spans")


@dataclasses.dataclass
class KernelCheck:
    """One kernel on one mask kind."""

    implementation: str
    case: str
    rows: str  # one of ROWS
    dtype: str
    output_error: float  # max |kernel - reference| / max |reference|, real positions
    gradient_error: float  # the same over dq, dk, dv
    custom_calls: str  # custom-call targets in the compiled program, comma-separated
    fallback: str  # why the einsum path ran instead, "" when the kernel itself ran


def _mask(q_len: int, k_len: int, causal: bool, rows: str, batch: int) -> AttentionMask:
    """Row 0 full; the others lose a quarter of their tokens to padding; packed rows hold two
    examples split at the middle. Spans allow three examples a row, so every row has an empty
    slot, which cuDNN's packing of the span lists across rows must skip."""

    def tokens_and_segments(length: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.ones((batch, length), np.int32)
        tokens[1:, length - length // 4 :] = 0
        halves = np.where(np.arange(length) < length // 2, 1, 2)[None]
        return tokens, halves.repeat(batch, 0) * tokens

    q_tokens, q_segments = tokens_and_segments(q_len)
    k_tokens, k_segments = tokens_and_segments(k_len)
    if rows == "padded":
        q_segments = k_segments = None
    return AttentionMask.from_tokens(q_tokens, k_tokens, q_segments, k_segments, causal=causal,
                                     max_segments=3 if rows == "spans" else 0)


def _custom_calls(function, *args) -> str:
    text = jax.jit(function).lower(*args).compile().as_text()
    return ",".join(sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))))


def check_kernel(
    implementation: str,
    case: str,
    rows: str,
    dtype: str = "bfloat16",
    length: int = 256,
    batch: int = 2,
    heads: int = 4,
    depth: int = 64,
) -> KernelCheck:
    """Output and gradient errors of `implementation` against the float32 einsum reference."""
    causal, cross = CASES[case]
    q_len, k_len = (length // 2, length) if cross else (length, length)
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    mask = _mask(q_len, k_len, causal, rows, batch)
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = [(batch, q_len, heads, depth)] + 2 * [(batch, k_len, heads, depth)]
    qkv = [jax.random.normal(k, s).astype(dtype) for k, s in zip(keys[:3], shapes, strict=True)]
    cotangent = jax.random.normal(keys[3], shapes[0])
    real_queries = (mask.query_segments > 0)[:, :, None, None]
    real_keys = (mask.key_segments > 0)[:, :, None, None]
    kernel = kernels.KERNELS[implementation]

    def loss(function, q, k, v):
        out = function(q, k, v, mask).astype(jnp.float32)
        return jnp.sum(jnp.where(real_queries, out * cotangent, 0.0))

    def outputs(function, inputs):
        out = jax.jit(function)(*inputs, mask).astype(jnp.float32)
        grads = jax.jit(jax.grad(lambda *a: loss(function, *a), argnums=(0, 1, 2)))(*inputs)
        return out, [g.astype(jnp.float32) for g in grads]

    reference = outputs(kernels.xla_attention, [x.astype(jnp.float32) for x in qkv])
    result = outputs(kernel, qkv)

    def error(got, want, where):
        scale = float(jnp.max(jnp.abs(jnp.where(where, want, 0.0)))) or 1.0
        return float(jnp.max(jnp.abs(jnp.where(where, got - want, 0.0)))) / scale

    gradient_error = max(
        error(got, want, where)
        for got, want, where in zip(
            result[1], reference[1], (real_queries, real_keys, real_keys), strict=True
        )
    )
    return KernelCheck(
        implementation,
        case,
        rows,
        dtype,
        error(result[0], reference[0], real_queries),
        gradient_error,
        _custom_calls(lambda q, k, v: kernel(q, k, v, mask), *qkv),
        kernels.fallback_reason(
            implementation, qkv[0], qkv[1], mask, jax.devices()[0].platform
        ) or "",
    )


def check_kernels(
    implementations: list[str], dtype: str = "bfloat16", length: int = 256
) -> list[KernelCheck]:
    """`check_kernel` for every implementation, case and row layout (spans for cuDNN only)."""
    return [
        check_kernel(name, case, rows, dtype, length)
        for name in implementations
        for case in CASES
        for rows in ROWS
        if rows != "spans" or name == "cudnn"
    ]


def format_checks(checks: list[KernelCheck]) -> list[str]:
    """The terminal table."""
    lines = [
        f"{'implementation':>22} {'case':>7} {'rows':>7} {'dtype':>9} {'out err':>9} "
        f"{'grad err':>9}  custom calls / fallback"
    ]
    for c in checks:
        lines.append(
            f"{c.implementation:>22} {c.case:>7} {c.rows:>7} {c.dtype:>9} "
            f"{c.output_error:>9.2e} {c.gradient_error:>9.2e}  "
            f"{c.custom_calls or '-'}{'  fell back: ' + c.fallback if c.fallback else ''}"
        )
    return lines
