"""The command line's restart with glibc's huge-page tunable (t2t_jax/runtime/host_allocator.py)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from t2t_jax.runtime import accelerator_probe, host_allocator
from t2t_jax.runtime.host_allocator import HUGE_PAGES_TUNABLE, huge_pages_environment

GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize(
    "environ,thp_mode,libc,expected",
    [
        ({}, "madvise", GLIBC, HUGE_PAGES_TUNABLE),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC,
         "glibc.malloc.arena_max=2:" + HUGE_PAGES_TUNABLE),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, None),  # the user's
        ({host_allocator.RESTARTED_MARKER: "1"}, "madvise", GLIBC, None),  # tunables dropped
        ({}, "always", GLIBC, None),  # huge pages already
        ({}, "never", GLIBC, None),
        ({}, None, GLIBC, None),  # no transparent huge pages in this kernel
        ({}, "madvise", ("glibc", "2.31"), None),  # before the tunable existed
        ({}, "madvise", ("", ""), None),  # another C library
    ],
)
def test_restarts_only_where_the_tunable_helps_and_the_user_has_not_chosen(
    environ, thp_mode, libc, expected
):
    env = huge_pages_environment({"PATH": "/bin", **environ}, thp_mode, libc)
    if expected is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == expected and env["PATH"] == "/bin"
        assert env[host_allocator.RESTARTED_MARKER] == "1"


def test_mode_is_read_from_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_allocator.transparent_huge_pages_mode(str(path)) == "madvise"
    assert host_allocator.transparent_huge_pages_mode(str(tmp_path / "missing")) is None


DEFRAG_FILE = "/sys/kernel/mm/transparent_hugepage/defrag"


@pytest.mark.skipif(
    host_allocator.transparent_huge_pages_mode() != "madvise"
    # where the kernel compacts memory for the regions that ask, so that huge pages are there
    or host_allocator.transparent_huge_pages_mode(DEFRAG_FILE) not in (
        "always", "madvise", "defer+madvise")
    or not host_allocator._glibc_supports_hugetlb(platform.libc_ver())
    or accelerator_probe.tpu_chips_present() or accelerator_probe.nvidia_gpus_present(),
    reason="needs Linux with glibc >= 2.35, transparent huge pages on madvise, no accelerator",
)
def test_restart_keeps_the_process_and_backs_large_buffers_with_huge_pages():
    script = textwrap.dedent("""
        import os, sys
        print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
        from t2t_jax.runtime import accelerator_probe, host_allocator
        host_allocator.restart_with_huge_pages()
        import ctypes
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        buffer = libc.malloc(64 << 20)  # as XLA's temporaries are (numpy asks for huge pages
        ctypes.memset(buffer, 1, 64 << 20)  # itself, so it would show nothing)
        with open("/proc/self/smaps_rollup") as f:
            huge = [int(line.split()[1]) for line in f if line.startswith("AnonHugePages")]
        print("huge_kib", huge[0], flush=True)
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", host_allocator.RESTARTED_MARKER)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=60, check=True)
    lines = result.stdout.split("\n")
    starts = [line.split(" ", 2) for line in lines if line.startswith("start")]
    assert len(starts) == 2 and starts[0][1] == starts[1][1]  # the same process, run twice
    assert starts[0][2] == "" and starts[1][2] == HUGE_PAGES_TUNABLE
    huge_kib = int(next(line for line in lines if line.startswith("huge_kib")).split()[1])
    assert huge_kib >= 2 << 10  # 2 MiB pages (none without the tunable)
