"""Built-in tasks, the TFDS builder, the tokenizer, and padded and packed batches."""

import numpy as np
import pytest
import tensorflow as tf

from t2t_jax.data import algorithmic, pipeline, tasks
from t2t_jax.data.tokenizer import EOS_ID, SymbolTokenizer
from t2t_jax.model import ModelConfig


def pairs(task, **kw):
    args = dict(vocab_size=10, min_length=1, max_length=8, count=50, seed=3) | kw
    return list(algorithmic.generate_examples(task, **args))


def test_tasks_compute_their_function():
    for source, target in pairs("reverse"):
        assert target.split() == source.split()[::-1]
    for source, target in pairs("copy"):
        assert target == source
    for source, target in pairs("sort"):
        assert [int(t) for t in target.split()] == sorted(int(s) for s in source.split())
    for source, target in pairs("addition"):
        first, second = source.replace(" ", "").split("+")
        assert int(target.replace(" ", "")) == int(first) + int(second)


def test_addition_works_in_other_bases():
    for source, target in pairs("addition", vocab_size=16):
        first, second = source.split(" + ")
        value = int("".join(f"{int(d):x}" for d in first.split()), 16) + int(
            "".join(f"{int(d):x}" for d in second.split()), 16
        )
        assert int("".join(f"{int(d):x}" for d in target.split()), 16) == value


def test_generation_is_deterministic_and_seeded():
    assert pairs("reverse") == pairs("reverse")
    assert pairs("reverse") != pairs("reverse", seed=4)


def test_lengths_stay_in_range():
    lengths = {len(s.split()) for s, _ in pairs("sort", min_length=3, max_length=5, count=200)}
    assert lengths == {3, 4, 5}


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown data.task 'rev'"):
        pairs("rev")


def test_builder_prepares_three_splits_with_a_longer_test(data_dir):
    builder = algorithmic.algorithmic_builder(
        data_dir, task="reverse", max_length=5, test_max_length=9, num_train=40,
        num_validation=10, num_test=10,
    )
    builder.download_and_prepare()
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 40, "validation": 10, "test": 10
    }
    train = list(builder.as_dataset(split="train").as_numpy_iterator())
    test = list(builder.as_dataset(split="test").as_numpy_iterator())
    assert max(len(ex["inputs"].split()) for ex in train) <= 5
    assert min(len(ex["inputs"].split()) for ex in test) >= 6
    for ex in train:
        assert ex["targets"].split() == ex["inputs"].split()[::-1]


def test_registered_config_names_are_accepted(data_dir):
    builder = algorithmic.algorithmic_builder(data_dir, task="copy")
    assert builder.builder_config.task == "copy"


def test_tokenizer_round_trips_and_matches_tf(tmp_path):
    tokenizer = SymbolTokenizer(algorithmic.task_symbols("addition", 10))
    text = "3 1 4 + 1 5"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids + [EOS_ID, 5]) == text
    assert ids == tokenizer.tf_encode(tf.constant(text)).numpy().tolist()
    tokenizer.save(str(tmp_path))
    assert SymbolTokenizer.load(str(tmp_path)).encode(text) == ids
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        SymbolTokenizer.load(str(tmp_path / "missing"))


