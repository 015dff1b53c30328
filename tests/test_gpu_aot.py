"""GPUs compiled for on this CPU machine: JAX's CUDA plugin given a described H100, the real
train step (cuDNN attention included), the launches and bytes read from the compiled program,
collectives over NVLink and between hosts, and clear errors."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import optax
import pytest

from t2t_jax import train_step
from t2t_jax.config import tiny_config
from t2t_jax.perf import aot, aot_report, hlo, topology
from t2t_jax.runtime import accelerator_probe, chips, xla_flags
from tests.conftest import FAST_COMPILE_XLA_FLAGS
from tests.test_train import one_hot_cross_entropy_sums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 1000  # a size no other dimension of the models below has (and cuBLAS does not pad)

pytest.importorskip("jax_plugins.xla_cuda12", reason="the GPU compiler comes with the test extras")
# The suite's shared compilation cache (conftest) also stores the GPU programs compiled here; a
# compile-only GPU client cannot load them back, so JAX warns and compiles again.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Error reading persistent compilation cache entry:UserWarning"
)


def stub_cudnn_9_10(monkeypatch):
    """cuDNN's library is not installed with the test extras; JAX asks its version while
    tracing cuDNN attention (compiling needs nothing else of it)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha

    monkeypatch.setattr(cudnn_fmha, "check_cudnn_version", lambda: 91000)


@pytest.fixture
def cudnn_9_10(monkeypatch):
    stub_cudnn_9_10(monkeypatch)


@pytest.fixture(scope="module")
def medium_on_h100():
    """(row, HLO text) of `medium_config`'s train step compiled for one H100."""
    with pytest.MonkeyPatch.context() as patch:
        stub_cudnn_9_10(patch)
        yield compile_for_h100(medium_config())


def test_gpu_names_become_hosts_of_gpus():
    one = topology.parse("h100")
    assert one.shape == (1,) and one.chips == 1 and one.chip.platform == "gpu"
    two_hosts = topology.parse("h200:8", num_slices=2)
    assert two_hosts.chips == 16 and two_hosts.slices_name == "hosts"
    assert topology.parse("a100:4").chip.peak_flops == 312e12
    with pytest.raises(ValueError, match="a host holds 1 to 8 GPUs"):
        topology.parse("h100:9")
    with pytest.raises(ValueError, match="GPU one of h100, h200, a100"):
        topology.parse("h900")


def test_described_gpus_are_compile_only_devices_of_their_hosts():
    config = topology.gpu_target_config(chips.GPUS["h100"])
    assert "core_count: 132" in config and "major: 9" in config
    devices = topology.devices(topology.parse("h100:2", num_slices=2))
    assert len(devices) == 4 and {d.platform for d in devices} == {"gpu"}
    assert [d.process_index for d in devices] == [0, 0, 1, 1]
    assert devices[0].device_kind == "NVIDIA H100 80GB HBM3"
    assert devices[0].compute_capability == "9.0"
    assert chips.chip_of(devices[0].device_kind) is chips.GPUS["h100"]


def compile_for_h100(config, monkeypatch=None, loss=None):
    """(row, compiled HLO text) of `config`'s train step compiled for one H100."""
    if loss is not None:
        monkeypatch.setattr(train_step, "cross_entropy_sums", loss)
    texts = []
    analyse = aot._analyse

    def keep_text(row, compiled, *args, **kwargs):
        texts.append(compiled.as_text())
        return analyse(row, compiled, *args, **kwargs)

    topo = topology.parse("h100")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aot, "_analyse", keep_text)
        row = aot.compile_train(config, topo, topology.devices(topo), VOCAB)
    assert row.error is None, row.error
    return row, texts[0]


def medium_config(adam_eps=1e-9):
    """One layer a side of the base model's width, in bfloat16: parameters large enough for
    XLA to treat them as it treats the base model's."""
    config = tiny_config()
    config.model.update(dtype="bfloat16", d_model=512, d_ff=2048, num_heads=8,
                        num_encoder_layers=1, num_decoder_layers=1)
    config.train.adam_eps = adam_eps
    return config


