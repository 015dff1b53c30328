"""`t2t-jax bench`: figures positive and consistent, FLOPs formula against XLA, outputs written."""

import json
import os
import subprocess
import sys

import jax
import pytest

from t2t_jax.model import ModelConfig, models
from t2t_jax.perf import bench, hlo, profiling
from tests.conftest import FAST_COMPILE_XLA_FLAGS


def test_flops_formula_counts_the_base_model():
    config = ModelConfig(vocab_size=37_000)
    d, f, s = 512, 2048, 128
    attention = 4 * d * d + 2 * d * s  # multiply-adds: projections, scores, weighted sum
    per_source = 2 * 6 * (attention + 2 * d * f)
    per_target = 2 * (6 * (2 * attention + 2 * d * f) + d * 37_000)
    forward = 8 * s * (per_source + per_target)
    assert models.model_type(config).flops_per_step(8, s, "forward") == forward
    assert models.model_type(config).flops_per_step(8, s, "train") == 3 * forward


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


def test_bench_packs_rows_of_equal_examples(tiny_config):
    model_config = ModelConfig.from_config(dict(tiny_config.model), 13)
    batch = bench._fake_batch(model_config, 2, 10, 0, packed_examples=3)
    for side in ("inputs", "targets"):
        assert batch[f"{side}_segmentation"].tolist() == 2 * [[1, 1, 1, 2, 2, 2, 3, 3, 3, 3]]
        assert batch[f"{side}_position"].tolist() == 2 * [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3]]
    points, _ = bench.run_bench(tiny_config, 13, [16], ["xla"], "forward", batch_tokens=64,
                                steps=1, packed_examples=4)
    assert points[0].packed_examples == 4 and points[0].error is None
    with pytest.raises(ValueError, match="needs --mode train or forward"):
        bench.run_bench(tiny_config, 13, [16], ["xla"], "decode", 64, packed_examples=4)


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
    assert p.flops_per_step == models.model_type(
        ModelConfig.from_config(dict(tiny_config.model), 13)).flops_per_step(rows, 8, "forward")


def test_bench_profile_breaks_device_time_down(tiny_config, tmp_path):
    tiny_config.model.dropout_rate = 0.1
    tiny_config.mesh.ici.data = -1  # 8 devices: the gradients' all-reduce is a collective
    points, _ = bench.run_bench(tiny_config, 13, [16], ["xla"], "train", batch_tokens=256,
                                steps=2, profile_dir=str(tmp_path))
    [point] = points
    result = profiling.Breakdown(**point.profile)
    assert profiling.latest_trace(str(tmp_path / "train_xla_16")).endswith(".xplane.pb")
    for category in ("matmul", "attention", "softmax and loss", "dropout RNG and masks",
                     "optimizer", "collectives"):
        assert result.categories[category] > 0, category
    assert result.unmatched_ms == 0
    assert 0 < result.busy_ms <= result.step_ms
    assert sum(result.shares().values()) == pytest.approx(1.0)
    assert "matmul" in "\n".join(profiling.format_breakdown(result))


HLO = """HloModule jit_step, entry_computation_layout={()->f32[8,16]{1,0}}

%fused_exp (param_0: f32[8,16]) -> f32[8,16] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  ROOT %exponential.1 = f32[8,16]{1,0} exponential(%param_0), metadata={op_name="jit(step)/transpose(jvp(loss))/exp"}
}

%fused_transpose (param_0.1: f32[16,8]) -> f32[8,16] {
  %param_0.1 = f32[16,8]{1,0} parameter(0)
  ROOT %transpose.2 = f32[8,16]{1,0} transpose(%param_0.1), dimensions={1,0}
}

ENTRY %main.1 (p0: bf16[8,16], p1: bf16[16,16]) -> f32[8,16] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,16]{1,0} parameter(1)
  %gemm.1 = (f32[8,16]{1,0}, s8[0]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/jvp(Transformer)/encoder/layer_0/ffn/wi/dot_general"}
  %fmha.1 = (bf16[8,16]{1,0}, u8[0]{0}) custom-call(%p0, %p0, %p0), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp(Transformer)/encoder/layer_0/self_attention/attention_core/dot_product_attention"}
  %loop_exp_fusion = f32[8,16]{1,0} fusion(%p0), kind=kLoop, calls=%fused_exp
  %all-reduce.1 = f32[16,16]{1,0} all-reduce(%p1), replica_groups={}, to_apply=%add
  %transpose_fusion = f32[8,16]{1,0} fusion(%p1), kind=kLoop, calls=%fused_transpose
  %adam = f32[16,16]{1,0} multiply(%p1, %p1), metadata={op_name="jit(step)/optimizer/mul"}
  ROOT %bits = f32[8,16]{1,0} rng-bit-generator(%p1), algorithm=rng_default
}
"""  # noqa: E501 (compiled HLO's own long lines)


