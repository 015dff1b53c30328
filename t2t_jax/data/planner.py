"""Which examples every global train batch holds, and which rows of it are this host's: each
epoch's plan, made ahead in the background (a thread, or with worker processes a process of
its own that shares the plans with them as .npy files), and the position a checkpoint saves.

Planning needs only the examples' lengths, so every host plans every global batch by itself
and reads the tokens of its own rows only (`loader.py` gathers them): the batches do not
depend on how many hosts read them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np

from t2t_jax.data import batching, prepared
from t2t_jax.data.batching import BlockSpec, EpochPlan, Layout, Position

SIDES = prepared.SIDES
DRAW_EXAMPLES = 65_536  # examples whose subword-sampling candidates are drawn at once


def uniforms(seed: int, epochs: np.ndarray, examples: np.ndarray, side: int) -> np.ndarray:
    """A uniform number in [0, 1) for each (seed, epoch, example, side): splitmix64 of their
    mix, so that a subword-sampling draw depends on nothing else (not the host, worker or
    position in a stream) and is the same on every machine."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
             ^ epochs.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
             ^ examples.astype(np.uint64) * np.uint64(0x94D049BB133111EB)
             ^ np.uint64(side + 1))
        for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(factor)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53


@dataclasses.dataclass(frozen=True)
class BlockRequest:
    """One host's block of one batch, as rows of epoch plans: (epoch, first row, end row)
    segments in order, `num_rows` rows in all (the rest padding), each feature's length."""

    segments: tuple[tuple[int, int, int], ...]
    num_rows: int
    feature_lengths: dict[str, int]

    def spec(self, plan_of: Callable[[int], EpochPlan]) -> BlockSpec:
        return batching.block_spec(plan_of, self.segments, self.num_rows, self.feature_lengths)


class PlanStore:
    """Epoch plans as .npy files in a directory: the planning process writes each once, the
    worker processes map them, and no plan passes through the training process."""

    FIELDS = ("examples", "row_starts", "pieces", "chosen", "batch_starts", "batch_length")

    def __init__(self, directory: str):
        self.directory = directory
        self._read: dict[int, EpochPlan] = {}

    def _path(self, epoch: int, field: str) -> str:
        return os.path.join(self.directory, f"epoch{epoch}.{field}.npy")

    def write(self, epoch: int, plan: EpochPlan) -> None:
        for field in self.FIELDS:
            value = getattr(plan, field)
            if value is not None:
                temporary = self._path(epoch, field) + f".tmp{os.getpid()}.npy"
                np.save(temporary, value)
                os.replace(temporary, self._path(epoch, field))

    def read(self, epoch: int) -> EpochPlan:
        if epoch not in self._read:
            for old in [e for e in self._read if e < epoch - 3]:
                del self._read[old]
            fields = {f: np.load(self._path(epoch, f), mmap_mode="r")
                      for f in self.FIELDS if os.path.exists(self._path(epoch, f))}
            self._read[epoch] = EpochPlan(**fields)
        return self._read[epoch]

    def remove_before(self, epoch: int) -> None:
        for name in os.listdir(self.directory):
            if name.startswith("epoch") and int(name[5:].split(".")[0]) < epoch:
                os.remove(os.path.join(self.directory, name))


