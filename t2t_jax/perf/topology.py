"""TPU slices and GPU hosts without the hardware: a topology's devices for the compiler (the
chips' data sheets are `t2t_jax.runtime.chips`).

`devices(parse("v5e:16x16", num_slices=2))` returns the 512 devices of two v5e-256 slices as
JAX's ahead-of-time compiler sees them (`jax.experimental.topologies`, through libtpu), so a
mesh over them compiles the real TPU program on any machine. Names are either a topology
(`v5e:4x4`, `v5p:4x4x4`, `v4:2x2x1`) or an accelerator type as Cloud TPU sells it (`v5e-16`,
`v5p-128`, `v4-8`: TensorCores for v4 and v5p, chips for v5e and v6e).

GPUs work the same way through JAX's CUDA plugin, which compiles for a GPU it is only described
(XLA's `GpuTargetConfigProto`, written here from `GpuSpec`): `h100` is one H100, `h100:8` one
host of eight, and `num_slices` counts hosts (joined by InfiniBand, as DCN joins TPU slices).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax

from t2t_jax.runtime import accelerator_probe
from t2t_jax.runtime.chips import CHIPS, GPUS, Chip

_FORMS = ("GEN:AxB (v5e, v6e), GEN:AxBxC (v4, v5p) or GEN-N (v5e-16, v5p-128, v4-8) for TPUs; "
          "GPU or GPU:N (N per host) for GPUs")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice's chip generation and shape (chips along each torus dimension)."""

    chip: Chip
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def slices_name(self) -> str:
        """What a slice is on this platform: TPU slices, or GPU hosts."""
        return "slices" if self.chip.gpu is None else "hosts"

    @property
    def chips(self) -> int:
        """Chips in all slices."""
        return math.prod(self.shape) * self.num_slices

    def wraparound(self) -> tuple[bool, bool, bool]:
        """Which dimensions close into a torus: full 4x4x4 cubes for v4/v5p, 16-chip rows for
        v5e/v6e (smaller slices are meshes)."""
        dims = (*self.shape, 1, 1)[:3]
        if self.chip.torus_dims == 3:
            cube = all(d % 4 == 0 for d in dims)
            return (cube, cube, cube)
        return tuple(d == 16 for d in dims[:2]) + (False,)


def parse(name: str, num_slices: int = 1) -> Topology:
    """`Topology` from a topology or accelerator-type name; a clear error for others."""
    if num_slices < 1:
        raise ValueError(f"--num_slices must be at least 1, got {num_slices}")
    gpu = re.fullmatch(r"([a-z]\d{3}):?(\d*)", name)
    if gpu and gpu.group(1) in GPUS:
        count = int(gpu.group(2) or 1)
        if not 1 <= count <= 8:
            raise ValueError(f"GPU topology {name!r}: a host holds 1 to 8 GPUs, e.g. "
                             f"{gpu.group(1)}:8; --num_slices N gives N hosts")
        return Topology(GPUS[gpu.group(1)], (count,), num_slices)
    match = re.fullmatch(r"(v\d[a-z]?):(\d+(?:x\d+){1,2})|(v\d[a-z]?|v5litepod)-(\d+)", name)
    generation = (match.group(1) or match.group(3)) if match else None
    generation = "v5e" if generation == "v5litepod" else generation
    if generation not in CHIPS:
        raise ValueError(
            f"unknown topology {name!r}; name one as {_FORMS}, with GEN one of "
            f"{', '.join(CHIPS)} and GPU one of {', '.join(GPUS)}"
        )
    chip = CHIPS[generation]
    if match.group(2):
        shape = tuple(int(d) for d in match.group(2).split("x"))
    else:
        shape = _standard_shape(chip, int(match.group(4)), name)
    if len(shape) != chip.torus_dims or min(shape) < 1:
        raise ValueError(
            f"TPU topology {name!r}: {chip.name} slices have {chip.torus_dims} dimensions, "
            f"e.g. {chip.name}:{'x'.join(['4'] * chip.torus_dims)}"
        )
    return Topology(chip, shape, num_slices)