def test_the_train_step_compiles_for_an_h100_with_cudnn_attention(medium_on_h100):
    row, text = medium_on_h100
    assert row.attention == "cudnn" and row.fits and row.chips == 1
    # Three attention blocks (encoder self, decoder self, cross), each forward and backward.
    assert text.count('custom_call_target="__cudnn$fmhaSoftmax"') == 3
    assert text.count('custom_call_target="__cudnn$fmhaSoftmaxBackward"') == 3
    assert row.kernels["attention"] >= 6 and row.kernels["matmul"] > 0
    assert row.kernels["total"] == sum(v for k, v in row.kernels.items() if k != "total")
    # The project's GPU flags reach the compiler: cuBLAS, not Triton, for the matmuls.
    assert "__cublas" in text and "__triton_gemm" not in text
    # XLA counts no FLOPs for a GPU it does not see; the estimate uses the model formula and
    # the kernels' bytes.
    assert row.flops_per_chip is None and row.hbm_bytes_per_chip > 0
    assert row.hbm_per_chip_bytes == int(0.75 * chips.GPUS["h100"].hbm_bytes)
    assert 0 < row.memory_per_chip_bytes < 2**30
    assert 0 < row.estimated_mfu < 1 and "kernels' operands" in row.estimate_method
    assert "-" in aot_report.format_table([row])[-1].split()


def logits_readers(hlo_text):
    """Kernels (library calls aside) that read a float32 [.., VOCAB] array: the logits."""
    instructions, computations = hlo.parse_hlo(hlo_text)
    entry = next(line.split()[1].lstrip("%") for line in hlo_text.splitlines()
                 if line.startswith("ENTRY"))
    return [
        i.name for i in computations[entry]
        if i.opcode == "fusion" and any(
            re.fullmatch(rf"f32\[[\d,]*,{VOCAB}\]\S*", instructions[o].shape)
            for o in i.operands if o in instructions)
    ]


def test_the_loss_reads_the_logits_once_each_way_on_an_h100(
    medium_on_h100, cudnn_9_10, monkeypatch
):
    _, text = medium_on_h100
    # One pass for log Z, the target's logit, their sum and the argmax; one for the gradient.
    # (The loss as separate reductions, before `vocab_statistics`, made it three, here as in
    # the base model.)
    assert len(logits_readers(text)) == 2
    # The loss as first written, over a one-hot array, reads them more often still.
    _, before = compile_for_h100(medium_config(), monkeypatch, one_hot_cross_entropy_sums)
    assert len(logits_readers(before)) >= 4


def test_the_optimizer_launches_a_kernel_per_array_and_a_few_for_the_norm_on_an_h100(
    medium_on_h100, cudnn_9_10, monkeypatch
):
    row, text = medium_on_h100
    shapes = [leaf.shape for leaf in jax.tree.leaves(jax.eval_shape(
        lambda: aot.init_boxed_params(*_model_and_lengths(medium_config()))))]
    # One fused Adam update (with the finite guard's select) per parameter array; the
    # gradient's norm is one reduction per shape (`optimizer.global_norm`), plus scalar work.
    assert row.kernels["optimizer"] <= len(shapes) + 16
    # The finite guard reads no update: with eps = 0, where updates may be infinite, it does.
    checked, checked_text = compile_for_h100(medium_config(adam_eps=0.0))
    update_bytes = 4 * sum(math.prod(shape) for shape in shapes)
    assert (hlo.kernel_census(checked_text).bytes["optimizer"]
            >= hlo.kernel_census(text).bytes["optimizer"] + update_bytes)
    # optax.tree.norm, a reduction per array (two for large ones), launches many more.
    monkeypatch.setattr(train_step, "global_norm", optax.tree.norm)
    per_array, _ = compile_for_h100(medium_config())
    assert per_array.kernels["optimizer"] >= row.kernels["optimizer"] + len(shapes) - 8