def test_ops_are_classified_by_what_they_compute_and_where_they_come_from():
    instructions, computations = hlo.parse_hlo(HLO)
    expected = {
        "gemm.1": "matmul", "fmha.1": "attention", "loop_exp_fusion": "softmax and loss",
        "all-reduce.1": "collectives", "transpose_fusion": "copies and transposes",
        "adam": "optimizer", "bits": "dropout RNG and masks",
    }
    for name, category in expected.items():
        assert hlo.classify(instructions[name], computations) == category, name
    # 1 ms of gemm, 0.5 ms of attention under a kernel name only, a 0.5 ms gap, 1 ms of loss:
    # two steps of 3 ms each.
    events = [
        profiling.OpEvent("gemm.1", 0, 1e6),
        profiling.OpEvent("sm90_xmma_gemm_bf16", 1e6, 0.5e6),
        profiling.OpEvent("loop_exp_fusion", 2e6, 1e6),
        profiling.OpEvent("unknown_kernel", 3e6, 1e6),
        profiling.OpEvent("fmha.1", 4e6, 2e6),
    ]
    result = profiling.breakdown(events, HLO, steps=2)
    assert result.step_ms == pytest.approx(3.0)
    assert result.busy_ms == pytest.approx(2.75)
    assert result.categories["matmul"] == pytest.approx(0.75)
    assert result.categories["attention"] == pytest.approx(1.0)
    assert result.categories["softmax and loss"] == pytest.approx(0.5)
    assert result.categories["idle"] == pytest.approx(0.25)
    assert result.unmatched_ms == pytest.approx(0.5)
    assert result.top_ops[0] == ("fmha.1", "attention", pytest.approx(1.0))
    # Kernels replayed from a CUDA graph name the command buffer as their op: their own kernel
    # name, the instruction's with "." and "-" as "_", says which instruction they ran.
    replayed = [profiling.OpEvent("command_buffer_1", 0, 1e6, kernel="loop_exp_fusion"),
                profiling.OpEvent("command_buffer_1", 1e6, 1e6, kernel="all_reduce_1")]
    result = profiling.breakdown(replayed, HLO, steps=1)
    assert result.categories["softmax and loss"] == pytest.approx(1.0)
    assert result.categories["collectives"] == pytest.approx(1.0)
    assert result.unmatched_ms == 0


def test_bench_decode_mode_times_beam_search(tiny_config):
    points, _ = bench.run_bench(tiny_config, 13, [8], ["xla"], "decode", batch_tokens=64,
                                steps=1, beam_size=4)
    [p] = points
    assert p.beam_size == 4 and p.error is None and p.step_time_s > 0
    # The program timed is the search: four beams' caches and candidates need more memory.
    [greedy], _ = bench.run_bench(tiny_config, 13, [8], ["xla"], "decode", batch_tokens=64,
                                  steps=1)
    assert greedy.beam_size == 1 and p.peak_memory_bytes > greedy.peak_memory_bytes
    with pytest.raises(ValueError, match="--steps must be at least 1"):
        bench.run_bench(tiny_config, 13, [8], ["xla"], "decode", batch_tokens=64, steps=0)
    rows = max(jax.device_count(), 64 // 8 // jax.device_count() * jax.device_count())
    assert p.flops_per_step == models.model_type(
        ModelConfig.from_config(tiny_config.model, 13)).flops_per_step(rows * 4, 8, "forward")
    assert "beam4" in bench.format_table(points)[1]


def test_bench_and_decoding_need_no_tensorflow():
    # Accelerator images often lack TensorFlow, which only the input pipeline needs.
    code = (
        "import sys; sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None\n"
        "from t2t_jax.perf import bench\n"
        "from t2t_jax import decode\n"
        "from t2t_jax.config import tiny_config\n"
        "points, _ = bench.run_bench(tiny_config(), 13, [8], ['xla'], 'decode',"
        " batch_tokens=16, steps=1, beam_size=2)\n"
        "print('tokens/s', points[0].tokens_per_s)\n"
    )
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) > 0