@dataclasses.dataclass
class EpochPlanner:
    """Makes each epoch's plan from the examples' lengths: what `Planner` runs in the
    background, in a thread or (with worker processes) a process of its own, where its numpy
    work on small arrays does not hold the training process's lock."""

    kept: np.ndarray  # the examples that fit
    pieces: np.ndarray  # [n, 2]: what each takes of a row (its best segmentation)
    best: tuple[np.ndarray, np.ndarray]  # their lengths
    layout: Layout
    seed: int
    token_budget: int = 0
    sampling: tuple[prepared.Candidates, float] | None = None

    @property
    def epochs_per_job(self) -> int:
        """How many epochs to plan at once: packing small corpora several epochs side by side
        costs little more than one (the packer's steps cost the same for any number of
        windows, and a small corpus has few)."""
        if not self.layout.packing or self.token_budget:
            return 1
        windows = -(-len(self.kept) // batching.PACK_WINDOW)
        return max(1, min(16, 64 // windows))

    def make(self, epochs: list[int]) -> list[EpochPlan]:
        """The plans of `epochs`, each as it would be alone."""
        orders = [batching.epoch_order(self.kept, self.seed, epoch) for epoch in epochs]
        drawn = [self._draw(epoch) if self.sampling else (self.pieces, None)
                 for epoch in epochs]
        if self.token_budget:
            return [batching.plan_token_budget(order, pieces, self.layout, self.token_budget,
                                               self.seed, epoch, chosen)
                    for epoch, order, (pieces, chosen) in zip(epochs, orders, drawn,
                                                              strict=True)]
        return batching.plan_rows(orders, [d[0] for d in drawn], self.layout,
                                  [d[1] for d in drawn])

    def _draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Every example's segmentations for `epoch` (subword sampling), drawn by (seed,
        epoch, example, side) alone: (pieces [n, 2] as planned, chosen candidates [n, 2]).
        Drawn DRAW_EXAMPLES examples at a time, so that memory stays at a chunk's candidates
        (about 60 bytes each) whatever the corpus size."""
        candidates, alpha = self.sampling
        count = len(self.best[0])
        if self.layout.overlong == "truncate":  # any candidate; cut to the row like the best
            limits = [np.inf, np.inf]
        elif self.layout.decoder_only:  # the one sequence: the source leaves the target room
            limits = [self.layout.capacity[0] - self.best[1], None]
        else:
            limits = list(self.layout.capacity)
        chosen = np.zeros((count, 2), np.int64)
        lengths = np.zeros((count, 2), np.int64)
        for start in range(0, count, DRAW_EXAMPLES):
            end = min(start + DRAW_EXAMPLES, count)
            examples = np.arange(start, end)
            for side_index, side in enumerate(SIDES):
                limit = limits[side_index]
                if limit is None:
                    limit = self.layout.capacity[0] - lengths[start:end, 0]
                elif np.ndim(limit):
                    limit = limit[start:end]
                pick, length = batching.draw_candidates(
                    candidates.first(side)[start : end + 1], candidates.offsets(side),
                    candidates.logp(side),
                    uniforms(self.seed, np.full(end - start, epoch), examples, side_index),
                    alpha, limit)
                chosen[start:end, side_index] = pick
                lengths[start:end, side_index] = length
        return self.layout.pieces(lengths[:, 0], lengths[:, 1]), chosen


PLANS_PREFIX = "t2t_jax_plans_"


def _plan_directory() -> str:
    """A new directory for this process's plans, in the temporary directory ($TMPDIR). Those a
    killed run left (their process is gone) are removed first: a WMT epoch's plan takes about
    150 MB."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        if name.startswith(PLANS_PREFIX) and name[len(PLANS_PREFIX):].split("_")[0].isdigit():
            pid = int(name[len(PLANS_PREFIX):].split("_")[0])
            if pid != os.getpid() and not _alive(pid):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{PLANS_PREFIX}{os.getpid()}_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_PLANNER: tuple[EpochPlanner, PlanStore] | None = None


def _start_planner(planner: EpochPlanner, directory: str) -> None:
    global _PLANNER
    _PLANNER = planner, PlanStore(directory)


def _plan_to_store(epochs: list[int]) -> list[int]:
    planner, store = _PLANNER
    for epoch, plan in zip(epochs, planner.make(epochs), strict=True):
        store.write(epoch, plan)
    return epochs


class Planner:
    """The global batches of a train split from a position on, and this host's block of each.

    Fixed-size batches are `batch_rows` consecutive rows of the rows of epoch 0, 1, ... (a
    batch may span two epochs); token-budget batches (`token_budget` > 0) are the batches of
    each epoch's plan, their rows rounded up to a multiple of `rows_multiple`. Host `block[0]`
    of `block[1]` gets the block-th equal share of each batch's rows."""

    def __init__(self, lengths: tuple[np.ndarray, np.ndarray], layout: Layout, seed: int,
                 batch_rows: int, token_budget: int = 0, block: tuple[int, int] = (0, 1),
                 rows_multiple: int = 1, sampling: tuple[prepared.Candidates, float] | None = None):
        self.layout, self.seed = layout, seed
        self.batch_rows, self.token_budget = batch_rows, token_budget
        self.block, self.rows_multiple = block, rows_multiple
        kept = layout.kept(*lengths)
        if not len(kept):
            raise ValueError("no training example fits data.max_source_length and "
                             "data.max_target_length; raise them (or set data.overlong=truncate)")
        if not token_budget and batch_rows % block[1]:
            raise ValueError(f"data.batch_size={batch_rows} must be divisible by the "
                             f"{block[1]} blocks the batch is split into (one per process)")
        self.sampling = sampling
        self._maker = EpochPlanner(kept, layout.pieces(*lengths), lengths, layout, seed,
                                   token_budget, sampling)
        self._plans: dict[int, concurrent.futures.Future] = {}  # by each job's first epoch
        self._background = concurrent.futures.ThreadPoolExecutor(1, "t2t_jax_planner")
        self._make = self._maker.make
        self._forgotten = 0
        self.store: PlanStore | None = None

    def plan_in_a_process(self) -> PlanStore:
        """Plans the coming epochs in a process of their own, into a `PlanStore` that worker
        processes read (what `TrainInput` asks for when it has workers: this process then only
        counts rows)."""
        self._background.shutdown(wait=True)
        self.store = PlanStore(_plan_directory())
        for start, made in self._plans.items():  # plans so far, for the workers too
            for offset, plan in enumerate(made.result()):
                self.store.write(start + offset, plan)
        self._background = concurrent.futures.ProcessPoolExecutor(
            1, multiprocessing.get_context("spawn"), _start_planner,
            (self._maker, self.store.directory))
        self._make = _plan_to_store
        return self.store

    def plan(self, epoch: int) -> EpochPlan:
        """The plan of `epoch`; the next epochs are planned in the background meanwhile, so
        that an epoch boundary does not wait for them."""
        per_job = self._maker.epochs_per_job
        first = epoch - epoch % per_job
        for start in (first, first + per_job):
            if start not in self._plans:
                self._plans[start] = self._background.submit(
                    self._make, list(range(start, start + per_job)))
        made = self._plans[first].result()
        return self.store.read(epoch) if self.store else made[epoch - first]

    def forget_before(self, epoch: int) -> None:
        """Drops the plans of epochs before `epoch`: no batch still to make reads them."""
        if epoch <= self._forgotten:
            return
        self._forgotten = epoch
        per_job = self._maker.epochs_per_job
        for start in [e for e in self._plans if e + per_job <= epoch]:
            del self._plans[start]
        if self.store:
            self.store.remove_before(epoch)

    def close(self) -> None:
        """Stops planning and removes the plans (a planning process is waited for first, so
        that it writes none after)."""
        self._background.shutdown(wait=self.store is not None, cancel_futures=True)
        if self.store:
            shutil.rmtree(self.store.directory, ignore_errors=True)

    def _rows_from(self, position: Position, count: int) -> tuple[list, Position]:
        """(epoch, first, end) row segments of the `count` rows from `position` on, and the
        position after them."""
        segments, epoch, row = [], position.epoch, position.index
        while count > 0:
            rows = self.plan(epoch).num_rows
            if row >= rows:
                epoch, row = epoch + 1, row - rows
                continue
            take = min(count, rows - row)
            segments.append((epoch, row, row + take))
            count, row = count - take, row + take
        return segments, Position(epoch, row)

    def request_at(self, position: Position) -> tuple[BlockRequest, Position]:
        """This host's block of the batch at `position`, and the next batch's position."""
        index, count = self.block
        if self.token_budget:
            return self._budget_request_at(position)
        share = self.batch_rows // count
        start = self._rows_from(position, index * share)[1] if index else position
        segments = self._rows_from(start, share)[0]
        request = BlockRequest(tuple(segments), share, self.layout.feature_lengths)
        return request, self._rows_from(position, self.batch_rows)[1]

    def _budget_request_at(self, position: Position) -> tuple[BlockRequest, Position]:
        epoch, batch = position.epoch, position.index
        while batch >= self.plan(epoch).num_batches:
            epoch, batch = epoch + 1, batch - self.plan(epoch).num_batches
        plan = self.plan(epoch)
        first, end = int(plan.batch_starts[batch]), int(plan.batch_starts[batch + 1])
        index, count = self.block
        multiple = self.rows_multiple * count
        rows = -(-(end - first) // multiple) * multiple
        share = rows // count
        mine = (min(first + index * share, end), min(first + (index + 1) * share, end))
        segments = ((epoch, *mine),) if mine[1] > mine[0] else ()
        length = int(plan.batch_length[batch])
        request = BlockRequest(segments, share, dict.fromkeys(self.layout.feature_lengths, length))
        return request, Position(epoch, batch + 1)

    def advance(self, position: Position, batches: int) -> Position:
        """The position `batches` global batches after `position`."""
        if self.token_budget:
            epoch, batch = position.epoch, position.index + batches
            while batch >= self.plan(epoch).num_batches:
                epoch, batch = epoch + 1, batch - self.plan(epoch).num_batches
            return Position(epoch, batch)
        return self._rows_from(position, batches * self.batch_rows)[1]

    def batches_per_epoch(self) -> float:
        """Global batches in one pass over the kept examples (epoch 0's plan)."""
        plan = self.plan(0)
        if self.token_budget:
            return float(plan.num_batches)
        return plan.num_rows / self.batch_rows


def log_plan(planner: Planner) -> None:
    """How full epoch 0's rows are, for the log."""
    plan = planner.plan(0)
    used = plan.pieces[plan.examples].sum()
    capacity = plan.num_rows * int(planner.layout.capacity.sum())
    logging.info("epoch plan: %d examples in %d rows (%.1f%% of their tokens used), %.1f "
                 "batches an epoch", len(plan.examples), plan.num_rows, 100 * used / capacity,
                 planner.batches_per_epoch())
