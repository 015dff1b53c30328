"""Built-in tasks, the TFDS builder, the tokenizer, prepared ids, and padded, packed and
token-budget batches: their plans, their blocks on each host, and their positions."""

import os
import shutil

import numpy as np
import pytest

from t2t_jax import config as config_lib
from t2t_jax.data import algorithmic, batching, loader, prepare, prepared, sources, tasks
from t2t_jax.data.batching import Layout, Lengths, Position
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


def test_builder_prepares_three_splits_with_a_longer_test(tmp_path, capfd):
    builder = algorithmic.algorithmic_builder(
        str(tmp_path), task="reverse", max_length=5, test_max_length=9, num_train=40,
        num_validation=10, num_test=10,
    )
    builder.download_and_prepare()
    said = capfd.readouterr().out
    assert f"generating dataset algorithmic_tasks/{builder.builder_config.name}" in said
    assert "ownload" not in said  # nothing is downloaded, and none is said to be
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


def test_tokenizer_round_trips(tmp_path):
    tokenizer = SymbolTokenizer(tasks.task_symbols("addition", 10))
    text = "3 1 4 + 1 5"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids + [EOS_ID, 5]) == text
    assert tokenizer.encode_batch([text, "2"]) == [ids, tokenizer.encode("2")]
    tokenizer.save(str(tmp_path))
    assert SymbolTokenizer.load(str(tmp_path)).encode(text) == ids
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        SymbolTokenizer.load(str(tmp_path / "missing"))


def test_the_builtin_task_list_is_the_generators():
    assert tuple(algorithmic.TASKS) == sources.BUILTIN_TASKS


def prepared_tiny(config):
    tokenizer = tasks.tokenizer_from_config(config.data)
    return prepare.open_or_prepare(config.data, tokenizer), tokenizer


def test_prepared_ids_are_the_tokenizers_with_eos_and_keep_the_text(tiny_config, caplog,
                                                                    tmp_path):
    dataset, tokenizer = prepared_tiny(tiny_config)
    assert set(dataset.splits) == {"train", "validation", "test"}
    train = dataset.split("train")
    assert train.num_examples == tiny_config.data.algorithmic.num_train
    for side in prepared.SIDES:
        texts = train.texts(side)
        for index in (0, 7, train.num_examples - 1):
            expected = tokenizer.encode(texts[index]) + [EOS_ID]
            assert train.example_ids(side, index).tolist() == expected
        assert train.lengths(side).tolist() == [len(tokenizer.encode(t)) + 1 for t in texts]
    # The targets reverse the sources, as the task says.
    assert train.texts("targets", [3]) == [" ".join(train.texts("inputs", [3])[0].split()[::-1])]
    # Found again without being made again, and keyed by data and tokenizer.
    again = prepare.find(tiny_config.data, tokenizer)
    assert again.directory == dataset.directory and again.key == dataset.key
    # The data dir moves, to another path or host, with its ids: they are found there.
    moved = str(tmp_path / "moved")
    shutil.copytree(tiny_config.data.data_dir, moved)
    with tiny_config.unlocked():
        tiny_config.data.data_dir = moved
    found = prepare.find(tiny_config.data, tokenizer)
    assert found is not None and found.key == dataset.key
    assert found.directory.startswith(moved)
    # Another tokenizer's ids are not these: said, and made anew in a directory of their own.
    other = SymbolTokenizer(tasks.task_symbols("reverse", 12))
    assert prepare.dataset_directory(tiny_config.data, other) != dataset.directory
    with caplog.at_level("WARNING"):
        assert prepare.find(tiny_config.data, other) is None
    assert any("another tokenizer's" in r.getMessage() for r in caplog.records)


