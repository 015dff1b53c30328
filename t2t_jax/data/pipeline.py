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
    """Text pairs -> int32 ids with EOS appended (decoder-only: one sequence with a loss mask)."""
    eos = tf.constant([EOS_ID], tf.int32)

    def to_ids(example):
        source = tf.concat([tokenizer.tf_encode(example["inputs"]), eos], 0)
        target = tf.concat([tokenizer.tf_encode(example["targets"]), eos], 0)
        if model_type != "decoder_only":
            return {"inputs": source, "targets": target}
        mask = tf.concat([tf.zeros_like(source), tf.ones_like(target)], 0)
        return {"targets": tf.concat([source, target], 0), "loss_mask": mask}

    return ds.map(to_ids, num_parallel_calls=AUTOTUNE)


def limit_length(ds: tf.data.Dataset, lengths: dict[str, int], overlong: str) -> tf.data.Dataset:
    """Drops (`overlong="drop"`) or truncates (`"truncate"`) examples longer than `lengths`."""
    if overlong == "truncate":
        return ds.map(lambda ex: {k: v[: lengths[k]] for k, v in ex.items()})
    if overlong != "drop":
        raise ValueError(f"data.overlong must be 'drop' or 'truncate', got {overlong!r}")
    return ds.filter(
        lambda ex: tf.reduce_all([tf.size(v) <= lengths[k] for k, v in ex.items()])
    )


def pack_examples(
    examples: Iterator[dict[str, np.ndarray]], lengths: dict[str, int]
) -> Iterator[dict[str, np.ndarray]]:
    """Greedily packs consecutive examples into rows of `lengths`, with segment ids and positions.

    A row is emitted when the next example does not fit in any of its features.
    """

    def empty_row():
        return {k: [] for k in lengths}, 0

    def emit(row):
        out = {}
        for key, pieces in row.items():
            ids = np.zeros(lengths[key], np.int32)
            segments = np.zeros(lengths[key], np.int32)
            positions = np.zeros(lengths[key], np.int32)
            offset = 0
            for segment, piece in enumerate(pieces, start=1):
                ids[offset : offset + len(piece)] = piece
                segments[offset : offset + len(piece)] = segment
                positions[offset : offset + len(piece)] = np.arange(len(piece))
                offset += len(piece)
            out[key] = ids
            if key != "loss_mask":
                out[f"{key}_segmentation"] = segments
                out[f"{key}_position"] = positions
        return out

    row, used = empty_row()
    for example in examples:
        fits = all(
            sum(len(p) for p in row[k]) + len(example[k]) <= lengths[k] for k in lengths
        )
        if not fits and used:
            yield emit(row)
            row, used = empty_row()
        for key in lengths:
            row[key].append(example[key])
        used += 1
    if used:
        yield emit(row)


def packed_dataset(ds: tf.data.Dataset, lengths: dict[str, int]) -> tf.data.Dataset:
    """`pack_examples` over a tf.data stream of examples."""
    signature = {}
    for key, length in lengths.items():
        signature[key] = tf.TensorSpec([length], tf.int32)
        if key != "loss_mask":
            signature[f"{key}_segmentation"] = tf.TensorSpec([length], tf.int32)
            signature[f"{key}_position"] = tf.TensorSpec([length], tf.int32)
    return tf.data.Dataset.from_generator(
        lambda: pack_examples(ds.as_numpy_iterator(), lengths), output_signature=signature
    )


def batch(
    ds: tf.data.Dataset, batch_size: int, lengths: dict[str, int], packing: bool
) -> tf.data.Dataset:
    """Fixed-shape batches (so the train step compiles once)."""
    if packing:
        ds = packed_dataset(ds, lengths)
        return ds.batch(batch_size, drop_remainder=True)
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


def train_dataset(
    config: Any,
    builder: tfds.core.DatasetBuilder,
    tokenizer: Tokenizer,
    process_index: int = 0,
    process_count: int = 1,
    skip_batches: int = 0,
    batch_multiple: int = 1,
) -> tf.data.Dataset:
    """This process's endless, shuffled train batches, starting after `skip_batches` batches.

    Rows per batch: `data.batch_size` (padded or packed), or with `data.token_budget` a number
    that depends on the length bucket and is a multiple of `batch_multiple`.

    The order depends only on `config.seed`, so a resumed run sees the batches it would have.
    """
    data = config.data
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
    ds = limit_length(encode(ds, tokenizer, config.model.type), feature_lengths, data.overlong)
    if data.token_budget and not data.packing:
        ds = token_budget_batches(
            ds, local_batch_size(data.token_budget, process_count), feature_lengths,
            batch_multiple,
        )
    else:
        ds = batch(
            ds, local_batch_size(data.batch_size, process_count), feature_lengths, data.packing
        )
    return ds.skip(skip_batches).prefetch(AUTOTUNE)


def eval_batches(
    config: Any,
    builder: tfds.core.DatasetBuilder,
    tokenizer: Tokenizer,
    split: str,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a split in file order, padded (never packed); the last batch is filled with
    all-padding rows so that every batch has the same shape. Overlong examples are dropped."""
    data = config.data
    if split == "test":
        lengths = Lengths(data.test_max_source_length, data.test_max_target_length)
    else:
        lengths = Lengths(data.max_source_length, data.max_target_length)
    feature_lengths = lengths.feature_lengths(config.model.type)
    per_process = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count
    )
    ds = text_pairs(builder.as_dataset(split=per_process, shuffle_files=False), data)
    ds = limit_length(encode(ds, tokenizer, config.model.type), feature_lengths, "drop")
    size = local_batch_size(data.eval_batch_size, process_count)
    ds = ds.padded_batch(size, padded_shapes={k: [v] for k, v in feature_lengths.items()})
    if data.eval_steps > 0:
        ds = ds.take(data.eval_steps)
    for examples in ds.as_numpy_iterator():
        missing = size - len(next(iter(examples.values())))
        yield {k: np.pad(v, ((0, missing), (0, 0))) for k, v in examples.items()}
