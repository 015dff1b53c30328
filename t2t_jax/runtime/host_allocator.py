"""Transparent huge pages for the host's large buffers, on Linux with glibc.

XLA's CPU runtime allocates each execution's temporaries with `posix_memalign`, from one of
glibc's per-thread arenas, which serve anything above 32 MiB with a fresh `mmap` and return it
with `munmap` when the execution ends. The base model's CPU train step needs 3.4 GiB of them,
so every step faulted in about 890,000 new 4 KiB pages: a sixth of the step. Where the
kernel backs only the memory that asks for them with huge pages (transparent_hugepage
"madvise", the default of most distributions), glibc's `glibc.malloc.hugetlb=1` tunable makes
malloc ask (`madvise(MADV_HUGEPAGE)`), and the faults become 512 times fewer. Tunables are read
when a process starts, so the command line re-executes itself once with it set.

A user's own `glibc.malloc.hugetlb` setting wins (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0`
turns this off). Hosts with a TPU or an NVIDIA GPU are left alone: their steps' temporaries
live on the accelerator, and huge pages would only round up the host's own buffers. Elsewhere
(other C libraries, glibc before 2.35, huge pages "always" or "never") nothing changes.
"""

from __future__ import annotations

import os
import platform
import sys

from t2t_jax.runtime import accelerator_probe

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# Set in the restarted process: the loop guard where the loader drops GLIBC_TUNABLES (it does
# for setuid or capability-raised interpreters).
RESTARTED_MARKER = "T2T_JAX_RESTARTED_FOR_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"), or None
    where it has none."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _glibc_supports_hugetlb(libc: tuple[str, str]) -> bool:
    name, version = libc
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return name == "glibc" and parts >= (2, 35)


def huge_pages_environment(
    environ: dict[str, str], thp_mode: str | None, libc: tuple[str, str]
) -> dict[str, str] | None:
    """The environment to restart with so that malloc asks for huge pages, or None where that
    would change nothing (see the module docstring)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if RESTARTED_MARKER in environ or "glibc.malloc.hugetlb=" in tunables:
        return None
    if thp_mode != "madvise":
        return None
    if not _glibc_supports_hugetlb(libc):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    env[RESTARTED_MARKER] = "1"
    return env


def restart_with_huge_pages() -> None:
    """Re-executes this process (same PID, arguments and interpreter options) with
    `glibc.malloc.hugetlb=1` where `huge_pages_environment` says it helps and no accelerator
    is present; returns where it does not. Only for a console entry point, first thing, before
    threads start: a REPL, a notebook or a script read from stdin would lose its state or
    input."""
    if not sys.platform.startswith("linux"):
        return
    if accelerator_probe.tpu_chips_present() or accelerator_probe.nvidia_gpus_present():
        return
    env = huge_pages_environment(dict(os.environ), transparent_huge_pages_mode(),
                                 platform.libc_ver())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # an interpreter that cannot be run again as it was: go on without
        return