def test_hosts_whose_prepared_ids_differ_stop_with_one_line(tiny_config, monkeypatch):
    """Each host plans the global batches from its own copy's lengths: copies that differ
    would plan different batches, so they stop the run."""
    import jax
    from jax.experimental import multihost_utils

    dataset, _ = prepared_tiny(tiny_config)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    other = np.frombuffer(bytes.fromhex("00" * 8), np.uint8).astype(np.int32)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, other]))
    with pytest.raises(ValueError, match="the processes' prepared ids differ .*data.prepared_dir"):
        prepare._same_on_every_host(dataset)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, x]))
    assert prepare._same_on_every_host(dataset) is dataset


def next_fit_rows(planned, capacity):
    """The old packer's rule: one open row, closed when the next example does not fit."""
    rows, fill = 0, None
    for size in planned:
        if fill is None or np.any(fill + size > capacity):
            rows, fill = rows + 1, size.copy()
        else:
            fill = fill + size
    return rows


def first_fit_reference(planned, capacity, max_segments, open_rows, window):
    """`first_fit_rows` written plainly, one example at a time: `open_rows` slots, each an
    empty row or an open one; the first slot with room takes the example; with none, the
    fullest row closes and its slot starts an empty one. Rows are numbered as they open."""
    out = []
    for first in range(0, len(planned), window):
        fill = [np.zeros_like(capacity) for _ in range(open_rows)]
        held, number, opened = [0] * open_rows, [None] * open_rows, 0
        for size in planned[first : first + window]:
            room = [bool(np.all(f + size <= capacity)) and (not max_segments or h < max_segments)
                    for f, h in zip(fill, held, strict=True)]
            if any(room):
                slot = room.index(True)
            else:
                slot = min(range(open_rows), key=lambda s: int((capacity - fill[s]).sum()))
                fill[slot], held[slot], number[slot] = np.zeros_like(capacity), 0, None
            if number[slot] is None:
                number[slot], opened = opened, opened + 1
            fill[slot] = fill[slot] + size
            held[slot] += 1
            out.append(number[slot] + (max(out[:first], default=-1) + 1))
    return np.array(out)


@pytest.mark.parametrize("max_segments", [0, 3])
def test_first_fit_keeps_rows_within_capacity_and_follows_its_rule(max_segments):
    rng = np.random.default_rng(0)
    planned = np.stack([rng.integers(1, 30, 3000), rng.integers(1, 30, 3000)], axis=1)
    capacity = np.array([64, 64])
    rows = batching.first_fit_rows(planned, capacity, max_segments, open_rows=8, window=512)
    np.testing.assert_array_equal(
        rows, first_fit_reference(planned, capacity, max_segments, 8, 512))
    sums = np.zeros((rows.max() + 1, 2), np.int64)
    np.add.at(sums, rows, planned)
    assert (sums <= capacity).all()
    if max_segments:
        assert np.bincount(rows).max() == max_segments
    else:  # first fit over open rows fills better than one open row
        assert rows.max() + 1 < 0.97 * next_fit_rows(planned, capacity)


def write_split(directory, sources, targets):
    writer = prepared.SplitWriter(str(directory), "train", 100)
    writer.append({"inputs": sources, "targets": targets},
                  {"inputs": [b"s"] * len(sources), "targets": [b"t"] * len(targets)})
    return prepared.Split(str(directory), "train", writer.close())


