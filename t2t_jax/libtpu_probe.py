"""Keeps libtpu quiet on machines without a TPU.

With `libtpu` installed (the `tpu` and `test` extras: it is also what compiles for TPU
topologies ahead of time), every JAX start probes for a TPU first. On a machine with none, the
probe falls back to the CPU or GPU, but only after printing errors ("Failed to find host
bounds", "unexpected worker hostname") because the TPU metadata it looks for is absent. Naming
a worker and an accelerator type for it, as a one-host TPU VM's metadata would, lets the probe
fail quietly. Real TPU hosts (chips on the PCI bus) and anything the user set are left alone.
Without chips, libtpu only compiles, so several processes may also load it at once (test
workers, or a compile beside another).
"""

from __future__ import annotations

import glob
import importlib.util
import os

# Google's PCI vendor id and the device ids of TPU chips (v3 to TPU7x), as JAX's hardware_utils
# lists them.
_GOOGLE_VENDOR = "0x1ae0"
_TPU_DEVICE_IDS = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def tpu_chips_present() -> bool:
    """Whether a TPU chip sits on this machine's PCI bus."""
    for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_path) as vendor:
                if vendor.read().strip() != _GOOGLE_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor_path), "device")) as device:
                if device.read().strip() in _TPU_DEVICE_IDS:
                    return True
        except OSError:
            continue
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
