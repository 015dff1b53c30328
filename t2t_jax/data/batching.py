"""Batches from prepared ids: each epoch's order, its packing or token-budget plan, this host's
block of every global batch, and the gather that makes the block's arrays.

Batches are dicts of int32 numpy arrays [local rows, length]:
  inputs, targets                     token ids, 0 = padding, each example ends with EOS
  inputs_segmentation, ..._position   only when packed: example index (1, 2, ..; 0 = padding)
  targets_segmentation, ..._position  and position within its example
  loss_mask                           only for the decoder-only model: 1 on the target part
The decoder-only model reads one sequence `targets` = source EOS target EOS.

Everything is a pure function of the example lengths, the seed and the epoch, so every host
plans every global batch by itself (from lengths alone: cheap) and reads the tokens of its own
rows only. The batches therefore do not depend on how many hosts read them, and a position in
the data is two integers (`Position`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

# First-fit packing looks at this many open rows for a place for each example, over windows of
# this many examples of the epoch's order planned side by side (docs/benchmarks.md: rows fill
# about as well as with one window a whole epoch, and the plan costs well under a microsecond an
# example).
OPEN_ROWS = 32
PACK_WINDOW = 2048
# Token-budget batches bucket examples by their longer side: one shape per bucket.
BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Maximum token lengths (EOS included) of one batch layout."""

    source: int
    target: int

    def feature_lengths(self, joined: bool = False) -> dict[str, int]:
        """The token features of a batch and their lengths: inputs and targets, or `joined`,
        the one sequence of source then target with its loss mask (`ModelType`'s layout)."""
        if joined:
            return {"targets": self.source + self.target, "loss_mask": self.source + self.target}
        return {"inputs": self.source, "targets": self.target}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How examples become rows: lengths, model type, packing, and what overlong examples do."""

    lengths: Lengths
    decoder_only: bool = False
    packing: bool = False
    max_segments: int = 0  # packed rows hold at most this many examples (0: as many as fit)
    overlong: str = "drop"  # or "truncate"

    def __post_init__(self):
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"data.overlong must be 'drop' or 'truncate', got {self.overlong!r}")

    @property
    def capacity(self) -> np.ndarray:
        """What a row holds of each planned quantity: [source, target] tokens, or the one
        sequence of the decoder-only model."""
        if self.decoder_only:
            return np.array([self.lengths.source + self.lengths.target], np.int64)
        return np.array([self.lengths.source, self.lengths.target], np.int64)

    @property
    def row_length(self) -> int:
        return int(self.capacity.max())

    @property
    def feature_lengths(self) -> dict[str, int]:
        return self.lengths.feature_lengths(self.decoder_only)

    def pieces(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        """int32 [n, 2]: how many source and target tokens of each example a row takes (cut
        short with `overlong="truncate"`; the caller drops the overlong ones otherwise)."""
        source = np.asarray(source, np.int64)
        target = np.asarray(target, np.int64)
        if self.decoder_only:
            total = self.lengths.source + self.lengths.target
            source = np.minimum(source, total)
            target = np.minimum(target, total - source)
        else:
            source = np.minimum(source, self.lengths.source)
            target = np.minimum(target, self.lengths.target)
        return np.stack([source, target], axis=1).astype(np.int32)

    def planned(self, pieces: np.ndarray) -> np.ndarray:
        """[n, 1 or 2]: the quantities a row's capacity is checked against."""
        return pieces.sum(axis=1, keepdims=True) if self.decoder_only else pieces

    def kept(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Indices of the examples that fit (all of them with `overlong="truncate"`)."""
        if self.overlong == "truncate":
            return np.arange(len(source))
        planned = self.planned(np.stack([source, target], axis=1))
        return np.flatnonzero(np.all(planned <= self.capacity, axis=1))


@dataclasses.dataclass(frozen=True, order=True)
class Position:
    """Where the next batch starts: the epoch, and the row (fixed-size batches) or the batch
    (token-budget batches) within that epoch's plan."""

    epoch: int = 0
    index: int = 0

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_json(cls, value: dict) -> Position:
        return cls(int(value["epoch"]), int(value["index"]))


def epoch_order(examples: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """`examples` shuffled for `epoch`: a permutation seeded by (seed, epoch) alone."""
    return np.random.default_rng([seed % 2**63, epoch, 0]).permutation(examples)


def first_fit_rows(planned: np.ndarray, capacity: np.ndarray, max_segments: int = 0,
                   open_rows: int = OPEN_ROWS, window: int = PACK_WINDOW) -> np.ndarray:
    """The row of each example [n], packing them in order: each goes to the first of
    `open_rows` rows where it fits (every planned quantity within `capacity`, and fewer than
    `max_segments` examples if that is not 0); where none has room, the fullest of them is
    closed and an empty one takes its place. Rows are numbered in the order they open.

    Windows of `window` consecutive examples are packed independently and side by side, so
    that each numpy operation works on every window at once: `window` steps for any n.
    `planned` may also be [epochs, n, quantities]: several epochs' orders packed at once (each
    as it would be alone), which makes the steps' fixed costs count once for all of them.
    """
    groups = planned[None] if planned.ndim == 2 else planned
    epochs, count, quantities = groups.shape
    if count == 0:
        return np.zeros(planned.shape[:-1], np.int64)
    window = min(window, count)
    per_epoch = -(-count // window)
    windows = epochs * per_epoch
    sizes = np.zeros((epochs, per_epoch * window, quantities), np.int32)
    sizes[:, :count] = groups  # each epoch's last window's tail: size 0, after its examples
    sizes = np.ascontiguousarray(sizes.reshape(windows, window, quantities).transpose(1, 2, 0))
    free = [np.full((windows, open_rows), c, np.int32) for c in capacity]
    held = np.zeros((windows, open_rows), np.int32) if max_segments else None
    # A slot's rows are told apart by a generation, counted up when the slot's row closes;
    # rows are numbered after the loop, in the order they first took an example.
    generation = np.zeros((windows, open_rows), np.int64)
    slots = np.empty((window, windows), np.int64)
    generations = np.empty((window, windows), np.int64)
    every = np.arange(windows)
    for step in range(window):
        size = sizes[step]  # [quantity, window]
        fits = free[0] >= size[0][:, None]
        for q in range(1, quantities):
            fits &= free[q] >= size[q][:, None]
        if held is not None:
            fits &= held < max_segments
        slot = fits.argmax(axis=1)
        full = np.flatnonzero(~fits[every, slot])
        if len(full):  # no room anywhere: the fullest row closes, an empty one takes its slot
            fullest = sum(f[full] for f in free).argmin(axis=1)
            slot[full] = fullest
            for q, c in enumerate(capacity):
                free[q][full, fullest] = c
            generation[full, fullest] += 1
            if held is not None:
                held[full, fullest] = 0
        for q in range(quantities):
            free[q][every, slot] -= size[q]
        if held is not None:
            held[every, slot] += 1
        slots[step] = slot
        generations[step] = generation[every, slot]
    # Number each window's rows by first use, then the windows one after another.
    key = (every[:, None] * open_rows + slots.T) * (window + 1) + generations.T
    key = key.reshape(epochs, per_epoch * window)[:, :count]
    rows = np.stack([_numbered_by_first_use(k) for k in key])
    return rows if planned.ndim == 3 else rows[0]


def _numbered_by_first_use(key: np.ndarray) -> np.ndarray:
    unique, first_use, row_of = np.unique(key, return_index=True, return_inverse=True)
    number = np.empty(len(unique), np.int64)
    number[np.argsort(first_use, kind="stable")] = np.arange(len(unique))
    return number[row_of.reshape(-1)]


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """An epoch's rows: `examples` (indices into the split) in row order, row r holding
    examples[row_starts[r]:row_starts[r + 1]]; for token-budget plans also the batches, batch b
    being rows batch_starts[b]:batch_starts[b + 1] padded to batch_length[b] tokens. `pieces`
    [split examples, 2] are the source and target tokens each example takes this epoch, and
    with subword sampling `chosen` [split examples, 2] the candidate drawn for each side."""

    examples: np.ndarray
    row_starts: np.ndarray
    pieces: np.ndarray
    chosen: np.ndarray | None = None
    batch_starts: np.ndarray | None = None
    batch_length: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.row_starts) - 1

    @property
    def num_batches(self) -> int:
        return len(self.batch_starts) - 1


def plan_rows(orders: list[np.ndarray], pieces: list[np.ndarray], layout: Layout,
              chosen: list[np.ndarray | None]) -> list[EpochPlan]:
    """Each epoch's rows, of one example each, or packed first-fit (several epochs at once),
    from its order (the epoch's examples) and pieces (the [n, 2] token counts of every example
    that epoch, as `Layout.pieces` gives them, indexed by example)."""
    if not layout.packing:
        return [EpochPlan(order, np.arange(len(order) + 1), p, c)
                for order, p, c in zip(orders, pieces, chosen, strict=True)]
    planned = np.stack([layout.planned(p[order]) for order, p in zip(orders, pieces,
                                                                    strict=True)])
    plans = []
    for order, p, c, rows in zip(orders, pieces, chosen, first_fit_rows(
            planned, layout.capacity, layout.max_segments), strict=True):
        by_row = np.argsort(rows, kind="stable")
        row_starts = np.concatenate([[0], np.cumsum(np.bincount(rows))])
        plans.append(EpochPlan(order[by_row], row_starts, p, c))
    return plans


def bucket_lengths(longest: int) -> list[int]:
    """The token-budget buckets below the longest row, and that row's length."""
    return [b for b in BUCKETS if b < longest] + [longest]


def plan_token_budget(order: np.ndarray, pieces: np.ndarray, layout: Layout, budget: int,
                      seed: int, epoch: int, chosen: np.ndarray | None = None) -> EpochPlan:
    """Batches of about `budget` tokens: each example goes to the smallest bucket that holds
    its longer side, each bucket of length L is cut in its epoch order into batches of
    budget // L examples (the last one of a bucket shorter), and the batches are shuffled
    (seeded by seed and epoch), as fairseq plans them ahead of the epoch."""
    buckets = np.array(bucket_lengths(layout.row_length))
    longest = layout.planned(pieces[order]).max(axis=1)
    bucket = np.searchsorted(buckets, longest)
    by_bucket = np.argsort(bucket, kind="stable")
    ordered, bucket = order[by_bucket], bucket[by_bucket]
    starts, lengths = [], []
    for b in np.unique(bucket):
        first, last = np.searchsorted(bucket, [b, b + 1])
        size = max(1, budget // int(buckets[b]))
        starts.extend(range(int(first), int(last), size))
        lengths.extend([int(buckets[b])] * len(range(int(first), int(last), size)))
    ends = starts[1:] + [len(ordered)]
    shuffle = np.random.default_rng([seed % 2**63, epoch, 1]).permutation(len(starts))
    spans = [(starts[i], ends[i]) for i in shuffle]
    rows = np.concatenate([ordered[a:b] for a, b in spans]) if spans else ordered
    sizes = np.array([b - a for a, b in spans], np.int64)
    batch_starts = np.concatenate([[0], np.cumsum(sizes)])
    return EpochPlan(rows, np.arange(len(rows) + 1), pieces, chosen, batch_starts,
                     np.array(lengths, np.int64)[shuffle])


@dataclasses.dataclass
class BlockSpec:
    """What one host's block of one batch holds, for `gather`: its examples (indices into the
    split, in row order), the local row of each, their planned source and target token counts,
    with subword sampling the candidate drawn for each side (else None), its row count and each
    feature's length."""

    examples: np.ndarray
    rows_of: np.ndarray
    pieces: np.ndarray
    chosen: np.ndarray | None
    num_rows: int
    feature_lengths: dict[str, int]


def block_spec(plan_of: Callable[[int], EpochPlan], segments: Sequence[tuple[int, int, int]],
               num_rows: int, feature_lengths: dict[str, int]) -> BlockSpec:
    """The spec of the rows `segments` ((epoch, first row, end row) of epoch plans, in order),
    which together are one block of `num_rows` rows (fewer: the rest is padding)."""
    examples, rows_of, pieces, chosen, base = [], [], [], [], 0
    for epoch, first, end in segments:
        plan = plan_of(epoch)
        a, b = plan.row_starts[first], plan.row_starts[end]
        mine = plan.examples[a:b]
        examples.append(mine)
        counts = np.diff(plan.row_starts[first : end + 1])
        rows_of.append(np.repeat(np.arange(base, base + end - first), counts))
        pieces.append(plan.pieces[mine])
        if plan.chosen is not None:
            chosen.append(plan.chosen[mine])
        base += end - first
    empty = np.zeros(0, np.int64)
    return BlockSpec(np.concatenate(examples) if examples else empty,
                     np.concatenate(rows_of) if rows_of else empty,
                     np.concatenate(pieces) if pieces else np.zeros((0, 2), np.int32),
                     np.concatenate(chosen) if chosen else None, num_rows, feature_lengths)


def draw_candidates(first: np.ndarray, offsets: np.ndarray, logp: np.ndarray,
                    draws: np.ndarray, alpha: float, limit: np.ndarray | float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For subword sampling: one candidate segmentation of each example (example i's are
    first[i]:first[i + 1], candidate c has offsets[c + 1] - offsets[c] tokens and
    log-probability logp[c]), drawn with the uniform number draws[i] and probabilities
    proportional to P^alpha (Kudo 2018's l-best sampling) among those of at most `limit[i]`
    tokens (the best fits: the caller keeps only examples whose best does). Vectorized over
    every example of an epoch. Returns (candidate, its length)."""
    counts = np.diff(first)
    which = np.repeat(np.arange(len(counts)), counts)
    candidate = np.arange(first[0], first[-1])
    lengths = np.diff(offsets)[candidate]
    starts = first[:-1] - first[0]
    fits = lengths <= np.broadcast_to(limit, counts.shape)[which]
    fits |= ~np.logical_or.reduceat(fits, starts)[which]  # none fits: dropped, draw any
    logits = np.where(fits, alpha * logp[candidate].astype(np.float64), -np.inf)
    peak = np.maximum.reduceat(logits, starts)
    weights = np.exp(logits - peak[which])
    cumulative = np.cumsum(weights)
    before = cumulative[starts] - weights[starts]
    total = cumulative[starts + counts - 1] - before
    pick = np.searchsorted(cumulative, before + draws * total, side="right")
    pick = np.clip(pick, starts, starts + counts - 1)
    # A draw at the very end of an example's range may land on a weightless (too long) one.
    while np.any(bad := ~np.isfinite(logits[pick])):
        pick[bad] -= 1
    return candidate[pick], lengths[pick]


def _within_row_columns(rows_of: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Each example's first column in its row, a row's examples being laid side by side."""
    if not len(rows_of):
        return np.zeros(0, np.int64)
    starts = np.cumsum(sizes) - sizes
    first_of_row = np.flatnonzero(np.concatenate([[True], rows_of[1:] != rows_of[:-1]]))
    row_base = np.repeat(starts[first_of_row], np.diff(np.append(first_of_row, len(rows_of))))
    return starts - row_base


def _scatter(out: np.ndarray, tokens: np.ndarray, token_starts: np.ndarray, sizes: np.ndarray,
             destinations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copies tokens[token_starts[i]:][:sizes[i]] to out.flat[destinations[i]:][:sizes[i]] for
    every i, in one vectorized gather; returns the flat destination of every token copied and
    its offset within its piece."""
    before = np.cumsum(sizes) - sizes
    within = np.arange(int(before[-1] + sizes[-1]) if len(sizes) else 0)
    where = np.repeat(destinations - before, sizes) + within
    out.reshape(-1)[where] = tokens[np.repeat(token_starts - before, sizes) + within]
    return where, within - np.repeat(before, sizes)


def gather(sources: dict[str, tuple[np.ndarray, np.ndarray]], sizes: np.ndarray,
           spec: BlockSpec, layout: Layout) -> dict[str, np.ndarray]:
    """The block's arrays. `sources` maps each side to (ids, where each of the spec's examples
    starts in them): a prepared split's, or sampled segmentations; `sizes` [k, 2] says how many
    source and target tokens of each example to take."""
    sizes = sizes.astype(np.int64)
    if layout.decoder_only:
        column = _within_row_columns(spec.rows_of, sizes.sum(axis=1))
        columns = {"inputs": column, "targets": column + sizes[:, 0]}
        feature_of = {"inputs": "targets", "targets": "targets"}
    else:
        columns = {side: _within_row_columns(spec.rows_of, sizes[:, i])
                   for i, side in enumerate(("inputs", "targets"))}
        feature_of = {"inputs": "inputs", "targets": "targets"}
    batch = {name: np.zeros((spec.num_rows, length), np.int32)
             for name, length in spec.feature_lengths.items()}
    features = sorted(set(feature_of.values()))
    if layout.packing:
        segment = _within_row_columns(spec.rows_of, np.ones(len(spec.rows_of), np.int64)) + 1
        for name in features:
            for part in ("segmentation", "position"):
                batch[f"{name}_{part}"] = np.zeros_like(batch[name])
    for i, side in enumerate(("inputs", "targets")):
        ids, starts = sources[side]
        name = feature_of[side]
        length = spec.feature_lengths[name]
        where, within = _scatter(batch[name], ids, starts, sizes[:, i],
                                 spec.rows_of * length + columns[side])
        if layout.decoder_only and side == "targets":
            batch["loss_mask"].reshape(-1)[where] = 1
        if layout.packing:
            batch[f"{name}_segmentation"].reshape(-1)[where] = np.repeat(segment, sizes[:, i])
            if layout.decoder_only and side == "targets":
                within = within + np.repeat(sizes[:, 0], sizes[:, i])
            batch[f"{name}_position"].reshape(-1)[where] = within
    return batch


def bucket_length(length: int, cap: int) -> int:
    """Lengths rounded up to a multiple of 16 (few compilations), at most `cap`."""
    return min(cap, max(16, -(-length // 16) * 16))