def _model_and_lengths(config):
    from t2t_jax.model import ModelConfig, build_model
    from t2t_jax.train import train_lengths

    model = build_model(ModelConfig.from_config(config.model, VOCAB))
    return model, jax.random.key(0), train_lengths(config)


def test_gradients_are_reduced_over_nvlink_within_a_host_and_the_network_between_hosts():
    config = tiny_config()  # float32: the einsum attention path
    config.mesh.ici.update(data=2)
    topo = topology.parse("h100:2")
    row = aot.compile_train(config, topo, topology.devices(topo), 13)
    reduce = row.collectives["all-reduce"]
    assert reduce["count"] > 0 and reduce["dcn_count"] == 0
    assert row.estimate["ici_s"] > 0 and row.estimate["dcn_s"] == 0
    config.mesh.ici.update(data=1)
    config.mesh.dcn.update(data=2)
    topo = topology.parse("h100", num_slices=2)
    row = aot.compile_train(config, topo, topology.devices(topo), 13)
    reduce = row.collectives["all-reduce"]
    assert reduce["dcn_count"] == reduce["count"] > 0 and row.estimate["dcn_s"] > 0


def test_compiling_cudnn_attention_without_cudnn_names_the_install(monkeypatch):
    monkeypatch.setattr(aot, "cudnn_version", lambda: None)
    config = medium_config()
    topo = topology.parse("h100")
    with pytest.raises(ValueError, match=r"needs cuDNN's library.*--attention xla"):
        aot.compile_train(config, topo, topology.devices(topo), VOCAB)


def test_compile_command_compiles_for_a_gpu_host(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "t2t_jax.cli", "compile", "--config", "configs/tiny.py",
         "--topology", "h100:2", "--config.mesh.ici.data=2", "--output", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Jax plugin configuration error" not in result.stderr
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("h100:2"))
    assert " yes " in line  # fits
    assert "kernels' operands" in result.stdout
    rows = json.loads((tmp_path / "compile.json").read_text())
    assert rows[0]["kernels"]["total"] > 0 and rows[0]["collectives"]["all-reduce"]["count"]


