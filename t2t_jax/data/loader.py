"""Train and eval batches from a prepared split: the planner (which examples every global batch
holds, and which rows of it are this host's), the workers that gather the rows' tokens ahead of
the step, and the position a checkpoint saves.

The planner runs in the training process and needs only the examples' lengths. Workers (processes,
`data.input_workers`; or with 0 a thread of this process) gather tokens from the memory-mapped
split, and sample segmentations with subword sampling on. Batch k of this host goes to whichever
worker is free and comes back in order, so the batches do not depend on the number of workers
either.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
from collections.abc import Iterator
from typing import Any

import numpy as np

from t2t_jax.data import batching, prepared
from t2t_jax.data.batching import BlockSpec, EpochPlan, Layout, Position

SIDES = prepared.SIDES


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
        self.kept = layout.kept(*lengths)
        if not len(self.kept):
            raise ValueError("no training example fits data.max_source_length and "
                             "data.max_target_length; raise them (or set data.overlong=truncate)")
        self.pieces = layout.pieces(*lengths)
        self.best = lengths
        self.sampling = sampling
        if not token_budget and batch_rows % block[1]:
            raise ValueError(f"data.batch_size={batch_rows} must be divisible by the "
                             f"{block[1]} blocks the batch is split into (one per process)")
        self._plans: dict[int, concurrent.futures.Future] = {}
        self._background = concurrent.futures.ThreadPoolExecutor(1, "t2t_jax_planner")

    def _make_plan(self, epoch: int) -> EpochPlan:
        order = batching.epoch_order(self.kept, self.seed, epoch)
        pieces, chosen = self._draw(epoch) if self.sampling else (self.pieces, None)
        if self.token_budget:
            return batching.plan_token_budget(order, pieces, self.layout, self.token_budget,
                                              self.seed, epoch, chosen)
        return batching.plan_rows(order, pieces, self.layout, chosen)

    def _draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Every example's segmentations for `epoch` (subword sampling), drawn by (seed,
        epoch, example, side) alone: (pieces [n, 2] as planned, chosen candidates [n, 2])."""
        candidates, alpha = self.sampling
        count = len(self.best[0])
        examples = np.arange(count)
        epochs = np.full(count, epoch)
        if self.layout.overlong == "truncate":  # any candidate; cut to the row like the best
            limits = [np.inf, np.inf]
        elif self.layout.decoder_only:  # the one sequence: the source leaves the target room
            limits = [self.layout.capacity[0] - self.best[1], None]
        else:
            limits = list(self.layout.capacity)
        chosen, lengths = [], []
        for side_index, side in enumerate(SIDES):
            limit = limits[side_index]
            if limit is None:
                limit = self.layout.capacity[0] - lengths[0]
            pick, length = batching.draw_candidates(
                candidates.first(side), candidates.offsets(side), candidates.logp(side),
                uniforms(self.seed, epochs, examples, side_index), alpha, limit)
            chosen.append(pick)
            lengths.append(length)
        return self.layout.pieces(*lengths), np.stack(chosen, axis=1)

    def plan(self, epoch: int) -> EpochPlan:
        """The plan of `epoch`; the next one is started in the background meanwhile, so that
        an epoch boundary does not wait for it."""
        for wanted in (epoch, epoch + 1):
            if wanted not in self._plans:
                self._plans[wanted] = self._background.submit(self._make_plan, wanted)
        for old in [e for e in self._plans if e < epoch - 1]:
            del self._plans[old]
        return self._plans[epoch].result()

    def close(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)

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

    def spec_at(self, position: Position) -> tuple[BlockSpec, Position]:
        """This host's block of the batch at `position`, and the next batch's position."""
        index, count = self.block
        if self.token_budget:
            return self._budget_spec_at(position)
        share = self.batch_rows // count
        start = self._rows_from(position, index * share)[1] if index else position
        segments = self._rows_from(start, share)[0]
        spec = batching.block_spec(self.plan, segments, share, self.layout.feature_lengths)
        return spec, self._rows_from(position, self.batch_rows)[1]

    def _budget_spec_at(self, position: Position) -> tuple[BlockSpec, Position]:
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
        segments = [(epoch, *mine)] if mine[1] > mine[0] else []
        length = int(plan.batch_length[batch])
        spec = batching.block_spec(self.plan, segments, share,
                                   dict.fromkeys(self.layout.feature_lengths, length))
        return spec, Position(epoch, batch + 1)

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


