"""Input pipeline: TFDS split -> ids -> length limit -> padded or packed batches, per process.

Batches are dicts of int32 numpy arrays [local_batch, length]:
  inputs, targets                     token ids, 0 = padding, each example ends with EOS
  inputs_segmentation, ..._position   only when packed: example index (1, 2, ..; 0 = padding)
  targets_segmentation, ..._position  and position within its example
  loss_mask                           only for the decoder-only model: 1 on the target part
The decoder-only model reads one sequence `targets` = source EOS target EOS.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from t2t_jax.data.tasks import text_pairs
from t2t_jax.data.tokenizer import EOS_ID, Tokenizer

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Maximum token lengths (EOS included) of one batch layout."""

    source: int
    target: int

    def feature_lengths(self, model_type: str) -> dict[str, int]:
        if model_type == "decoder_only":
            return {"targets": self.source + self.target, "loss_mask": self.source + self.target}
        return {"inputs": self.source, "targets": self.target}


def encode(ds: tf.data.Dataset, tokenizer: Tokenizer, model_type: str) -> tf.data.Dataset:
    """Text pairs -> int32 ids with EOS appended (decoder-only: one sequence with a loss mask).
    Examples with a `sample_seed` (`with_sample_seeds`) give it to a sampling tokenizer, each
    side its own."""
    eos = tf.constant([EOS_ID], tf.int32)

    def ids(example, name: str, side: int) -> tf.Tensor:
        if "sample_seed" not in example:
            return tf.concat([tokenizer.tf_encode(example[name]), eos], 0)
        seed = tf.concat([example["sample_seed"], tf.constant([side], tf.int64)], 0)
        return tf.concat([tokenizer.tf_encode(example[name], seed), eos], 0)

    def to_ids(example):
        source, target = ids(example, "inputs", 0), ids(example, "targets", 1)
        if model_type != "decoder_only":
            return {"inputs": source, "targets": target}
        mask = tf.concat([tf.zeros_like(source), tf.ones_like(target)], 0)
        return {"targets": tf.concat([source, target], 0), "loss_mask": mask}

    return ds.map(tf.autograph.experimental.do_not_convert(to_ids), num_parallel_calls=AUTOTUNE)


def with_sample_seeds(ds: tf.data.Dataset, seed: int, process_index: int) -> tf.data.Dataset:
    """Each example with `sample_seed` (seed, process, its position in this process's stream):
    a new one at every pass, and, as the position is part of the input state a checkpoint
    saves, the same ones again in a resumed run."""
    def add(position, example):
        ids = tf.stack([tf.constant(seed % 2**63, tf.int64), tf.constant(process_index, tf.int64),
                        position])
        return example | {"sample_seed": ids}

    return ds.enumerate().map(add)


def limit_length(ds: tf.data.Dataset, lengths: dict[str, int], overlong: str) -> tf.data.Dataset:
    """Drops (`overlong="drop"`) or truncates (`"truncate"`) examples longer than `lengths`."""
    if overlong == "truncate":
        return ds.map(lambda ex: {k: v[: lengths[k]] for k, v in ex.items()})
    if overlong != "drop":
        raise ValueError(f"data.overlong must be 'drop' or 'truncate', got {overlong!r}")
    return ds.filter(
        lambda ex: tf.reduce_all([tf.size(v) <= lengths[k] for k, v in ex.items()])
    )


def _empty_row(lengths: dict[str, int]) -> dict[str, tf.Tensor]:
    row = {"count": tf.constant(0, tf.int32)}
    for key, length in lengths.items():
        row[f"{key}/fill"] = tf.constant(0, tf.int32)
        for part in ("ids", "segmentation", "position"):
            row[f"{key}/{part}"] = tf.zeros([length], tf.int32)
    return row


def _append(row: dict, example: dict, lengths: dict[str, int]) -> dict:
    """`row` with `example` written after what it holds (the caller checked that it fits)."""
    out = {"count": row["count"] + 1}
    for key, length in lengths.items():
        piece, fill = example[key], row[f"{key}/fill"]
        size = tf.size(piece)
        padding = [[fill, length - fill - size]]
        out[f"{key}/fill"] = fill + size
        out[f"{key}/ids"] = row[f"{key}/ids"] + tf.pad(piece, padding)
        out[f"{key}/segmentation"] = row[f"{key}/segmentation"] + tf.pad(
            tf.fill([size], row["count"] + 1), padding
        )
        out[f"{key}/position"] = row[f"{key}/position"] + tf.pad(tf.range(size), padding)
    return out


