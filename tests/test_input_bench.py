"""The input benchmark: a WMT-like corpus, and consistent throughput figures."""

import json

import pytest

from t2t_jax.data import parallel_text
from t2t_jax.perf import input_bench

from .test_text_data import small_text_config


def test_synthetic_corpus_is_aligned_and_wmt_like(tmp_path):
    files = input_bench.synthetic_corpus(str(tmp_path), pairs=300, seed=1)
    pairs = list(parallel_text.read_pairs(files["train_source"], files["train_target"]))
    assert len(pairs) == 300
    lengths = [len(source.split()) for source, _ in pairs]
    assert 15 < sum(lengths) / len(lengths) < 35
    # Same length on both sides: a word-for-word "translation" with local reordering.
    assert all(len(s.split()) == len(t.split()) for s, t in pairs)


def test_bench_input_rows_are_consistent_and_written_as_json(tmp_path, data_dir):
    files = input_bench.synthetic_corpus(str(tmp_path / "corpus"), pairs=200)
    config = small_text_config(data_dir, files)
    config.data.max_source_length = config.data.max_target_length = 64
    config.data.spm_vocab_size = 400  # 256 byte pieces + both cases of 26 letters + more
    rows = input_bench.run(config, str(tmp_path), num_batches=10, num_steps=2, workers=(0, 1))
    assert [(r["what"], r["workers"]) for r in rows] == [
        ("SentencePiece in Python, one call a sentence", 0),
        ("prepared, padded", 0), ("prepared, padded", 1),
        ("prepared, packed", 0), ("prepared, packed", 1),
        ("prepared, token budget", 0), ("prepared, token budget", 1),
        ("prepared, packed, sampled (n-best drawn each epoch)", 0),
        ("prepared, packed, sampled (n-best drawn each epoch)", 1),
        ("train step (consumes)", 0),
    ]
    per_pair = [r["tokens_per_s"] / r["examples_per_s"] for r in rows[:-1]]
    assert per_pair[0] >= 2  # SentencePiece on every line, EOS counted on each side
    # Batches hold the pairs that fit: at least a source and a target token, at most 2 * 64;
    # about as many a pair in every layout (sampled rows draw other segmentations).
    assert all(2 <= p <= 128 for p in per_pair[1:])
    assert max(per_pair[1:]) < 1.3 * min(per_pair[1:])
    assert rows[-1]["step_time_s"] > 0 and rows[-1]["tokens_per_s"] > 0
    path = input_bench.write_json(rows, str(tmp_path / "out"))
    with open(path) as f:
        assert json.load(f) == rows
    lines = input_bench.demand_ratios(rows, "h200")
    assert "1,315,324 tokens/s" in lines[0] and len(lines) == 1 + 8
    with pytest.raises(ValueError, match="unknown --accelerator 'tpu'"):
        input_bench.demand_ratios(rows, "tpu")


def test_demand_figures_follow_from_the_data_sheets_and_the_flops_formula():
    from t2t_jax.model import ModelConfig
    from t2t_jax.model.models import model_type
    from t2t_jax.runtime.chips import CHIPS, GPUS, INPUT_DEMAND

    base = ModelConfig(vocab_size=37_000)
    per_target_token = model_type(base).flops_per_step(1, 512, "train") / 512
    assert per_target_token == pytest.approx(434.5e6, rel=1e-3)
    for name, chip in (("h100", GPUS["h100"]), ("v5e", CHIPS["v5e"])):
        assert INPUT_DEMAND[name].tokens_per_s == pytest.approx(
            2 * 0.4 * chip.peak_flops / per_target_token, rel=1e-3)
