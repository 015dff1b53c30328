"""Train and eval batches from a prepared split: the gather of a block's tokens, the workers
that gather ahead of the step, the train input as an iterator with a position, eval batches,
and the config's layouts and planner.

Workers (processes, `data.input_workers`; with 0 a thread of this process) gather tokens from
the memory-mapped split (or the subword-sampling candidates the planner drew). Block k of this
host goes to worker k % workers and comes back in order, so the batches do not depend on the
number of workers either.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np

from t2t_jax.data import batching, prepared
from t2t_jax.data.batching import BlockSpec, EpochPlan, Layout, Position
from t2t_jax.data.planner import BlockRequest, Planner, PlanStore

SIDES = prepared.SIDES


class Gatherer:
    """Makes a block's arrays from its spec: each example's ids from the prepared split, or
    with subword sampling (`nbest`) the candidate segmentation the planner drew for it."""

    def __init__(self, split: prepared.Split, layout: Layout, nbest: int = 0):
        self.split, self.layout = split, layout
        self.candidates = prepared.Candidates(split, nbest) if nbest else None

    def __call__(self, spec: BlockSpec) -> dict[str, np.ndarray]:
        if spec.chosen is None:
            sources = {side: (self.split.ids(side), self.split.offsets(side)[spec.examples])
                       for side in SIDES}
        else:
            sources = {side: (self.candidates.ids(side),
                              self.candidates.offsets(side)[spec.chosen[:, i]])
                       for i, side in enumerate(SIDES)}
        return batching.gather(sources, spec.pieces, spec, self.layout)


def _worker_loop(connection: Any, split: prepared.Split, layout: Layout, nbest: int,
                 plans: str) -> None:
    """A worker process: gathers each block it is sent until it is sent None."""
    gatherer, store = Gatherer(split, layout, nbest), PlanStore(plans)
    with contextlib.suppress(EOFError, OSError):  # the training process closed its end: done
        while (request := connection.recv()) is not None:
            try:
                result = gatherer(request.spec(store.read))
            except Exception:  # to the training process, which raises it there
                result = _WorkerError(traceback.format_exc())
            connection.send(result)


@dataclasses.dataclass
class _WorkerError:
    traceback: str


class _Workers:
    """Worker processes, each with a pipe of its own: block k goes to worker k % count and
    comes back from it in order (no pool, no queue thread: a send and a receive a batch)."""

    def __init__(self, count: int, split: prepared.Split, layout: Layout, nbest: int,
                 plans: str):
        # spawn: the training process runs JAX's threads, which a fork would not carry.
        context = multiprocessing.get_context("spawn")
        self._connections, self._processes = [], []
        for _ in range(count):
            mine, theirs = context.Pipe()
            process = context.Process(target=_worker_loop, daemon=True,
                                      args=(theirs, split, layout, nbest, plans))
            process.start()
            theirs.close()
            self._connections.append(mine)
            self._processes.append(process)

    def send(self, worker: int, request: BlockRequest) -> None:
        self._connections[worker].send(request)

    def receive(self, worker: int) -> dict[str, np.ndarray]:
        try:
            result = self._connections[worker].recv()
        except (EOFError, OSError) as error:
            raise RuntimeError(
                f"input worker {worker} died ({type(error).__name__}); rerun, or set "
                "data.input_workers=0 to gather batches in the training process") from error
        if isinstance(result, _WorkerError):
            raise RuntimeError(f"input worker {worker} failed:\n{result.traceback}")
        return result

    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def close(self) -> None:
        """Stops the workers. A worker blocked sending a batch nobody will take (a batch is
        larger than a pipe's buffer) stops when its pipe closes, so none is waited out."""
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(None)
            connection.close()
        deadline = time.monotonic() + 5
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=1)

    def exitcodes(self) -> list[int | None]:
        return [process.exitcode for process in self._processes]


class TrainInput:
    """This host's blocks of the global train batches from `position` on, as numpy dicts,
    gathered ahead by `workers` processes (0: one thread of this process), `prefetch` blocks in
    flight. `position` is always that of the next batch `next` returns (a checkpoint saves
    that of the oldest batch taken but not yet trained on)."""

    def __init__(self, split: prepared.Split, planner: Planner, position: Position,
                 workers: int = 0, prefetch: int = 4):
        self.planner, self.position = planner, position
        self._next_to_plan = position
        self._in_flight: collections.deque = collections.deque()
        self._prefetch = max(prefetch, 2 * workers, 1)
        nbest = planner.sampling[0].nbest if planner.sampling else 0
        self._sent = 0
        if workers:
            store = planner.plan_in_a_process()
            self._workers = _Workers(workers, split, planner.layout, nbest, store.directory)
            self._executor = None
        else:
            self._workers = None
            self._executor = concurrent.futures.ThreadPoolExecutor(1, "t2t_jax_input")
            self._gatherer = Gatherer(split, planner.layout, nbest)
        self._fill()

    def _submit(self, request: BlockRequest) -> Any:
        """Starts gathering a block; returns what `_result` takes to wait for it."""
        if self._workers is None:
            # The spec is built here, in the thread that plans: the other only copies tokens.
            return self._executor.submit(self._gatherer, request.spec(self.planner.plan))
        worker = self._sent % len(self._workers.pids())
        self._workers.send(worker, request)
        self._sent += 1
        return worker

    def _result(self, pending: Any) -> dict[str, np.ndarray]:
        if self._workers is None:
            return pending.result()
        return self._workers.receive(pending)

    def _fill(self) -> None:
        while len(self._in_flight) < self._prefetch:
            request, after = self.planner.request_at(self._next_to_plan)
            self._in_flight.append((self._next_to_plan, self._submit(request)))
            self._next_to_plan = after

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        _, pending = self._in_flight.popleft()
        batch = self._result(pending)
        self._fill()
        self.position = self._in_flight[0][0]
        self.planner.forget_before(self.position.epoch)
        return batch

    def close(self) -> None:
        if self._workers is None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        else:
            self._workers.close()
        self.planner.close()

    def process_ids(self) -> list[int]:
        """This process's id and its input processes' (workers and planner), for measuring
        the CPU time the input takes."""
        workers = self._workers.pids() if self._workers else []
        return [os.getpid(), *workers, *getattr(self.planner._background, "_processes", {})]