def _row_features(row: dict, lengths: dict[str, int]) -> dict[str, tf.Tensor]:
    out = {}
    for key in lengths:
        out[key] = row[f"{key}/ids"]
        if key != "loss_mask":
            out[f"{key}_segmentation"] = row[f"{key}/segmentation"]
            out[f"{key}_position"] = row[f"{key}/position"]
    return out


def pack(
    ds: tf.data.Dataset, lengths: dict[str, int], max_segments: int = 0
) -> tf.data.Dataset:
    """Greedily packs consecutive examples into rows of `lengths`, with segment ids (1, 2, ...)
    and positions restarting in each example. A row is emitted when the next example does not
    fit in one of its features or the row holds `max_segments` examples (0: no such limit), and
    at the end of a finite stream.

    Written in tf.data ops (a `scan`) rather than Python, so it runs at tf.data speed and its
    position is saved with the iterator's.
    """
    empty = _empty_row(lengths)
    flush = {k: tf.zeros([0], tf.int32) for k in lengths} | {"flush": True}
    ds = ds.map(lambda ex: ex | {"flush": False}).concatenate(
        tf.data.Dataset.from_tensors(flush)
    )

    def step(row, example):
        fits = tf.logical_not(example["flush"]) & tf.reduce_all(
            [row[f"{k}/fill"] + tf.size(example[k]) <= v for k, v in lengths.items()]
        )
        if max_segments:
            fits &= row["count"] < max_segments
        emit = tf.logical_not(fits) & (row["count"] > 0)
        base = {k: tf.where(fits, row[k], empty[k]) for k in row}
        return _append(base, example, lengths), (emit, _row_features(row, lengths))

    ds = ds.scan(empty, tf.autograph.experimental.do_not_convert(step))
    emitted = tf.autograph.experimental.do_not_convert(lambda emit, row: emit)
    return ds.filter(emitted).map(tf.autograph.experimental.do_not_convert(lambda _, row: row))


def pack_lists(
    examples: list[dict[str, np.ndarray]], lengths: dict[str, int], max_segments: int = 0
) -> list[dict[str, np.ndarray]]:
    """`pack` over a short list of examples (for looking at packing, and for tests)."""
    ds = tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={k: tf.TensorSpec([None], tf.int32) for k in lengths},
    )
    return list(pack(ds, lengths, max_segments).as_numpy_iterator())


def batch(
    ds: tf.data.Dataset, batch_size: int, lengths: dict[str, int], packing: bool,
    max_segments: int = 0,
) -> tf.data.Dataset:
    """Fixed-shape batches (so the train step compiles once); packed rows hold at most
    `max_segments` examples unless that is 0."""
    if packing:
        return pack(ds, lengths, max_segments).batch(batch_size, drop_remainder=True)
    return ds.padded_batch(
        batch_size, padded_shapes={k: [v] for k, v in lengths.items()}, drop_remainder=True
    )