def _standard_shape(chip: Chip, count: int, name: str) -> tuple[int, ...]:
    """The shape Cloud TPU gives an accelerator type: v5e-16 -> 4x4, v5p-128 -> 4x4x4."""
    chips, remainder = divmod(count, chip.cores_per_chip)
    if remainder or chips < 1 or chips & (chips - 1):
        raise ValueError(
            f"unknown TPU topology {name!r}: the number counts "
            f"{'TensorCores (2 a chip)' if chip.cores_per_chip == 2 else 'chips'} and must "
            f"be a power of two; or name the shape, e.g. {chip.name}:4x4"
        )
    exponent = chips.bit_length() - 1
    if chip.torus_dims == 2:
        return (2 ** (exponent // 2), 2 ** (exponent - exponent // 2))
    if exponent < 3:  # 1, 2 or 4 chips: one host's 2x2x1 at most
        return tuple(2 ** e for e in ((0, 0, 0), (0, 1, 0), (1, 1, 0))[exponent])
    base, extra = divmod(exponent, 3)
    return tuple(2 ** (base + (i >= 3 - extra)) for i in range(3))


def host_slice(topology: Topology) -> Topology:
    """The slice one host's chips form on their own (2x2 for v5e, 2x2x1 for v4 and v5p; a GPU
    host's GPUs)."""
    if topology.chip.gpu is not None:
        return Topology(topology.chip, topology.shape)
    return Topology(topology.chip, tuple(min(2, d) if i < 2 else 1
                                         for i, d in enumerate(topology.shape)))


def require_libtpu() -> None:
    """A clear error when the TPU compiler (libtpu) is not installed."""
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            f"compiling for a TPU topology needs libtpu, the TPU compiler: pip install "
            f"'jax[tpu]=={jax.__version__}' (or pip install -e '.[tpu]'); it runs on any "
            "machine, no TPU needed"
        )


def require_cuda_plugin() -> None:
    """A clear error when JAX's CUDA plugin (the GPU compiler) is not installed."""
    if not accelerator_probe.cuda_plugin_installed():
        raise ValueError(
            f"compiling for a GPU needs JAX's CUDA plugin: pip install "
            f"'jax[cuda12]=={jax.__version__}' (or pip install -e '.[gpu]'); it runs on any "
            "Linux machine, no GPU needed"
        )


def gpu_target_config(chip: Chip) -> str:
    """The GPU described as XLA's `GpuTargetConfigProto` (text format), what its compiler takes
    in place of a device it can query."""
    spec = chip.gpu
    major, minor = spec.compute_capability
    return "\n".join([
        "gpu_device_info {",
        "  threads_per_block_limit: 1024",
        "  threads_per_warp: 32",
        "  shared_memory_per_block: 49152",
        f"  shared_memory_per_core: {spec.shared_memory_per_sm}",
        "  threads_per_core_limit: 2048",
        f"  core_count: {spec.sm_count}",
        f"  fpus_per_core: {spec.fp32_cores_per_sm}",
        "  block_dim_limit_x: 2147483647",
        "  block_dim_limit_y: 65535",
        "  block_dim_limit_z: 65535",
        f"  memory_bandwidth: {int(chip.hbm_bandwidth)}",
        f"  l2_cache_size: {spec.l2_bytes}",
        f"  clock_rate_ghz: {spec.clock_ghz}",
        f"  device_memory_size: {chip.hbm_bytes}",
        f"  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}",
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
        "  registers_per_core_limit: 65536",
        "  registers_per_block_limit: 65536",
        "}",
        'platform_name: "CUDA"',
        f'device_description_str: "{chip.device_kind}"',
    ])


def usable_memory(chip: Chip) -> int:
    """Bytes a program may use on one chip: all of a TPU's HBM; on a GPU, the share JAX's client
    takes for itself at start (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set)."""
    if chip.gpu is None:
        return chip.hbm_bytes
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    return int(chip.hbm_bytes * fraction)


def devices(topology: Topology) -> list:
    """The topology's devices (all slices), for meshes and ahead-of-time compilation only."""
    from jax.experimental import topologies

    if topology.chip.gpu is not None:
        require_cuda_plugin()
        description = topologies.get_topology_desc(
            topology.name, "cuda", target_config=gpu_target_config(topology.chip),
            # partitions x hosts x GPUs per host: each host a process, as JAX runs GPU hosts
            topology=f"1x{topology.num_slices}x{topology.shape[0]}",
        )
        return list(description.devices)
    require_libtpu()

    chips_per_host = (*host_slice(topology).shape, 1, 1)[:2] + (1,)
    description = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{topology.chip.compiler_name}:{'x'.join(map(str, topology.shape))}",
        chip_config_name=topology.chip.chip_config,
        chips_per_host_bounds=chips_per_host,
        num_slices=topology.num_slices,
        wrap=topology.wraparound(),
    )
    return list(description.devices)
