"""Keeps JAX's TPU and GPU compilers quiet on machines without a TPU or GPU.

With `libtpu` installed (the `tpu` and `test` extras: it is also what compiles for TPU
topologies ahead of time), every JAX start probes for a TPU first. On a machine with none, the
probe falls back to the CPU or GPU, but only after printing errors ("Failed to find host
bounds", "unexpected worker hostname") because the TPU metadata it looks for is absent. Naming
a worker and an accelerator type for it, as a one-host TPU VM's metadata would, lets the probe
fail quietly. Real TPU hosts (chips on the PCI bus) and anything the user set are left alone.
Without chips, libtpu only compiles, so several processes may also load it at once (test
workers, or a compile beside another).

JAX's CUDA plugin (the `gpu` and `test` extras: it compiles for GPUs described rather than
present) checks the CUDA and cuDNN libraries' versions when it loads, and without a GPU or its
libraries that check fails: JAX prints a traceback and drops the plugin, and with it the GPU
compiler. Where no NVIDIA GPU is on the bus, the check is skipped instead (what JAX's
JAX_SKIP_CUDA_CONSTRAINTS_CHECK does); a machine with a GPU keeps it.
"""

from __future__ import annotations

import glob
import importlib.util
import os

# Google's PCI vendor id and the device ids of TPU chips (v3 to TPU7x), as JAX's hardware_utils
# lists them.
_GOOGLE_VENDOR = "0x1ae0"
_TPU_DEVICE_IDS = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
_NVIDIA_VENDOR = "0x10de"
_DISPLAY_CLASS = "0x03"  # VGA and 3D controllers; NVIDIA's NVSwitch bridges are 0x0680


def _pci_devices(vendor_id: str) -> list[dict[str, str]]:
    """The `device` and `class` ids of the PCI devices of one vendor on this machine."""
    found = []
    for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        folder = os.path.dirname(vendor_path)
        try:
            with open(vendor_path) as vendor:
                if vendor.read().strip() != vendor_id:
                    continue
            ids = {}
            for field in ("device", "class"):
                with open(os.path.join(folder, field)) as value:
                    ids[field] = value.read().strip()
        except OSError:
            continue
        found.append(ids)
    return found


def tpu_chips_present() -> bool:
    """Whether a TPU chip sits on this machine's PCI bus."""
    return any(d["device"] in _TPU_DEVICE_IDS for d in _pci_devices(_GOOGLE_VENDOR))


# Where NVIDIA's driver shows itself when the bus does not (containers, WSL2's /dev/dxg).
_DRIVER_PATHS = ("/proc/driver/nvidia/gpus", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")


def nvidia_gpus_present() -> bool:
    """Whether an NVIDIA GPU sits on this machine's PCI bus, or its driver is present."""
    return any(os.path.exists(path) for path in _DRIVER_PATHS) or any(
        d["class"].startswith(_DISPLAY_CLASS) for d in _pci_devices(_NVIDIA_VENDOR))


def quiet_without_accelerators() -> None:
    """`quiet_without_tpu` and `quiet_without_gpu`. Call before JAX starts its backends."""
    quiet_without_tpu()
    quiet_without_gpu()


def quiet_without_gpu() -> None:
    """Where JAX's CUDA plugin is installed and no NVIDIA GPU is present, lets the plugin load
    without its CUDA version check (it then only compiles), and unless the user named platforms
    or a TPU is present, names the CPU (JAX_PLATFORMS=cpu): JAX would otherwise try to start a
    CUDA client, fail, warn and fall back to the CPU anyway. The test suite, which installs the
    plugin, also saw rare aborts in native threads of processes that had made that attempt."""
    if nvidia_gpus_present() or not cuda_plugin_installed():
        return
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    if "JAX_PLATFORMS" not in os.environ and not tpu_chips_present():
        os.environ["JAX_PLATFORMS"] = "cpu"


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (CUDA 12 or 13) is installed; found without importing it."""
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def quiet_without_tpu() -> None:
    """Sets the TPU worker environment so that libtpu's start-up probe fails silently, where
    libtpu is installed, no TPU chip is present and the user set none of it; and lets several
    processes load libtpu at once (it locks /tmp/libtpu_lockfile otherwise), which without
    chips only compiles. Call before JAX starts its backends."""
    if importlib.util.find_spec("libtpu") is None or tpu_chips_present():
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if "TPU_ACCELERATOR_TYPE" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ:
        return
    os.environ["TPU_ACCELERATOR_TYPE"] = "v5litepod-1"
    os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"