def test_pack_examples_fills_rows_with_segments_and_positions():
    examples = [
        {"inputs": np.array([5, 6, 1]), "targets": np.array([7, 1])},
        {"inputs": np.array([8, 1]), "targets": np.array([9, 9, 1])},
        {"inputs": np.array([4, 4, 4, 1]), "targets": np.array([3, 1])},
    ]
    examples = [{k: v.astype(np.int32) for k, v in ex.items()} for ex in examples]
    rows = pipeline.pack_lists(examples, {"inputs": 6, "targets": 6})
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[0]["inputs"], [5, 6, 1, 8, 1, 0])
    np.testing.assert_array_equal(rows[0]["inputs_segmentation"], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(rows[0]["inputs_position"], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(rows[0]["targets"], [7, 1, 9, 9, 1, 0])
    np.testing.assert_array_equal(rows[0]["targets_position"], [0, 1, 0, 1, 2, 0])
    np.testing.assert_array_equal(rows[1]["inputs"], [4, 4, 4, 1, 0, 0])
    # At most one example a row: each example gets its own.
    capped = pipeline.pack_lists(examples, {"inputs": 6, "targets": 6}, max_segments=1)
    assert [row["inputs_segmentation"].max() for row in capped] == [1, 1, 1]
    np.testing.assert_array_equal(capped[1]["targets"], [9, 9, 1, 0, 0, 0])


@pytest.mark.parametrize("packing", [False, True])
def test_train_batches_have_fixed_shapes_and_end_with_eos(tiny_config, packing):
    tiny_config.data.packing = packing
    builder = tasks.builder_from_config(tiny_config.data)
    tokenizer = tasks.tokenizer_from_config(tiny_config.data)
    ds = pipeline.train_dataset(tiny_config, builder, tokenizer)
    batches = list(ds.take(3).as_numpy_iterator())
    for batch in batches:
        assert batch["inputs"].shape == (16, 8) and batch["targets"].shape == (16, 8)
        # Every example (or packed segment) of the target ends with EOS.
        assert (batch["targets"] == EOS_ID).sum() >= 16
    if packing:
        assert batches[0]["targets_segmentation"].max() > 1
        # model.max_segments_per_row (cuDNN's packed spans) bounds the examples a row holds.
        tiny_config.model.max_segments_per_row = 2
        ds = pipeline.train_dataset(tiny_config, builder, tokenizer)
        capped = list(ds.take(3).as_numpy_iterator())
        assert max(b["inputs_segmentation"].max() for b in capped) == 2
        with pytest.raises(ValueError, match="max_segments_per_row must be 0 .* or at least 2"):
            ModelConfig(vocab_size=13, max_segments_per_row=1)


def test_resumed_pipeline_continues_where_it_stopped(tiny_config):
    builder = tasks.builder_from_config(tiny_config.data)
    tokenizer = tasks.tokenizer_from_config(tiny_config.data)
    whole = list(pipeline.train_dataset(tiny_config, builder, tokenizer).take(5))
    resumed = list(pipeline.train_dataset(tiny_config, builder, tokenizer, skip_batches=3).take(2))
    for a, b in zip(whole[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_processes_read_disjoint_halves(tiny_config):
    builder = tasks.builder_from_config(tiny_config.data)
    tokenizer = tasks.tokenizer_from_config(tiny_config.data)
    seen = []
    for index in range(2):
        batches = pipeline.eval_batches(tiny_config, builder, tokenizer, "validation", index, 2)
        seen.append({tuple(row) for b in batches for row in b["inputs"] if row.any()})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_decoder_only_batches_mask_the_source(tiny_config):
    tiny_config.model.type = "decoder_only"
    builder = tasks.builder_from_config(tiny_config.data)
    tokenizer = tasks.tokenizer_from_config(tiny_config.data)
    batch = next(iter(pipeline.eval_batches(tiny_config, builder, tokenizer, "validation")))
    assert batch["targets"].shape == (16, 16)
    row, mask = batch["targets"][0], batch["loss_mask"][0]
    first_eos = list(row).index(EOS_ID)
    assert not mask[: first_eos + 1].any() and mask[first_eos + 1] == 1


def test_token_budget_batches_stay_within_budget_in_few_shapes(tiny_config):
    tiny_config.data.token_budget = 64
    tiny_config.data.algorithmic.max_length = 20
    tiny_config.data.algorithmic.test_max_length = 22
    tiny_config.data.max_source_length = tiny_config.data.max_target_length = 21
    builder = tasks.builder_from_config(tiny_config.data)
    tokenizer = tasks.tokenizer_from_config(tiny_config.data)
    ds = pipeline.train_dataset(tiny_config, builder, tokenizer, batch_multiple=2)
    shapes = set()
    for batch in ds.take(20).as_numpy_iterator():
        rows, length = batch["inputs"].shape
        assert batch["targets"].shape == (rows, length)
        assert rows % 2 == 0 and rows * length <= 64
        # No example was cut: each row of targets still ends with its EOS.
        assert ((batch["targets"] == EOS_ID).sum(axis=1) == 1).all()
        shapes.add((rows, length))
    assert 1 < len(shapes) <= 3  # buckets of 8, 16 and 21 tokens


def test_decoder_only_rows_pack_with_their_loss_mask(tiny_config):
    tiny_config.model.type = "decoder_only"
    tiny_config.data.packing = True
    builder = tasks.builder_from_config(tiny_config.data)
    tokenizer = tasks.tokenizer_from_config(tiny_config.data)
    batch = next(pipeline.train_dataset(tiny_config, builder, tokenizer).as_numpy_iterator())
    assert batch["targets"].shape == batch["loss_mask"].shape == (16, 16)
    assert batch["targets_segmentation"].max() > 1
    # The loss mask covers target tokens only, never padding.
    assert not (batch["loss_mask"] & (batch["targets"] == 0)).any()


def test_saved_input_position_resumes_exactly_with_pending_batches(tiny_config, tmp_path):
    tiny_config.data.packing = True
    builder = tasks.builder_from_config(tiny_config.data)
    tokenizer = tasks.tokenizer_from_config(tiny_config.data)

    def fresh():
        return pipeline.InputIterator(pipeline.train_dataset(tiny_config, builder, tokenizer))

    uninterrupted = fresh()
    whole = [next(uninterrupted) for _ in range(8)]
    first = fresh()
    taken = [next(first) for _ in range(5)]  # 3 trained on, 2 prefetched but not trained on
    first.save(str(tmp_path), pending=taken[3:])
    resumed = fresh()
    resumed.restore(str(tmp_path))
    for expected in whole[3:]:
        got = next(resumed)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_our_builders_do_not_print_tfds_custom_config_warnings(tiny_config, caplog):
    from t2t_jax.data import tasks

    with caplog.at_level("INFO"):
        for split in ("train", "test"):
            tasks.builder_from_config(tiny_config.data, split=split)
    assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()]