def test_gpu_compiler_options_are_the_project_flags_the_user_did_not_set(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert xla_flags.gpu_compiler_options() == {"xla_gpu_enable_triton_gemm": False}
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
    assert xla_flags.gpu_compiler_options() == {}


@pytest.mark.parametrize(
    "environment, gpu_present, expected",
    [
        ({}, False, {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1", "JAX_PLATFORMS": "cpu"}),
        ({}, True, {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": None, "JAX_PLATFORMS": None}),
        ({"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "", "JAX_PLATFORMS": "tpu,cpu"}, False,
         {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "", "JAX_PLATFORMS": "tpu,cpu"}),
    ],
)
def test_the_cuda_plugin_loads_quietly_only_where_no_gpu_is(
    monkeypatch, environment, gpu_present, expected
):
    for name in expected:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(accelerator_probe, "nvidia_gpus_present", lambda: gpu_present)
    monkeypatch.setattr(accelerator_probe, "tpu_chips_present", lambda: False)
    accelerator_probe.quiet_without_gpu()
    assert {name: os.environ.get(name) for name in expected} == expected


@pytest.mark.parametrize("gpu, taken", [("h100", True), ("a100", False), (None, False)])
def test_cudnn_takes_packed_spans_only_for_a_hopper_gpu_even_while_tracing(cudnn_9_10, gpu, taken):
    """Read inside jit (where only the abstract mesh is at hand), for the GPU compiled for."""
    from t2t_jax.model import kernels

    reasons = []

    def step(x):
        reasons.append(kernels.cudnn_spans_unsupported())
        return x

    if gpu is None:  # no mesh: the local device, this CPU
        jax.make_jaxpr(jax.jit(step))(0.0)
    else:
        mesh = jax.sharding.Mesh(topology.devices(topology.parse(gpu)), ("data",))
        with jax.set_mesh(mesh):
            jax.make_jaxpr(jax.jit(step))(0.0)
    assert (reasons == [None]) == taken
    if not taken:
        assert "needs a Hopper GPU" in reasons[0]


def test_the_census_counts_launches_and_the_bytes_they_move():
    text = """HloModule m

%fused (p.0: f32[4,256], p.1: f32[8]) -> f32[4,8] {
  %p.0 = f32[4,256]{1,0} parameter(0)
  %p.1 = f32[8]{0} parameter(1)
  %slice.1 = f32[4,8]{1,0} slice(%p.0), slice={[0:4], [0:8]}
  %broadcast.1 = f32[4,8]{1,0} broadcast(%p.1), dimensions={1}
  ROOT %add.1 = f32[4,8]{1,0} add(%slice.1, %broadcast.1)
}

%body (s.0: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %s.0 = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s.0), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%s.0), index=1
  %negate.1 = f32[4,8]{1,0} negate(%x), metadata={op_name="jit(f)/loss/neg"}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %negate.1)
}

%update (u.0: f32[64,8], u.1: f32[1,8], u.2: s32[]) -> f32[64,8] {
  %u.0 = f32[64,8]{1,0} parameter(0)
  %u.1 = f32[1,8]{1,0} parameter(1)
  %u.2 = s32[] parameter(2)
  %zero.1 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[64,8]{1,0} dynamic-update-slice(%u.0, %u.1, %u.2, %zero.1)
}

%cond (s.1: (s32[], f32[4,8])) -> pred[] {
  %s.1 = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[4,256], b: f32[8], c: f32[64,8], r: f32[1,8], i: s32[]) -> (s32[], f32[4,8]) {
  %a = f32[4,256]{1,0} parameter(0)
  %b = f32[8]{0} parameter(1)
  %c = f32[64,8]{1,0} parameter(2)
  %r = f32[1,8]{1,0} parameter(3)
  %i = s32[] parameter(4)
  %fusion.1 = f32[4,8]{1,0} fusion(%a, %b), kind=kLoop, calls=%fused
  %fusion.2 = f32[64,8]{1,0} fusion(%c, %r, %i), kind=kLoop, calls=%update
  %matmul.1 = (f32[4,4]{1,0}, s8[4194304]{0}) custom-call(%fusion.1, %fusion.1), custom_call_target="__cublas$lt$matmul"
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}) tuple(%zero, %fusion.1)
  %all-reduce-start.1 = f32[4,8]{1,0} all-reduce-start(%fusion.1), to_apply=%fused
  %all-reduce-done.1 = f32[4,8]{1,0} all-reduce-done(%all-reduce-start.1)
  ROOT %while.1 = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body
}
"""  # noqa: E501
    census = hlo.kernel_census(text)
    # Two fusions, the matmul, the collective (its start, not its done), and the loop body's
    # negate once.
    assert census.kernels == {"normalization and elementwise": 2, "matmul": 1,
                              "collectives": 1, "softmax and loss": 1, "total": 5}
    # The first fusion reads the 4x8 slice it takes of `a` in place, not all of `a`: 128 + 32
    # read, 128 written. The second updates one row of `c` in place: it reads the row (32) and
    # the index (4) and writes the row (32), not all of `c`.
    assert census.bytes["normalization and elementwise"] == (128 + 32 + 128) + (32 + 4 + 32)
    # The matmul reads its operands twice over (256) and writes 4x4 floats, not cuBLAS's
    # workspace. The collective and the negate each read and write 128 bytes.
    assert census.bytes["matmul"] == 256 + 64
    assert census.bytes["total"] == 288 + 68 + 320 + 256 + 256
