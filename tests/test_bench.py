"""`t2t-jax bench`: figures positive and consistent, FLOPs formula against XLA, outputs written."""

import json
import os

import jax
import pytest

from t2t_jax import bench
from t2t_jax.model import ModelConfig


def test_flops_formula_counts_the_base_model():
    config = ModelConfig(vocab_size=37_000)
    d, f, s = 512, 2048, 128
    attention = 4 * d * d + 2 * d * s  # multiply-adds: projections, scores, weighted sum
    per_source = 2 * 6 * (attention + 2 * d * f)
    per_target = 2 * (6 * (2 * attention + 2 * d * f) + d * 37_000)
    forward = 8 * s * (per_source + per_target)
    assert bench.model_flops_per_step(config, 8, s, "forward") == forward
    assert bench.model_flops_per_step(config, 8, s, "train") == 3 * forward


def test_bench_on_a_tiny_config_is_consistent(tiny_config, tmp_path):
    tiny_config.mesh.ici.data = -1
    points, peak_source = bench.run_bench(
        tiny_config, 13, [16, 32], ["xla", "dot_product_attention"], "train",
        batch_tokens=256, steps=2,
    )
    assert "cpu" in peak_source
    assert len(points) == 4
    for p in points:
        assert p.error is None
        rows = max(jax.device_count(), 256 // p.seq_len // jax.device_count()
                   * jax.device_count())
        assert p.tokens_per_s == pytest.approx(rows * p.seq_len / p.step_time_s)
        assert p.step_time_s > 0 and p.compile_time_s > 0 and p.peak_memory_bytes > 0
        assert 0 < p.mfu < 1
        # The formula ignores elementwise work and counts masked attention; XLA counts all.
        assert p.flops_per_step == pytest.approx(p.xla_flops_per_step, rel=0.2)
    paths = bench.write_outputs(points, str(tmp_path), "tiny")
    assert all(os.path.getsize(path) > 0 for path in paths)
    with open(paths[0]) as f:
        rows = json.load(f)
    assert {"seq_len", "attention", "mode", "tokens_per_s", "step_time_s", "flops_per_step",
            "mfu", "peak_memory_bytes", "compile_time_s", "error"} <= set(rows[0])
    assert bench.format_table(points)[0].split()[0] == "seq_len"


@pytest.mark.parametrize("model_type", ["encoder_decoder", "decoder_only"])
def test_bench_decode_mode_times_greedy_generation(tiny_config, model_type):
    tiny_config.model.type = model_type
    points, _ = bench.run_bench(tiny_config, 13, [8], ["auto"], "decode", batch_tokens=64,
                                steps=2)
    [p] = points
    assert p.mode == "decode" and p.attention == "auto:xla_or_blockwise" and p.error is None
    assert p.step_time_s > 0
    rows = max(jax.device_count(), 64 // 8 // jax.device_count() * jax.device_count())
    assert p.tokens_per_s == pytest.approx(rows * 8 / p.step_time_s)
    assert p.flops_per_step == bench.model_flops_per_step(
        ModelConfig.from_config(dict(tiny_config.model), 13), rows, 8, "forward"
    )
