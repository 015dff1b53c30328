"""The input benchmark: a WMT-like corpus, and consistent throughput figures."""


from t2t_jax import input_bench
from t2t_jax.data import parallel_text, tasks

from .test_text_data import small_text_config


def test_synthetic_corpus_is_aligned_and_wmt_like(tmp_path):
    files = input_bench.synthetic_corpus(str(tmp_path), pairs=300, seed=1)
    pairs = list(parallel_text.read_pairs(files["train_source"], files["train_target"]))
    assert len(pairs) == 300
    lengths = [len(source.split()) for source, _ in pairs]
    assert 15 < sum(lengths) / len(lengths) < 35
    # Same length on both sides: a word-for-word "translation" with local reordering.
    assert all(len(s.split()) == len(t.split()) for s, t in pairs)


def test_pipeline_figures_are_positive_and_consistent(tmp_path, data_dir):
    files = input_bench.synthetic_corpus(str(tmp_path / "corpus"), pairs=200)
    config = small_text_config(data_dir, files)
    config.data.max_source_length = config.data.max_target_length = 64
    config.data.spm_vocab_size = 400  # 256 byte pieces + both cases of 26 letters + more
    builder = tasks.builder_from_config(config.data)
    tokenizer = tasks.tokenizer_from_config(config.data, str(tmp_path), builder)
    figures = input_bench.measure_pipeline(config, builder, tokenizer, num_batches=5)
    assert figures["examples_per_s"] > 0
    # Every example has at least a source and a target token, at most 2 * 64.
    ratio = figures["tokens_per_s"] / figures["examples_per_s"]
    assert 2 <= ratio <= 128
    step = input_bench.measure_train_step(config, str(tmp_path), num_steps=2)
    assert step["step_time_s"] > 0 and step["tokens_per_s"] > 0
