"""The accelerators' data sheets, in one table: TPU generations and NVIDIA GPUs, each chip's
memory, bf16 peak, bandwidths and what XLA's GPU compiler needs to know of it; and what one
chip's train step of the base model consumes of the input. The kernels' choice, MFU in `bench`,
the compiler's estimates in `compile` and `bench-input --accelerator` all read them here.
"""

from __future__ import annotations

import dataclasses

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
# (t2t_jax/perf/bench.py's formula at length 512, source as long as target; tests check the sums).
BASE_TRAIN_FLOPS_PER_TARGET_TOKEN = 434.5e6
MFU_FOR_DEMAND = 0.40


@dataclasses.dataclass(frozen=True)
class InputDemand:
    tokens_per_s: float
    source: str


def _demand_at_mfu(chip: Chip) -> float:
    """Source plus target tokens/s of the base model's train step at MFU_FOR_DEMAND."""
    return 2 * chip.peak_flops * MFU_FOR_DEMAND / BASE_TRAIN_FLOPS_PER_TARGET_TOKEN


INPUT_DEMAND = {
    "h200": InputDemand(2 * 657_662, "measured: base, bf16, length 512, 657,662 target tokens/s "
                        "(docs/benchmarks.md, H200), x2 for the source side"),
    "h100": InputDemand(_demand_at_mfu(GPUS["h100"]),
                        "data sheet: 989 TFLOP/s bf16 at 40% MFU, base model, x2 for the "
                        "source side"),
    "v5e": InputDemand(_demand_at_mfu(CHIPS["v5e"]),
                       "data sheet: 197 TFLOP/s bf16 at 40% MFU, base model, x2 for the source "
                       "side (one chip; a host has 4 or 8)"),
}


def chip_of(device_kind: str) -> Chip | None:
    """The `Chip` whose `device_kind` this is (e.g. of a real TPU's devices), if any."""
    for chip in (*CHIPS.values(), *GPUS.values()):
        if chip.device_kind.lower() == device_kind.lower():
            return chip
    return None


def peak_flops_of(device_kind: str) -> float | None:
    """A device's dense bf16 peak FLOP/s from the table: its chip's, or for a GPU variant the
    table does not name exactly (an "NVIDIA H100 PCIe"), the SXM part's of that name."""
    chip = chip_of(device_kind)
    if chip is not None:
        return chip.peak_flops
    for name, gpu in GPUS.items():
        if name in device_kind.lower():
            return gpu.peak_flops
    return None
