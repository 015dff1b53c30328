"""Real text: your own parallel files, SentencePiece, BLEU, WMT configs on mock data."""

import gzip
import importlib.util
import json
import math
import os
import random

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from t2t_jax import bleu, checkpoint, selection
from t2t_jax.data import batching, loader, parallel_text, prepare, prepared, tasks
from t2t_jax.data import planner as planner_lib
from t2t_jax.data.batching import Position
from t2t_jax.data.planner import uniforms
from t2t_jax.data.tokenizer import (
    EOS_ID,
    SentencePieceTokenizer,
    load_tokenizer,
    tokenizer_from_json,
)
from t2t_jax.train import train_and_evaluate

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "über", "Straße", "red"]


def sentences(count, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) for _ in range(count)]


def write(path, lines, gz=False):
    data = "".join(line + "\n" for line in lines).encode()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    """Source sentences and their reversal, as train (gzipped), eval and test file pairs."""
    files = {}
    for split, count, seed in (("train", 300, 0), ("eval", 20, 1), ("test", 20, 2)):
        source = sentences(count, seed)
        target = [" ".join(s.split()[::-1]) for s in source]
        gz = split == "train"
        suffix = ".gz" if gz else ""
        files[f"{split}_source"] = write(tmp_path / f"{split}.src{suffix}", source, gz)
        files[f"{split}_target"] = write(tmp_path / f"{split}.tgt{suffix}", target, gz)
    return files