_WORKER: Gatherer | None = None


def _start_worker(directory: str, name: str, info: dict, layout: Layout, nbest: int) -> None:
    global _WORKER
    _WORKER = Gatherer(prepared.Split(directory, name, info), layout, nbest)


def _gather_in_worker(spec: BlockSpec) -> dict[str, np.ndarray]:
    return _WORKER(spec)


class TrainInput:
    """This host's blocks of the global train batches from `position` on, as numpy dicts,
    gathered ahead by `workers` processes (0: one thread of this process), `prefetch` blocks in
    flight. `position` is always that of the next batch `next` returns: what a checkpoint
    saves, together with the batches taken but not trained on."""

    def __init__(self, split: prepared.Split, planner: Planner, position: Position,
                 workers: int = 0, prefetch: int = 4):
        self.planner, self.position = planner, position
        self._next_to_plan = position
        self._in_flight: collections.deque = collections.deque()
        self._prefetch = max(prefetch, 2 * workers, 1)
        nbest = planner.sampling[0].nbest if planner.sampling else 0
        if workers:
            # spawn: the training process runs JAX's threads, which a fork would not carry.
            self._executor = concurrent.futures.ProcessPoolExecutor(
                workers, multiprocessing.get_context("spawn"), _start_worker,
                (split.directory, split.name, split.info, planner.layout, nbest))
            self._gather = _gather_in_worker
        else:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, "t2t_jax_input")
            self._gather = Gatherer(split, planner.layout, nbest)
        self._fill()

    def _fill(self) -> None:
        while len(self._in_flight) < self._prefetch:
            spec, after = self.planner.spec_at(self._next_to_plan)
            self._in_flight.append(
                (self._next_to_plan, self._executor.submit(self._gather, spec)))
            self._next_to_plan = after

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        _, future = self._in_flight.popleft()
        try:
            batch = future.result()
        except concurrent.futures.process.BrokenProcessPool as error:
            raise RuntimeError(
                f"an input worker process died ({error}); rerun, or set "
                "data.input_workers=0 to gather batches in the training process") from error
        self._fill()
        self.position = self._in_flight[0][0]
        return batch

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.planner.close()


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


def log_plan(planner: Planner) -> None:
    """How full epoch 0's rows are, for the log."""
    plan = planner.plan(0)
    used = plan.pieces[plan.examples].sum()
    capacity = plan.num_rows * int(planner.layout.capacity.sum())
    logging.info("epoch plan: %d examples in %d rows (%.1f%% of their tokens used), %.1f "
                 "batches an epoch", len(plan.examples), plan.num_rows, 100 * used / capacity,
                 planner.batches_per_epoch())


def train_layout(config: Any) -> Layout:
    """The layout of the config's train batches."""
    data = config.data
    return Layout(batching.Lengths(data.max_source_length, data.max_target_length),
                  config.model.type == "decoder_only", bool(data.packing),
                  config.model.max_segments_per_row, data.overlong)


def eval_layout(config: Any, split: str) -> Layout:
    """Padded rows of the split's lengths (the test split has longer ones)."""
    data = config.data
    prefix = "test_" if split == "test" else ""
    lengths = batching.Lengths(data[f"{prefix}max_source_length"],
                               data[f"{prefix}max_target_length"])
    return Layout(lengths, config.model.type == "decoder_only")


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
        candidates = prepared.ensure_candidates(split, sampler, sampler.sampling_nbest,
                                                data.input_workers)
        sampling = (candidates, sampler.sampling_alpha)
    budget = data.token_budget if data.token_budget and not data.packing else 0
    return Planner(lengths, train_layout(config), config.seed, data.batch_size, budget, block,
                   rows_multiple, sampling)
