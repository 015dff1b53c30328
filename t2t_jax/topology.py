"""TPU slices and GPU hosts without the hardware: the chips' data sheets, and a topology's
devices for the compiler.

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

from t2t_jax import accelerator_probe

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """What XLA's GPU compiler needs to know of a GPU it does not see (NVIDIA's data sheets and
    CUDA's device properties)."""

    compute_capability: tuple[int, int]
    sm_count: int
    fp32_cores_per_sm: int
    clock_ghz: float  # boost
    l2_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation (Cloud TPU's published specifications) or GPU (NVIDIA's), per chip."""

    name: str  # "v5e"
    compiler_name: str  # the generation as libtpu's topology names spell it ("v5" for v5p)
    device_kind: str  # as `jax.Device.device_kind` reports it
    chip_config: str  # "megacore": the chip's two TensorCores are one JAX device
    torus_dims: int  # 2 (v5e, v6e) or 3 (v4, v5p)
    cores_per_chip: int  # what the accelerator type's number counts per chip
    hbm_bytes: int
    peak_flops: float  # dense bfloat16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_link_bandwidth: float  # bytes/s, one direction, one link (a GPU's NVLink: all links)
    dcn_bandwidth: float  # bytes/s per chip, between slices
    gpu: GpuSpec | None = None  # set for GPUs, whose other TPU fields are unused

    @property
    def platform(self) -> str:
        return "tpu" if self.gpu is None else "gpu"

    @property
    def ici_bandwidth(self) -> float:
        """Bytes/s one chip sends within its slice in a ring collective: two ICI links on a
        TPU torus; a GPU's NVLink bandwidth (one direction) through the host's NVSwitch."""
        return self.ici_link_bandwidth * (2 if self.gpu is None else 1)


# v5e, v5p, v6e: docs.cloud.google.com/tpu/docs/<generation> (ICI per link = the chip's
# bidirectional ICI bandwidth / ports / 2; DCN per chip from the pod's or host's figure).
# v4: the same page gives no ICI or DCN figure: 45 GB/s a link is the v4 paper's, and DCN is
# taken as v5e's (25 Gb/s a chip).
CHIPS = {
    "v4": Chip("v4", "v4", "TPU v4", "megacore", 3, 2, 32 * GIB, 275e12, 1.2e12, 45e9, 3.125e9),
    "v5e": Chip("v5e", "v5e", "TPU v5 lite", "default", 2, 1, 16 * GIB, 197e12, 8.19e11, 50e9,
                3.125e9),
    "v5p": Chip("v5p", "v5", "TPU v5", "megacore", 3, 2, 95 * GIB, 459e12, 2.765e12, 100e9,
                6.25e9),
    "v6e": Chip("v6e", "v6e", "TPU v6 lite", "default", 2, 1, 32 * GIB, 918e12, 1.638e12, 100e9,
                12.5e9),
}

# GPUs, SXM parts: bf16 dense peak, HBM and L2 from NVIDIA's data sheets; memory as CUDA
# reports it; NVLink per direction (half the bidirectional figure); the host network as one
# InfiniBand NIC per GPU (400 Gb/s NDR on H100/H200 systems, 200 Gb/s HDR on A100's).
GPUS = {
    "h100": Chip("h100", "cuda", "NVIDIA H100 80GB HBM3", "", 0, 1, 84_942_979_072, 989e12,
                 3.35e12, 450e9, 50e9,
                 GpuSpec((9, 0), 132, 128, 1.98, 50 * 2**20, 233_472, 232_448)),
    "h200": Chip("h200", "cuda", "NVIDIA H200", "", 0, 1, 150_754_820_096, 989e12, 4.8e12,
                 450e9, 50e9,
                 GpuSpec((9, 0), 132, 128, 1.98, 50 * 2**20, 233_472, 232_448)),
    "a100": Chip("a100", "cuda", "NVIDIA A100-SXM4-80GB", "", 0, 1, 85_899_345_920, 312e12,
                 2.039e12, 300e9, 25e9,
                 GpuSpec((8, 0), 108, 64, 1.41, 40 * 2**20, 167_936, 166_912)),
}

# What one accelerator's train step of the paper's base model consumes, in tokens/s (source plus
# target, not padding), for `t2t-jax bench-input --accelerator`: a measurement where we have one,
# else the data sheet's bf16 peak at 40% MFU over the base model's 434.5 MFLOP a target token
# (t2t_jax/bench.py's formula at length 512, source as long as target; tests check the sums).
BASE_TRAIN_FLOPS_PER_TARGET_TOKEN = 434.5e6
MFU_FOR_DEMAND = 0.40


@dataclasses.dataclass(frozen=True)
class InputDemand:
    tokens_per_s: float
    source: str


INPUT_DEMAND = {
    "h200": InputDemand(2 * 657_662, "measured: base, bf16, length 512, 657,662 target tokens/s "
                        "(docs/benchmarks.md, H200), x2 for the source side"),
    "h100": InputDemand(2 * 989e12 * MFU_FOR_DEMAND / BASE_TRAIN_FLOPS_PER_TARGET_TOKEN,
                        "data sheet: 989 TFLOP/s bf16 at 40% MFU, base model, x2 for the "
                        "source side"),
    "v5e": InputDemand(2 * 197e12 * MFU_FOR_DEMAND / BASE_TRAIN_FLOPS_PER_TARGET_TOKEN,
                       "data sheet: 197 TFLOP/s bf16 at 40% MFU, base model, x2 for the source "
                       "side (one chip; a host has 4 or 8)"),
}

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


def chip_of(device_kind: str) -> Chip | None:
    """The `Chip` whose `device_kind` this is (e.g. of a real TPU's devices), if any."""
    for chip in (*CHIPS.values(), *GPUS.values()):
        if chip.device_kind.lower() == device_kind.lower():
            return chip
    return None