def load_config(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def small_text_config(data_dir, files):
    config = load_config("configs/parallel_text.py")
    config.data.data_dir = data_dir
    config.data.update(files)
    config.data.spm_vocab_size = 300
    config.data.max_source_length = config.data.max_target_length = 16
    config.data.test_max_source_length = config.data.test_max_target_length = 16
    config.data.batch_size = config.data.eval_batch_size = 8
    config.model.update(num_encoder_layers=1, num_decoder_layers=1, d_model=32, d_ff=64,
                        num_heads=4, dropout_rate=0.0, vocab_size=None)
    config.train.update(num_steps=4, log_every=2, eval_every=4, checkpoint_every=4,
                        bleu_every=4, bleu_examples=8, num_decode_examples=1,
                        compilation_cache_dir="", async_checkpoints=False, warmup_steps=10)
    return config


def test_misaligned_files_name_the_file_and_line(tmp_path):
    source = write(tmp_path / "a.src", ["x y", "z"])
    target = write(tmp_path / "a.tgt", ["y x", "z", "extra"])
    with pytest.raises(ValueError, match=r"a\.tgt goes on at line 3.*aligned"):
        parallel_text.check_pairs(source, target)


def test_empty_line_names_the_file_and_line(tmp_path):
    source = write(tmp_path / "b.src", ["x y", "  ", "z"])
    target = write(tmp_path / "b.tgt", ["y x", "q", "z"])
    with pytest.raises(ValueError, match=r"b\.src:2: empty line"):
        parallel_text.check_pairs(source, target)


def test_tsv_and_gzip_are_read(tmp_path):
    tsv = write(tmp_path / "c.tsv.gz", ["a b\tb a", "c\tc"], gz=True)
    assert list(parallel_text.read_pairs(tsv, None)) == [("a b", "b a"), ("c", "c")]
    bad = write(tmp_path / "d.tsv", ["only one field"])
    with pytest.raises(ValueError, match=r"d\.tsv:1: expected 'source<TAB>target'"):
        parallel_text.check_pairs(bad, None)


def test_missing_file_is_a_clear_error(tiny_config, tmp_path):
    tiny_config.data.task = "parallel_text"
    tiny_config.data.train_source = str(tmp_path / "nope.src")
    tiny_config.data.train_target = str(tmp_path / "nope.tgt")
    with pytest.raises(FileNotFoundError, match="nope.src: no such file"):
        tasks.builder_from_config(tiny_config.data)


def test_sentencepiece_round_trips_text_and_encodes_batches_alike(tmp_path):
    tokenizer = SentencePieceTokenizer.train(iter(sentences(500, 3)), vocab_size=300)
    texts = ["the cat sat", "Straße über a red dog", "unseen Wörter: 42!"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids + [EOS_ID, 7]) == text
    assert tokenizer.encode_batch(texts, threads=2) == [tokenizer.encode(t) for t in texts]
    tokenizer.save(str(tmp_path))
    assert load_tokenizer(str(tmp_path)).encode("the cat") == tokenizer.encode("the cat")
    restored = tokenizer_from_json(json.loads(json.dumps(tokenizer.to_json())))
    assert restored.encode("red dog") == tokenizer.encode("red dog")


def test_subword_sampling_draws_from_the_nbest_by_p_to_the_alpha(tiny_config):
    tokenizer = SentencePieceTokenizer.train(iter(sentences(500, 3)), vocab_size=300)
    sampled = tokenizer.sampled(0.2, nbest=8)
    text = "the red cat sat on a mat far über Straße"
    [(candidates, logps)] = sampled.nbest([text], 8)
    assert all(tokenizer.decode(c) == text for c in candidates)
    # The log-probabilities are SentencePiece's own n-best scores, up to a constant per text.
    nbest = tokenizer._processor.nbest_encode(text, nbest_size=8, return_type="proto").nbests
    assert candidates == [[p.id for p in n.pieces] for n in nbest]
    assert np.ptp(np.array(logps) - [n.score for n in nbest]) < 1e-3
    # 200 examples of this text, drawn with evenly spread numbers: each candidate's share of
    # the draws is its weight, P^alpha normalized.
    lengths = np.tile([len(c) + 1 for c in candidates], 200)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    first = np.arange(0, 201 * len(candidates), len(candidates))
    logp = np.tile(np.array(logps, np.float32), 200)
    draws = np.linspace(0, 0.999, 200)
    pick, length = batching.draw_candidates(first, offsets, logp, draws, 0.2, 64)
    assert (pick >= first[:-1]).all() and (pick < first[1:]).all()
    weights = np.exp(0.2 * np.array(logps))
    shares = np.bincount(pick - first[:-1], minlength=len(candidates)) / 200
    np.testing.assert_allclose(shares, weights / weights.sum(), atol=0.006)
    np.testing.assert_array_equal(length, lengths[pick])
    # Only candidates within the limit are drawn (the best always is: see the planner).
    shortest = min(len(c) + 1 for c in candidates)
    _, capped = batching.draw_candidates(first, offsets, logp, draws, 0.2, shortest)
    assert set(capped) == {shortest}
    # The uniform numbers depend on (seed, epoch, example, side) alone.
    examples = np.arange(1000)
    u = uniforms(0, np.zeros(1000), examples, 0)
    assert ((u >= 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.03
    np.testing.assert_array_equal(u[500:], uniforms(0, np.zeros(500), examples[500:], 0))
    for other in (uniforms(1, np.zeros(1000), examples, 0),
                  uniforms(0, np.ones(1000), examples, 0),
                  uniforms(0, np.zeros(1000), examples, 1)):
        assert np.corrcoef(u, other)[0, 1] < 0.1
    assert sampled.encode(text) == tokenizer.encode(text)
    with pytest.raises(ValueError, match="spm_sampling_alpha must be in"):
        tokenizer.sampled(0.0)
    tiny_config.data.spm_sampling_alpha = 0.1  # a built-in task has no SentencePiece
    with pytest.raises(ValueError, match="spm_sampling_alpha samples SentencePiece"):
        loader.sampling_tokenizer(tiny_config, tasks.tokenizer_from_config(tiny_config.data))


def text_input(config, dataset, tokenizer, position=None, workers=0):
    split = dataset.split("train")
    sampler = loader.sampling_tokenizer(config, tokenizer)
    planner = loader.make_planner(config, split, sampler)
    return loader.TrainInput(split, planner, position or Position(), workers)


def take(batches, count):
    out = [next(batches) for _ in range(count)]
    batches.close()
    return out


def test_resumed_input_draws_the_same_sampled_segmentations(data_dir, corpus, tmp_path,
                                                             monkeypatch):
    config = small_text_config(data_dir, corpus)
    tokenizer = tasks.tokenizer_from_config(config.data, str(tmp_path))
    dataset = prepare.open_or_prepare(config.data, tokenizer)
    config.data.spm_sampling_alpha = 0.5
    straight = take(text_input(config, dataset, tokenizer), 6)
    config.data.spm_sampling_alpha = 0.0
    plain = take(text_input(config, dataset, tokenizer), 6)
    assert not all(np.array_equal(a["inputs"], b["inputs"])  # sampling changed segmentations
                   for a, b in zip(plain, straight, strict=True))
    config.data.spm_sampling_alpha = 0.5
    interrupted = text_input(config, dataset, tokenizer)
    take(interrupted, 3)
    position = interrupted.position
    # Resumed, and drawn by a worker process instead of a thread: the same batches.
    for again in (take(text_input(config, dataset, tokenizer, position), 3),
                  take(text_input(config, dataset, tokenizer, position, workers=1), 3)):
        for a, b in zip(again, straight[3:], strict=True):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Drawn a few examples at a time (as a large corpus is): the same batches.
    monkeypatch.setattr(planner_lib, "DRAW_EXAMPLES", 7)
    for a, b in zip(take(text_input(config, dataset, tokenizer), 6), straight, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    # The n-best lists, computed once, are the same from worker processes.
    candidates = prepare.prepared.Candidates(dataset.split("train"), 64)
    def read(kind):
        with open(candidates.path("targets", kind), "rb") as f:
            return f.read()

    files = {kind: read(kind) for kind in ("ids", "offsets", "first", "logp")}
    os.remove(candidates.done_path)
    prepare.prepared.ensure_candidates(dataset.split("train"), tokenizer.sampled(0.5), 64,
                                       workers=2, chunk=100)
    for kind, data in files.items():
        assert read(kind) == data, kind
    # Every drawn segmentation decodes to its sentence.
    sources = set(dataset.split("train").texts("inputs"))
    for row, segments in zip(straight[0]["inputs"], straight[0]["inputs_segmentation"],
                             strict=True):
        for segment in range(1, segments.max() + 1):
            assert tokenizer.decode(list(row[segments == segment])) in sources


def test_bleu_is_sacrebleu_13a_cased():
    refs = ["The cat sat on the mat .", "A dog ran far ."]
    score, signature = bleu.corpus_bleu(refs, refs)
    assert score == pytest.approx(100.0)
    assert "tok:13a" in signature and "case:mixed" in signature
    lower, _ = bleu.corpus_bleu([r.lower() for r in refs], refs)
    assert lower < 100.0


def test_training_on_own_files_logs_bleu_and_keeps_the_tokenizer(data_dir, corpus, tmp_path):
    config = small_text_config(data_dir, corpus)
    config.data.spm_sampling_alpha = 0.1  # training batches through subword sampling
    config.train.select_by = "eval_loss"  # the best checkpoint by validation loss
    workdir = str(tmp_path / "run")
    result = train_and_evaluate(config, workdir, jax.devices()[:1])
    assert 0.0 <= result["bleu"] <= 100.0 and "tok:13a" in result["bleu_signature"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert any(row["step"] == 4 and "bleu" in row for row in rows)
    spm = load_tokenizer(workdir)
    assert isinstance(spm, SentencePieceTokenizer)
    manager = checkpoint.make_manager(workdir, config.train)
    carried = checkpoint.restore_tokenizer(manager, 4)
    manager.close()
    assert carried.encode("the red cat") == spm.encode("the red cat")
    # A second run reuses the saved tokenizer rather than training another.
    mtime = os.path.getmtime(os.path.join(workdir, "spm.model"))
    config.train.num_steps = 6
    train_and_evaluate(config, workdir, jax.devices()[:1])
    assert os.path.getmtime(os.path.join(workdir, "spm.model")) == mtime
    # The best is the lowest validation loss of the evaluations at steps 4 and 6 (the resumed
    # run compared against the first's).
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = {row["step"]: row["eval_loss"] for row in map(json.loads, f) if "eval_loss" in row}
    record = selection.load_record(workdir, "eval_loss")
    assert set(losses) == {4, 6} and record.best_step == min(losses, key=losses.get)
    assert record.best_score == pytest.approx(losses[record.best_step])
    assert checkpoint.checkpoint_steps(os.path.join(workdir, "best")) == [record.best_step]
    # `evaluate` decodes the test file and writes one hypothesis per line of it; --average 2:
    # with the mean of checkpoints 4 and 6.
    from tests.test_cli import t2t_jax

    done = t2t_jax("evaluate", "--workdir", workdir, "--split", "test", "--beam_size", "1,2",
                   "--average", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "20 test sentences, step 6, one model, the average of its newest 2" in done.stdout
    assert "BLEU: nrefs:1" in done.stdout and "chrF: nrefs:1" in done.stdout
    # One row per setting: beam, alpha, BLEU, chrF, exact, sentences/s, tokens/s, file.
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:2] in
            (["1", "0.60"], ["2", "0.60"])]
    assert len(rows) == 2 and all(float(row[5]) > 0 and float(row[6]) > 0 for row in rows)
    for beam in (1, 2):
        path = os.path.join(workdir, f"hypotheses_test_step6_average2_beam{beam}_alpha0.6.txt")
        with open(path) as f:
            assert len(f.read().splitlines()) == 20


@pytest.mark.parametrize(
    "path",
    ["configs/wmt14_ende_base.py", "configs/wmt14_ende_big.py", "configs/wmt17_ende_base.py"],
)
def test_wmt_configs_build_their_pipelines_on_mock_data(path, tmp_path):
    config = load_config(path)
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.spm_vocab_size = 300
    config.data.batch_size = 4
    with tfds.testing.mock_data(num_examples=40):
        builder = tasks.builder_from_config(config.data, prepare=True)
        tokenizer = tasks.tokenizer_from_config(config.data, str(tmp_path), builder)
        test_builder = tasks.builder_from_config(config.data, split="test", prepare=True)
        dataset = prepare.open_or_prepare(
            config.data, tokenizer, lambda split: test_builder if split == "test" else builder)
    [batch] = take(text_input(config, dataset, tokenizer), 1)
    assert test_builder.name == "wmt14_translate"
    assert dataset.split("train").num_examples == 40
    assert batch["inputs"].shape == (4, 256) and batch["targets"].shape == (4, 256)
    assert batch["targets_segmentation"].max() >= 1
    assert np.all(batch["targets"] < tokenizer.vocab_size)
    if "big" in path:
        assert (config.model.d_model, config.model.dropout_rate) == (1024, 0.3)


def test_wmt_is_never_downloaded_by_training(tmp_path):
    config = load_config("configs/wmt14_ende_base.py")
    config.data.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="t2t-jax prepare"):
        tasks.builder_from_config(config.data)


def test_test_split_is_read_in_the_files_line_order(data_dir, tmp_path):
    source = [f"sentence {i}" for i in range(40)]
    files = {"train_source": write(tmp_path / "tr.src", source[:5]),
             "train_target": write(tmp_path / "tr.tgt", source[:5]),
             "test_source": write(tmp_path / "te.src", source),
             "test_target": write(tmp_path / "te.tgt", [s.upper() for s in source])}
    config = small_text_config(data_dir, files)
    builder = tasks.builder_from_config(config.data, split="test")
    stored = [ex["inputs"].decode() for ex in builder.as_dataset(split="test").as_numpy_iterator()]
    assert sorted(stored) == sorted(source) and stored != source  # TFDS shuffled them
    sources, targets = tasks.text_examples(builder, "test", config.data)
    assert sources == source and targets == [s.upper() for s in source]
    assert tasks.text_examples(builder, "test", config.data, count=3)[0] == source[:3]
    # The prepared test split keeps the files' order too, which training's BLEU reads.
    tokenizer = tasks.tokenizer_from_config(config.data, str(tmp_path / "run"))
    test = prepare.open_or_prepare(config.data, tokenizer).split("test")
    assert test.texts("inputs") == source and test.texts("targets") == [s.upper() for s in source]


def test_training_by_epochs_works_out_the_steps(data_dir, corpus, tmp_path):
    config = small_text_config(data_dir, corpus)
    config.train.update(num_epochs=2.0, log_every=5, eval_every=1000, checkpoint_every=1000,
                        bleu_every=0, num_decode_examples=0, cooldown_fraction=0.25)
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir, jax.devices()[:1])
    # The packed rows the training sentences fill, counted here from the saved tokenizer.
    spm = load_tokenizer(workdir)
    with gzip.open(corpus["train_source"], "rt") as s, gzip.open(corpus["train_target"], "rt") as t:
        sizes = [(len(spm.encode(a.strip())) + 1, len(spm.encode(b.strip())) + 1)
                 for a, b in zip(s, t, strict=True)]
    dataset = prepare.find(config.data, spm)
    planner = loader.make_planner(config, dataset.split("train"))
    plan = planner.plan(0)
    # Every training pair that fits, once an epoch; each row within the row's 16 tokens a side.
    fitting = [i for i, (a, b) in enumerate(sizes) if a <= 16 and b <= 16]
    assert sorted(plan.examples) == fitting
    used = plan.pieces[plan.examples]
    for r in range(plan.num_rows):
        assert (used[plan.row_starts[r] : plan.row_starts[r + 1]].sum(axis=0) <= 16).all()
    rows = plan.num_rows
    assert rows >= sum(max(a, b) for a, b in (sizes[i] for i in fitting)) / 16
    steps = math.ceil(2 * rows / 8)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    train_rows = [row for row in logged if "epoch" in row]
    assert train_rows[-1]["step"] == steps
    assert train_rows[-1]["epoch"] == pytest.approx(2.0, abs=2 / steps)
    assert train_rows[0]["epoch"] == pytest.approx(5 * 8 / rows)
    # The cooldown ends at the worked-out last step: the schedule was given that length.
    from t2t_jax.optimizer import paper_schedule

    cooled = paper_schedule(config.model.d_model, config.train.warmup_steps,
                            config.train.learning_rate, steps, 0.25)
    last_window = range(train_rows[-2]["step"], steps)
    assert train_rows[-1]["learning_rate"] == pytest.approx(
        np.mean([float(cooled(count)) for count in last_window]), rel=1e-4)
    # A bound on the examples a row holds can make more rows than the tokens fill.
    config.model.max_segments_per_row = 2
    capped = loader.make_planner(config, dataset.split("train"))
    assert capped.batches_per_epoch() >= len(fitting) / 2 / 8 > rows / 8
    planner.close()
    capped.close()


def test_parallel_text_presets_size_the_model_for_the_corpus():
    spec = importlib.util.spec_from_file_location("presets", "configs/parallel_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    small, base, big = (module.get_config(preset) for preset in ("small", "base", "big"))
    assert module.get_config().to_dict() == base.to_dict()
    assert (small.model.num_encoder_layers, small.model.d_model, small.model.dropout_rate,
            small.train.num_epochs, small.data.batch_size) == (3, 256, 0.2, 17.0, 32)
    assert (base.model.d_model, base.train.num_epochs) == (512, 0.0)
    assert (big.model.d_model, big.data.spm_vocab_size, big.data.max_target_length) == (
        1024, 32_000, 256)
    with pytest.raises(ValueError, match="configs/parallel_text.py:small"):
        module.get_config("huge")
    from tests.test_cli import t2t_jax  # the command line takes the preset after a colon

    done = t2t_jax("info", "--config", "configs/parallel_text.py:small")
    assert "total parameters: 7568384" in done.stdout, done.stderr[-2000:]


def test_the_averaging_pool_keeps_the_end_of_the_run():
    train = ConfigDict(dict(num_steps=1939, average_last=5, average_span=0.1,
                            early_stop_evals=0))
    every = selection.pool_interval(train)
    assert every == 39
    due = [step for step in range(1, 1940) if selection.pool_due(train, every, step)]
    assert due == [1783, 1822, 1861, 1900, 1939]  # the last step is always one of them
    train.early_stop_evals = 3  # the run may end sooner: the whole grid, the newest 5 kept
    due = [step for step in range(1, 1940) if selection.pool_due(train, every, step)]
    assert len(due) == 50 and due[0] == 1939 - 49 * 39 == 28 and due[-1] == 1939


def test_dev_record_selects_by_higher_bleu_or_lower_loss(tmp_path):
    by_loss = selection.DevRecord("eval_loss")
    assert [by_loss.update(step, loss) for step, loss in ((1, 3.0), (2, 2.5), (3, 2.7))] == [
        True, True, False]
    assert (by_loss.best_score, by_loss.best_step, by_loss.evals_since_best) == (2.5, 2, 1)
    by_bleu = selection.DevRecord()
    assert [by_bleu.update(step, bleu) for step, bleu in ((1, 3.0), (2, 2.5))] == [True, False]
    assert by_bleu.patience_spent(1) and not by_bleu.patience_spent(2)
    # A record written before select_by existed is read as dev BLEU's; another metric's record
    # does not hold for this one.
    os.makedirs(tmp_path / "best")
    with open(tmp_path / "best" / "record.json", "w") as f:
        json.dump({"best_bleu": 31.5, "best_step": 800, "evals_since_best": 2}, f)
    old = selection.load_record(str(tmp_path))
    assert (old.metric, old.best_score, old.best_step) == ("dev_bleu", 31.5, 800)
    assert selection.load_record(str(tmp_path), "eval_loss") == selection.DevRecord("eval_loss")
    with pytest.raises(ValueError, match="train.select_by must be one of dev_bleu, eval_loss"):
        selection.check_select_by(ConfigDict(dict(select_by="bleu")))


def test_best_checkpoint_early_stopping_and_final_averaged_beam_numbers(
    data_dir, corpus, tmp_path
):
    config = small_text_config(data_dir, corpus)
    # A learning rate of 0 keeps the params, so dev BLEU never improves after its first value:
    # two evaluations later the run must stop, at step 6 of 12.
    config.train.update(num_steps=12, learning_rate=0.0, bleu_every=2, early_stop_evals=2,
                        average_last=3, average_span=0.5, log_every=2, eval_every=100,
                        checkpoint_every=100, num_decode_examples=0)
    workdir = str(tmp_path / "run")
    result = train_and_evaluate(config, workdir, jax.devices()[:1])
    assert result["stopped_early_at"] == 6
    assert checkpoint.checkpoint_steps(workdir) == [6]
    record = selection.load_record(workdir)
    assert (record.best_step, record.evals_since_best) == (2, 2)
    assert checkpoint.checkpoint_steps(os.path.join(workdir, "best")) == [2]
    # The pool kept a checkpoint every 0.5 * 12 / 3 = 2 steps, the newest 3 averaged.
    assert checkpoint.checkpoint_steps(os.path.join(workdir, "average_pool")) == [2, 4, 6]
    for kept in ("average_pool", "averaged"):  # params alone: a third of a train state
        state = checkpoint.restore_host_state(os.path.join(workdir, kept), params_only=False)[0]
        assert set(state) == {"params", "step"}, kept
    assert result["test_params"] == "average of steps [2, 4, 6], beam 4, alpha 0.6"
    for key in ("test_bleu", "test_chrf", "best_test_bleu", "dev_bleu"):
        assert 0.0 <= result[key] <= 100.0, key
    assert "nc:6|nw:0" in result["test_chrf_signature"]  # chrF: character 6-grams
    with open(os.path.join(workdir, "hypotheses_test_final.txt")) as f:
        assert len(f.read().splitlines()) == 8  # train.bleu_examples
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert any("test_bleu" in row and row["step"] == 6 for row in rows)
    assert any("test_bleu_signature" in row for row in rows)
    # Started again, the stopped run does not train further.
    again = train_and_evaluate(config, workdir, jax.devices()[:1])
    assert checkpoint.checkpoint_steps(workdir) == [6] and "test_bleu" in again


def test_a_changed_file_is_noticed_said_and_its_ids_prepared_again(data_dir, corpus, tmp_path,
                                                                    caplog):
    config = small_text_config(data_dir, corpus)
    tokenizer = tasks.tokenizer_from_config(config.data, str(tmp_path / "run"))
    first = prepare.open_or_prepare(config.data, tokenizer)
    assert first.split("train").texts("inputs", [0])[0] in sentences(300, 0)
    changed = sentences(300, 9)
    write(corpus["train_source"], changed, gz=True)
    write(corpus["train_target"], [" ".join(s.split()[::-1]) for s in changed], gz=True)
    with caplog.at_level("WARNING"):
        assert prepare.find(config.data, tokenizer) is None
    assert any("changed since its ids were prepared" in r.getMessage() for r in caplog.records)
    again = prepare.open_or_prepare(config.data, tokenizer)
    assert again.directory == first.directory and again.key != first.key
    assert sorted(again.split("train").texts("inputs")) == sorted(changed)


def test_a_new_workdir_borrows_the_tokenizer_of_prepared_ids(data_dir, corpus, tmp_path):
    config = small_text_config(data_dir, corpus)
    tokenizer = tasks.tokenizer_from_config(config.data, str(tmp_path / "first"))
    dataset = prepare.open_or_prepare(config.data, tokenizer)
    # No TFDS read and no SentencePiece training: the prepared dataset's tokenizer is taken.
    borrowed = tasks.tokenizer_from_config(config.data, str(tmp_path / "second"))
    assert borrowed.model_proto == tokenizer.model_proto
    assert load_tokenizer(str(tmp_path / "second")).model_proto == tokenizer.model_proto
    config.data.spm_vocab_size = 299  # other settings: a tokenizer of their own
    assert prepared.prepared_tokenizer(config.data) is None
    assert prepare.find(config.data, tokenizer).key == dataset.key


def test_training_on_prepared_ids_needs_no_tensorflow(tiny_config, tmp_path):
    import subprocess
    import sys

    from tests.conftest import FAST_COMPILE_XLA_FLAGS

    prepare.open_or_prepare(tiny_config.data, tasks.tokenizer_from_config(tiny_config.data))
    code = (
        "import sys, json\n"
        "sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None\n"
        "sys.modules['sacrebleu'] = None  # nor sacrebleu, with BLEU off\n"
        "from t2t_jax.config import tiny_config\n"
        "from t2t_jax.train import train_and_evaluate\n"
        "config = tiny_config()\n"
        f"config.data.data_dir = {tiny_config.data.data_dir!r}\n"
        "config.train.compilation_cache_dir = ''\n"
        "config.train.num_decode_examples = 1\n"
        f"result = train_and_evaluate(config, {str(tmp_path)!r})\n"
        "print(json.dumps({'step': result['step'], 'loss': result['loss']}))\n"
    )
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["step"] == 4
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert all(0 <= r["input_wait_s"] < r["step_time_s"] for r in rows if "loss" in r)
