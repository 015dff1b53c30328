"""Many processes, one program: starting JAX's multi-process runtime and checking the hosts agree.

`t2t-jax train` calls `initialize` before anything touches the devices. It starts
`jax.distributed` when the run has several processes: explicit flags or `JAX_COORDINATOR_ADDRESS`,
or a cluster that JAX recognises and that reports several tasks (SLURM, Open MPI, a multi-host
Cloud TPU or GKE TPU slice); `--distributed=on` always starts it (e.g. a TPU pod whose workers
learn their peers from the metadata server), `--distributed=off` never does.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import numpy as np

import t2t_jax
from t2t_jax import files

T = TypeVar("T")

# Environment variables that say this process is one of several, and where the count is.
_CLUSTER_TASK_COUNTS = (
    "SLURM_NTASKS",  # SLURM: srun tasks
    "OMPI_COMM_WORLD_SIZE",  # Open MPI: mpirun ranks
    "MEGASCALE_NUM_SLICES",  # TPU multislice
)


def requested(
    mode: str, coordinator_address: str | None, environ: Mapping[str, str] = os.environ
) -> bool:
    """Whether this process should start `jax.distributed` (`mode` auto, on or off)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--distributed must be auto, on or off, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if any(int(environ.get(name, "1") or 1) > 1 for name in _CLUSTER_TASK_COUNTS):
        return True
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")  # multi-host TPU VMs and GKE TPU slices
    return "," in hosts


def initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> bool:
    """Starts `jax.distributed` if `requested` (what is None JAX finds in the cluster's
    environment), then checks that every process runs the same versions. Returns whether it
    started. A coordinator that does not answer within `timeout_s` is a clear error, not a hang."""
    if not requested(mode, coordinator_address):
        return False
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address and process_id:  # process 0 starts the coordinator; the others must reach it
        wait_for_coordinator(address, timeout_s)
    # JAX aborts the process (it cannot be caught) if the others do not join in time: say first
    # what it waits for, so that the abort has its explanation in the log above it.
    print(
        f"t2t-jax: joining {num_processes or 'the cluster'}'s processes at "
        f"{address or 'the address the cluster names'} (--init_timeout {timeout_s}s; an abort "
        "with DEADLINE_EXCEEDED means a process did not start or could not reach it)",
        file=sys.stderr, flush=True,
    )
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
        )
    except Exception as error:  # JAX raises RuntimeError, ValueError or XlaRuntimeError
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"jax.distributed.initialize failed within {timeout_s}s ({type(error).__name__}: "
            f"{first_line[:300]}); start every process with the same --coordinator_address "
            "(host:port of process 0, reachable from all hosts) and --num_processes, each with "
            "its own --process_id, or raise --init_timeout"
        ) from error
    check_same_versions()
    return True


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once `address` (host:port) accepts connections; a clear error after `timeout_s`."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"no coordinator answered at {address} within {timeout_s}s ({error}); "
                    "start process 0 with the same --coordinator_address, check that the port "
                    "is open between hosts, or raise --init_timeout"
                ) from error
            time.sleep(0.5)


def versions() -> str:
    """The versions that must match on every host."""
    import jaxlib

    return f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, t2t_jax {t2t_jax.__version__}"


def check_same_versions(width: int = 128) -> None:
    """Raises naming each process's versions unless all processes run the same ones."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.frombuffer(versions().encode()[:width].ljust(width), np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, width)
    seen = [bytes(row).decode().strip() for row in rows]
    if len(set(seen)) > 1:
        listed = "; ".join(f"process {i}: {v}" for i, v in enumerate(seen))
        raise ValueError(
            f"hosts run different versions ({listed}); install the same jax, jaxlib and t2t_jax "
            "on every host"
        )


def log_to_file(directory: str) -> str:
    """Adds DIRECTORY/host_<process index>.log, at INFO, to Python's logging; returns its path.
    Every host keeps its own, so a failure on one host can be read after the run."""
    files.makedirs(directory)
    name = f"host_{jax.process_index()}"
    if "://" in directory:  # object stores cannot append: one file per start
        name += time.strftime("_%Y%m%d_%H%M%S")
    path = os.path.join(directory, name + ".log")
    handler = logging.StreamHandler(files.open_file(path, "a" if "://" not in path else "w"))
    handler.setLevel(logging.INFO)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [process %(process)d] %(message)s")
    )
    root = logging.getLogger()
    if root.getEffectiveLevel() > logging.INFO:
        # The file gets INFO; the terminal keeps what it showed before.
        for existing in root.handlers:
            existing.setLevel(max(existing.level, root.getEffectiveLevel()))
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    logging.info(
        "process %d of %d, %d local devices of %d (%s)", jax.process_index(),
        jax.process_count(), jax.local_device_count(), jax.device_count(), versions(),
    )
    return path


def process_0_first(make: Callable[[], T], barrier: str) -> T:
    """`make()`, run by process 0 before the others (a barrier named `barrier` between), so
    that processes sharing a disk do not write the same files at once and the others find
    process 0's; on disks of their own, each makes its own copy. Returns this process's."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            make()
        multihost_utils.sync_global_devices(barrier)
    return make()


class PreemptionWatch:
    """Says when to stop for a preemption notice (SIGTERM), at a step every process agrees on.

    One process: a SIGTERM handler sets a flag. Several: JAX's coordination service, which
    catches the signal on any host and picks a sync step all reach
    (`multihost_utils.reached_preemption_sync_point`), so that every process saves that step.
    """

    def __init__(self):
        self._multiprocess = jax.process_count() > 1
        self._notified = False
        self._previous = None
        if not self._multiprocess:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._notify)
            except ValueError:  # not the main thread: signals cannot be caught here
                logging.warning("not on the main thread: a SIGTERM will not save a checkpoint")

    def _notify(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self._notified = True

    def reached(self, step: int) -> bool:
        if self._multiprocess:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._notified

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