def token_budget_batches(
    ds: tf.data.Dataset, budget: int, lengths: dict[str, int], multiple: int
) -> tf.data.Dataset:
    """Batches of about `budget` tokens a side: examples are bucketed by their longest feature
    and each bucket of length L is batched `budget // L` rows at a time (a multiple of
    `multiple`, the number of devices the rows are split over), padded to L.

    Few distinct shapes (one per bucket), so the step compiles a few times, not every step.
    """
    longest = max(lengths.values())
    bucket_lengths = [b for b in (8, 16, 32, 64, 128, 256, 512, 1024, 2048) if b < longest]
    bucket_lengths.append(longest)
    sizes = [max(multiple, budget // length // multiple * multiple) for length in bucket_lengths]
    return ds.bucket_by_sequence_length(
        element_length_func=lambda ex: tf.reduce_max([tf.size(v) for v in ex.values()]),
        bucket_boundaries=[length + 1 for length in bucket_lengths],
        bucket_batch_sizes=sizes + [multiple],  # the last bucket is never used: all fit
        pad_to_bucket_boundary=True,
        drop_remainder=True,
    )


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"data.batch_size={global_batch_size} must be divisible by the {process_count} "
            "processes"
        )
    return global_batch_size // process_count


def block_of(batch: dict[str, np.ndarray], index: int, count: int) -> dict[str, np.ndarray]:
    """Block `index` of `count` equal row blocks of a batch (views, no copy)."""
    rows = len(next(iter(batch.values()))) // count
    return {k: v[index * rows : (index + 1) * rows] for k, v in batch.items()}


def train_dataset(
    config: Any,
    builder: tfds.core.DatasetBuilder,
    tokenizer: Tokenizer,
    process_index: int = 0,
    process_count: int = 1,
    skip_batches: int = 0,
    batch_multiple: int = 1,
) -> tf.data.Dataset:
    """Endless, shuffled train batches, starting after `skip_batches` batches: with
    `data.input_order` "per_process" this process's block (`process_index` of `process_count`)
    of each global batch, read from its own part of the data; with "global" the whole global
    batch, read by every process in one order, whose block the caller keeps (`block_of`) so that
    the batches do not depend on the process count.

    Rows per batch: `data.batch_size` (padded or packed), or with `data.token_budget` a number
    that depends on the length bucket and is a multiple of `batch_multiple`.

    The order depends only on `config.seed`, so a resumed run sees the batches it would have.
    """
    data = config.data
    if data.input_order not in ("per_process", "global"):
        raise ValueError(
            f"data.input_order must be 'per_process' or 'global', got {data.input_order!r}"
        )
    if data.input_order == "global":
        batch_multiple *= process_count  # each block a multiple of the local devices
        process_index, process_count = 0, 1  # read as the only process would
    split = tfds.split_for_jax_process(
        "train", process_index=process_index, process_count=process_count
    )
    ds = builder.as_dataset(
        split=split,
        shuffle_files=True,
        read_config=tfds.ReadConfig(shuffle_seed=config.seed),
    )
    ds = text_pairs(ds, data).shuffle(
        data.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True
    )
    ds = ds.repeat()
    lengths = Lengths(data.max_source_length, data.max_target_length)
    feature_lengths = lengths.feature_lengths(config.model.type)
    if data.spm_sampling_alpha:
        if not hasattr(tokenizer, "sampled"):
            raise ValueError("data.spm_sampling_alpha samples SentencePiece segmentations, and "
                             "this data has none (a built-in task): set it to 0")
        tokenizer = tokenizer.sampled(data.spm_sampling_alpha, data.spm_sampling_nbest)
        ds = with_sample_seeds(ds, config.seed, process_index)
    ds = limit_length(encode(ds, tokenizer, config.model.type), feature_lengths, data.overlong)
    if data.token_budget and not data.packing:
        ds = token_budget_batches(
            ds, local_batch_size(data.token_budget, process_count), feature_lengths,
            batch_multiple,
        )
    else:
        ds = batch(
            ds, local_batch_size(data.batch_size, process_count), feature_lengths, data.packing,
            config.model.max_segments_per_row,
        )
    return ds.skip(skip_batches).prefetch(AUTOTUNE)


def steps_per_epoch(config: Any, builder: tfds.core.DatasetBuilder, tokenizer: Tokenizer) -> float:
    """Global train batches in one pass over the training split, as `train_dataset` makes them
    (after tokenizing and the length limit): examples over `data.batch_size` for padded rows;
    for packed rows, the rows the examples fill (each takes the larger share of a row of its
    two sides), or the examples over `model.max_segments_per_row` if that is more, over the
    batch size, a lower bound a few percent under what the greedy packer makes; for
    token-budget batches, the longer sides' tokens over the budget."""
    data = config.data
    lengths = Lengths(data.max_source_length, data.max_target_length).feature_lengths(
        config.model.type
    )
    names = sorted(lengths)
    ds = text_pairs(builder.as_dataset(split="train", shuffle_files=False), data)
    ds = limit_length(encode(ds, tokenizer, config.model.type), lengths, data.overlong)
    ds = ds.map(lambda ex: tf.stack([tf.size(ex[name]) for name in names]))
    sizes = np.concatenate([np.zeros((0, len(names)), np.int32),
                            *ds.batch(8192).as_numpy_iterator()])
    if not len(sizes):
        raise ValueError("no training example fits data.max_source_length and "
                         "data.max_target_length; raise them")
    if data.packing:
        shares = sizes / np.array([lengths[name] for name in names])
        rows = float(np.sum(np.max(shares, axis=1)))
        if config.model.max_segments_per_row:  # rows also fill up with examples
            rows = max(rows, len(sizes) / config.model.max_segments_per_row)
        return rows / data.batch_size
    if data.token_budget:
        return float(np.sum(np.max(sizes, axis=1))) / data.token_budget
    return len(sizes) / data.batch_size


def eval_batches(
    config: Any,
    builder: tfds.core.DatasetBuilder,
    tokenizer: Tokenizer,
    split: str,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Block `process_index` of `process_count` of each batch of one pass over a split in file
    order, padded (never packed); the last batch is filled with all-padding rows so that every
    batch has the same shape. Overlong examples are dropped."""
    data = config.data
    if split == "test":
        lengths = Lengths(data.test_max_source_length, data.test_max_target_length)
    else:
        lengths = Lengths(data.max_source_length, data.max_target_length)
    feature_lengths = lengths.feature_lengths(config.model.type)
    # Every process reads the whole split and keeps its rows, so that all run the same number
    # of (collective) eval steps.
    ds = text_pairs(builder.as_dataset(split=split, shuffle_files=False), data)
    ds = limit_length(encode(ds, tokenizer, config.model.type), feature_lengths, "drop")
    size = data.eval_batch_size
    local_batch_size(size, process_count)  # checks that the blocks are equal
    ds = ds.padded_batch(size, padded_shapes={k: [v] for k, v in feature_lengths.items()})
    if data.eval_steps > 0:
        ds = ds.take(data.eval_steps)
    for examples in ds.as_numpy_iterator():
        missing = size - len(next(iter(examples.values())))
        rows = size // process_count
        yield {
            k: np.pad(v, ((0, missing), (0, 0)))[process_index * rows : (process_index + 1) * rows]
            for k, v in examples.items()
        }


class InputIterator:
    """This process's train batches as numpy dicts, with a position that can be saved.

    `save` writes the tf.data iterator's state (shuffle buffer and file positions included) plus
    the batches already taken from it but not yet trained on (`pending`, e.g. those prefetched to
    the devices); `restore` brings both back, so a resumed run sees exactly the batches an
    uninterrupted one would have. The state is this process's own: it restores only with the
    same number of processes.
    """

    def __init__(self, ds: tf.data.Dataset):
        options = tf.data.Options()
        # Lookup tables and the SentencePiece function are static: nothing to save of them.
        options.experimental_external_state_policy = (
            tf.data.experimental.ExternalStatePolicy.IGNORE
        )
        self._iterator = iter(ds.with_options(options))
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        self._replay: list[dict[str, np.ndarray]] = []

    def __iter__(self) -> InputIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._replay:
            return self._replay.pop(0)
        return {k: v.numpy() for k, v in next(self._iterator).items()}

    def save(self, directory: str, pending: list[dict[str, np.ndarray]]) -> None:
        tf.io.gfile.makedirs(directory)
        self._checkpoint.write(os.path.join(directory, "iterator"))
        rows = pending + self._replay
        arrays = {f"{i}/{k}": v for i, batch in enumerate(rows) for k, v in batch.items()}
        buffer = io.BytesIO()  # npz needs a seekable file, which GFile is not
        np.savez(buffer, **arrays)
        with tf.io.gfile.GFile(os.path.join(directory, "pending.npz"), "wb") as f:
            f.write(buffer.getvalue())

    def restore(self, directory: str) -> None:
        self._checkpoint.read(os.path.join(directory, "iterator")).assert_consumed()
        with tf.io.gfile.GFile(os.path.join(directory, "pending.npz"), "rb") as f:
            arrays = dict(np.load(io.BytesIO(f.read())))
        batches: dict[int, dict[str, np.ndarray]] = {}
        for name, value in arrays.items():
            index, key = name.split("/", 1)
            batches.setdefault(int(index), {})[key] = value
        self._replay = [batches[i] for i in sorted(batches)]