def eval_batches(split: prepared.Split, layout: Layout, batch_size: int,
                 block: tuple[int, int] = (0, 1), max_batches: int = -1
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Block `block[0]` of `block[1]` of each padded batch of one pass over a split in its
    order (never packed; overlong examples dropped); the last batch is filled with all-padding
    rows, so that every batch has the same shape and every host runs the same steps."""
    layout = Layout(layout.lengths, layout.decoder_only)
    lengths = tuple(split.lengths(side) for side in SIDES)
    kept = layout.kept(*lengths)
    pieces = layout.pieces(*lengths)
    index, count = block
    if batch_size % count:
        raise ValueError(f"data.eval_batch_size={batch_size} must be divisible by the {count} "
                         "processes")
    share = batch_size // count
    plan = EpochPlan(kept, np.arange(len(kept) + 1), pieces)
    gatherer = Gatherer(split, layout)
    for number, first in enumerate(range(0, len(kept), batch_size)):
        if number == max_batches:
            return
        mine = (min(first + index * share, len(kept)), min(first + (index + 1) * share, len(kept)))
        segments = [(0, *mine)] if mine[1] > mine[0] else []
        yield gatherer(batching.block_spec(lambda _: plan, segments, share,
                                           layout.feature_lengths))


def train_layout(config: Any) -> Layout:
    """The layout of the config's train batches."""
    from t2t_jax.model.models import model_type  # the model decides its rows' layout

    data = config.data
    return Layout(batching.Lengths(data.max_source_length, data.max_target_length),
                  model_type(config.model).joins_source_and_target, bool(data.packing),
                  config.model.max_segments_per_row, data.overlong)


def eval_layout(config: Any, split: str) -> Layout:
    """Padded rows of the split's lengths (the test split has longer ones)."""
    data = config.data
    prefix = "test_" if split == "test" else ""
    lengths = batching.Lengths(data[f"{prefix}max_source_length"],
                               data[f"{prefix}max_target_length"])
    from t2t_jax.model.models import model_type

    return Layout(lengths, model_type(config.model).joins_source_and_target)


def sampling_tokenizer(config: Any, tokenizer: Any) -> Any:
    """The tokenizer that draws training segmentations (`data.spm_sampling_alpha`), or None."""
    data = config.data
    if not data.spm_sampling_alpha:
        return None
    if not hasattr(tokenizer, "sampled"):
        raise ValueError("data.spm_sampling_alpha samples SentencePiece segmentations, and this "
                         "data has none (a built-in task): set it to 0")
    return tokenizer.sampled(data.spm_sampling_alpha, data.spm_sampling_nbest)


def make_planner(config: Any, split: prepared.Split, sampler: Any = None,
                 block: tuple[int, int] = (0, 1), rows_multiple: int = 1) -> Planner:
    """The config's train batches of `split`: fixed rows (`data.batch_size`, padded or packed)
    or token-budget batches (`data.token_budget`, without packing), this host's `block` of
    each. With a sampling tokenizer (`sampling_tokenizer`) each epoch draws every example's
    segmentations from its n-best, which are computed once (`prepared.ensure_candidates`)."""
    data = config.data
    lengths = (split.lengths("inputs"), split.lengths("targets"))
    sampling = None
    if sampler is not None:
        sampling = (_candidates(split, sampler, data.input_workers), sampler.sampling_alpha)
    budget = data.token_budget if data.token_budget and not data.packing else 0
    return Planner(lengths, train_layout(config), config.seed, data.batch_size, budget, block,
                   rows_multiple, sampling)


def _candidates(split: prepared.Split, sampler: Any, workers: int) -> prepared.Candidates:
    """The split's n-best candidates for subword sampling: with several processes, process 0
    computes them first, and the others then find them on a shared disk (or, on a disk of
    their own, compute their own copy)."""
    from t2t_jax.runtime.distributed import process_0_first

    return process_0_first(
        lambda: prepared.ensure_candidates(split, sampler, sampler.sampling_nbest, workers),
        "t2t_jax n-best candidates")