def test_packed_rows_lay_examples_side_by_side_with_segments_and_positions(tmp_path):
    split = write_split(tmp_path, [[5, 6, 1], [8, 1], [4, 4, 4, 1]], [[7, 1], [9, 9, 1], [3, 1]])
    layout = Layout(Lengths(6, 6), packing=True)
    pieces = layout.pieces(split.lengths("inputs"), split.lengths("targets"))
    plan = batching.EpochPlan(np.array([0, 1, 2]), np.array([0, 2, 3]), pieces)
    spec = batching.block_spec(lambda _: plan, [(0, 0, 2)], 3, layout.feature_lengths)
    batch = loader.Gatherer(split, layout)(spec)
    np.testing.assert_array_equal(batch["inputs"], [[5, 6, 1, 8, 1, 0], [4, 4, 4, 1, 0, 0],
                                                    [0] * 6])
    np.testing.assert_array_equal(batch["inputs_segmentation"][0], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(batch["inputs_position"][0], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(batch["targets"][0], [7, 1, 9, 9, 1, 0])
    np.testing.assert_array_equal(batch["targets_position"][0], [0, 1, 0, 1, 2, 0])
    # The decoder-only model reads source then target as one sequence, its loss on the target.
    lm = Layout(Lengths(4, 4), decoder_only=True, packing=True)
    spec = batching.block_spec(lambda _: plan, [(0, 1, 2)], 1, lm.feature_lengths)
    row = loader.Gatherer(split, lm)(spec)
    np.testing.assert_array_equal(row["targets"], [[4, 4, 4, 1, 3, 1, 0, 0]])
    np.testing.assert_array_equal(row["loss_mask"], [[0, 0, 0, 0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(row["targets_position"], [[0, 1, 2, 3, 4, 5, 0, 0]])


def train_input(config, dataset, position=None, block=(0, 1), workers=0, multiple=1):
    planner = loader.make_planner(config, dataset.split("train"), None, block, multiple)
    return loader.TrainInput(dataset.split("train"), planner, position or Position(), workers)


def take(batches, count):
    out = [next(batches) for _ in range(count)]
    batches.close()
    return out


def assert_batches_equal(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("packing", [False, True])
def test_train_batches_have_fixed_shapes_and_end_with_eos(tiny_config, packing):
    tiny_config.data.packing = packing
    dataset, _ = prepared_tiny(tiny_config)
    for batch in take(train_input(tiny_config, dataset), 3):
        assert batch["inputs"].shape == (16, 8) and batch["targets"].shape == (16, 8)
        # Every example (or packed segment) of the target ends with EOS.
        assert (batch["targets"] == EOS_ID).sum() >= 16
    if packing:
        assert batch["targets_segmentation"].max() > 1
        # model.max_segments_per_row (cuDNN's packed spans) bounds the examples a row holds.
        tiny_config.model.max_segments_per_row = 2
        capped = take(train_input(tiny_config, dataset), 3)
        assert max(b["inputs_segmentation"].max() for b in capped) == 2
        with pytest.raises(ValueError, match="max_segments_per_row must be 0 .* or at least 2"):
            ModelConfig(vocab_size=13, max_segments_per_row=1)


def test_each_epoch_is_a_new_permutation_of_every_example(tiny_config):
    dataset, _ = prepared_tiny(tiny_config)
    split = dataset.split("train")
    planner = loader.make_planner(tiny_config, split)
    first, second = planner.plan(0), planner.plan(1)
    assert sorted(first.examples) == sorted(second.examples) == list(range(split.num_examples))
    assert not np.array_equal(first.examples, second.examples)
    # Batches run on across the epoch boundary: 256 examples are 16 batches of 16.
    batches = take(train_input(tiny_config, dataset), 17)
    seen = {tuple(row) for batch in batches[:16] for row in batch["inputs"]}
    expected = {tuple(row) for row in loader.Gatherer(split, planner.layout)(
        batching.block_spec(planner.plan, [(0, 0, 256)], 256,
                            planner.layout.feature_lengths))["inputs"]}
    assert seen == expected
    planner.close()


@pytest.mark.parametrize("mode", ["packed", "token_budget"])
def test_a_resumed_input_gives_the_batches_of_an_uninterrupted_one(tiny_config, mode):
    tiny_config.data.packing = mode == "packed"
    tiny_config.data.token_budget = 128 if mode == "token_budget" else 0
    dataset, _ = prepared_tiny(tiny_config)
    whole = take(train_input(tiny_config, dataset), 40)  # past the end of the first epoch
    interrupted = train_input(tiny_config, dataset)
    take_some = [next(interrupted) for _ in range(23)]
    saved = Position.from_json(interrupted.position.to_json())  # what a checkpoint holds
    interrupted.close()
    assert saved.epoch >= 1  # resumed in a later epoch than the first
    assert_batches_equal(take_some + take(train_input(tiny_config, dataset, saved), 17), whole)
    # Worker processes give the same batches as the thread, and stop when it closes (none
    # terminated), their plans removed.
    with_workers = train_input(tiny_config, dataset, saved, workers=2)
    plans = with_workers.planner.store.directory
    assert_batches_equal(take(with_workers, 17), whole[23:])
    assert with_workers._workers.exitcodes() == [0, 0] and not os.path.exists(plans)


@pytest.mark.parametrize("mode", ["padded", "packed", "token_budget"])
def test_hosts_read_their_own_rows_of_the_same_global_batches(tiny_config, mode):
    tiny_config.data.packing = mode == "packed"
    tiny_config.data.token_budget = 100 if mode == "token_budget" else 0
    dataset, _ = prepared_tiny(tiny_config)
    single = take(train_input(tiny_config, dataset, multiple=4), 20)
    for count in (2, 4):
        hosts = [take(train_input(tiny_config, dataset, block=(i, count), multiple=4 // count),
                      20) for i in range(count)]
        for step, expected in enumerate(single):
            for key, value in expected.items():
                np.testing.assert_array_equal(
                    np.concatenate([host[step][key] for host in hosts]), value, err_msg=key)
    if mode == "token_budget":  # rows are a multiple of every block's devices
        assert all(len(b["inputs"]) % 4 == 0 for b in single)


def test_token_budget_batches_stay_within_budget_in_few_shapes(tiny_config):
    tiny_config.data.token_budget = 64
    tiny_config.data.algorithmic.max_length = 20
    tiny_config.data.algorithmic.test_max_length = 22
    tiny_config.data.max_source_length = tiny_config.data.max_target_length = 21
    dataset, _ = prepared_tiny(tiny_config)
    shapes = set()
    for batch in take(train_input(tiny_config, dataset, multiple=2), 20):
        rows, length = batch["inputs"].shape
        assert batch["targets"].shape == (rows, length)
        real = int((batch["inputs"] > 0).any(axis=1).sum())
        # budget // length examples, in rows rounded up to the multiple of 2 devices
        assert rows % 2 == 0 and real <= 64 // length and rows - real < 2 + 64 // length
        # No example was cut: each non-empty row of targets still ends with its EOS.
        assert ((batch["targets"] == EOS_ID).sum(axis=1) == (batch["targets"] > 0).any(1)).all()
        shapes.add((rows, length))
    assert 1 < len(shapes) <= 3  # buckets of 8, 16 and 21 tokens


def test_eval_batches_give_each_process_its_rows_and_the_decoder_only_mask(tiny_config):
    dataset, _ = prepared_tiny(tiny_config)
    split = dataset.split("validation")
    layout = loader.eval_layout(tiny_config, "validation")
    seen = []
    for index in range(2):
        batches = list(loader.eval_batches(split, layout, 16, (index, 2)))
        assert all(b["inputs"].shape == (8, 8) for b in batches)
        seen.append([tuple(row) for b in batches for row in b["inputs"] if row.any()])
    assert len(seen[0]) + len(seen[1]) == split.num_examples
    assert not set(seen[0]) & set(seen[1])
    tiny_config.model.type = "decoder_only"
    batch = next(loader.eval_batches(split, loader.eval_layout(tiny_config, "validation"), 16))
    assert batch["targets"].shape == (16, 16)
    row, mask = batch["targets"][0], batch["loss_mask"][0]
    first_eos = list(row).index(EOS_ID)
    assert not mask[: first_eos + 1].any() and mask[first_eos + 1] == 1


def test_decoder_only_rows_pack_with_their_loss_mask(tiny_config):
    tiny_config.model.type = "decoder_only"
    tiny_config.data.packing = True
    dataset, _ = prepared_tiny(tiny_config)
    [batch] = take(train_input(tiny_config, dataset), 1)
    assert batch["targets"].shape == batch["loss_mask"].shape == (16, 16)
    assert batch["targets_segmentation"].max() > 1
    # The loss mask covers target tokens only, never padding.
    assert not (batch["loss_mask"] & (batch["targets"] == 0)).any()


def test_a_retired_setting_is_a_one_line_error_naming_the_change(tiny_config):
    tiny_config.data.input_order = "global"
    with pytest.raises(ValueError, match="data.input_order was retired: .* remove"):
        config_lib.check_retired(tiny_config)


def test_a_resumed_prepare_reads_on_from_its_example_over_several_shards(tmp_path, monkeypatch,
                                                                       tiny_config):
    import tensorflow_datasets as tfds

    builder = algorithmic.algorithmic_builder(str(tmp_path), task="copy", num_train=300)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
    assert len(builder.info.splits["train"].shard_lengths) == 3
    monkeypatch.setattr(prepare, "CHUNK_EXAMPLES", 64)

    def read(start):
        chunks = prepare._text_chunks(builder, "train", tiny_config.data, start)
        return [text for chunk in chunks for text in chunk["inputs"]]

    whole = read(0)
    assert len(whole) == 300 and read(130) == whole[130:]


def test_a_killed_prepare_resumes_and_is_never_taken_for_complete(tiny_config, monkeypatch,
                                                                   tmp_path):
    tiny_config.data.prepared_dir = str(tmp_path / "prepared")
    tokenizer = tasks.tokenizer_from_config(tiny_config.data)
    monkeypatch.setattr(prepare, "CHUNK_EXAMPLES", 50)
    commits = []

    def killed_after_two_chunks(self):
        commits.append(self.split)
        if len(commits) == 3:
            raise KeyboardInterrupt  # as a kill would, after two committed chunks
        original(self)

    original = prepared.SplitWriter.commit
    monkeypatch.setattr(prepared.SplitWriter, "commit", killed_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        prepare.open_or_prepare(tiny_config.data, tokenizer)
    assert prepare.find(tiny_config.data, tokenizer) is None  # incomplete: no manifest
    commits.clear()

    def counted(self):
        commits.append(self.split)
        original(self)

    monkeypatch.setattr(prepared.SplitWriter, "commit", counted)
    resumed = prepare.open_or_prepare(tiny_config.data, tokenizer)
    # 256 train examples are 6 chunks of 50: the two committed before the kill are kept.
    assert commits.count("train") == 4 + 1  # the rest, and the close
    tiny_config.data.prepared_dir = str(tmp_path / "fresh")
    fresh = prepare.open_or_prepare(tiny_config.data, tokenizer)
    for name in os.listdir(fresh.directory):
        if name.endswith((".ids", ".offsets", ".text")):
            with open(os.path.join(fresh.directory, name), "rb") as a, \
                    open(os.path.join(resumed.directory, name), "rb") as b:
                assert a.read() == b.read(), name
    assert resumed.manifest["splits"] == fresh.manifest["splits"]


def test_workers_blocked_sending_stop_when_the_input_closes(tiny_config, tmp_path):
    """Batches of 128 KiB, larger than a pipe holds: each worker is still sending one when the
    input closes. They stop on their own (exit code 0), none is waited out and terminated."""
    tiny_config.data.data_dir = str(tmp_path)
    tiny_config.data.algorithmic.num_train = 4096
    tiny_config.data.batch_size = 2048
    dataset, _ = prepared_tiny(tiny_config)
    batches = train_input(tiny_config, dataset, workers=2)
    assert sum(v.nbytes for v in next(batches).values()) > 100_000
    batches.close()
    assert batches._workers.exitcodes() == [0, 0]


def test_a_failing_worker_is_a_clear_error_in_the_training_process(tiny_config, tmp_path):
    dataset, _ = prepared_tiny(tiny_config)
    split = dataset.split("train")
    broken = prepared.Split(split.directory, "train", split.info | {"ids_dtype": "<u8"})
    planner = loader.make_planner(tiny_config, broken)
    batches = loader.TrainInput(broken, planner, Position(), workers=1)
    with pytest.raises(RuntimeError, match="(?s)input worker 0 failed:.*IndexError: index"):
        next(batches)
    batches.close()
