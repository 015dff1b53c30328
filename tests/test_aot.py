"""TPU topologies compiled on this CPU machine: the real train step and decode loop through the
TPU compiler (libtpu), splash attention's Mosaic kernels, the collectives and estimates read
from the compiled program, the golden parameter layout, and clear errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from t2t_jax import sharding
from t2t_jax.config import tiny_config
from t2t_jax.model import ModelConfig
from t2t_jax.model.masks import AttentionMask
from t2t_jax.model.splash import splash_attention
from t2t_jax.perf import aot, aot_args, aot_collectives, aot_report, aot_search, topology
from t2t_jax.runtime import chips
from t2t_jax.train import build_stepper, train_lengths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "base_param_specs_data2_fsdp2_tensor2.json")
TINY_VOCAB = 13  # the reverse task's symbols: what tasks.expected_vocab_size gives tiny

pytest.importorskip("libtpu", reason="the TPU compiler comes with the test extras")
# The suite's shared compilation cache (conftest) also stores the TPU programs compiled here; a
# compile-only TPU client cannot load them back, so JAX warns and compiles again.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Error reading persistent compilation cache entry:UserWarning"
)


@pytest.fixture(scope="module")
def v5e_2x2():
    topo = topology.parse("v5e:2x2")
    return topo, topology.devices(topo)


def test_topology_names_become_cloud_tpu_shapes():
    assert topology.parse("v5e-16").shape == (4, 4)
    assert topology.parse("v5e-256").shape == (16, 16)
    assert topology.parse("v5e:16x16").wraparound() == (True, True, False)
    assert topology.parse("v5p-128").shape == (4, 4, 4)  # 128 TensorCores, 2 a chip
    assert topology.parse("v5p:4x4x4").wraparound() == (True, True, True)
    assert topology.parse("v4-8").shape == (2, 2, 1)
    assert topology.parse("v4-32").shape == (2, 2, 4)
    assert topology.parse("v5litepod-16", num_slices=2).chips == 32


@pytest.mark.parametrize(
    "name, message",
    [("v9:2x2", "unknown topology 'v9:2x2'"), ("v5e-12", "must be a power of two"),
     ("v5p:4x4", "v5p slices have 3 dimensions"), ("tpu", "name one as GEN:AxB")],
)
def test_an_unknown_topology_is_a_clear_error(name, message):
    with pytest.raises(ValueError, match=message):
        topology.parse(name)


def test_a_missing_tpu_compiler_names_the_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"needs libtpu.*pip install 'jax\[tpu\]=="):
        topology.require_libtpu()


def test_topology_devices_are_tpus_in_slices():
    devices = topology.devices(topology.parse("v5e:2x2", num_slices=2))
    assert len(devices) == 8 and {d.platform for d in devices} == {"tpu"}
    assert sorted({d.slice_index for d in devices}) == [0, 1]
    assert devices[0].device_kind == chips.CHIPS["v5e"].device_kind


# What each layout's compiled step must hold besides its arithmetic.
LAYOUT_COLLECTIVES = {
    # Data parallel: gradients are summed across chips.
    "data": (dict(data=4, fsdp=1, tensor=1), {"all-reduce"}),
    # Fully sharded: params are gathered before use.
    "fsdp": (dict(data=1, fsdp=4, tensor=1), {"all-gather"}),
    # Tensor parallel: partial activations are summed within each layer.
    "tensor": (dict(data=1, fsdp=1, tensor=4), {"all-reduce"}),
}


def test_tiny_train_step_compiles_for_v5e_under_data_fsdp_and_tensor_meshes(v5e_2x2):
    rows = {}
    for name, (layout, expected) in LAYOUT_COLLECTIVES.items():
        config = tiny_config()
        config.mesh.ici.update(layout)
        row = rows[name] = aot.compile_train(config, *v5e_2x2, TINY_VOCAB)
        assert row.error is None and row.fits, name
        assert row.mesh == layout and row.chips == 4 and row.batch_rows == 16
        assert 0 < row.memory_per_chip_bytes < 2**30
        assert row.memory_breakdown["total"] == row.memory_per_chip_bytes
        assert expected <= set(row.collectives) and all(
            c["count"] > 0 and c["bytes"] > 0 and c["dcn_count"] == 0
            for c in row.collectives.values()), name
        # attention=auto chose splash for the TPU inside the real step: three blocks (encoder
        # self, decoder self, cross), each a forward and two backward Mosaic kernels.
        assert row.attention == "splash" and row.tpu_kernels == 9
        # XLA's FLOPs of the step are near the model formula's (attention is padded to 128).
        assert 0.5 < row.flops_per_step / row.model_flops_per_step < 4
        assert row.estimated_step_time_s > 0 and 0 < row.estimated_mfu < 1
        assert row.estimated_mfu <= row.estimated_mfu_compute_bound
        assert row.estimated_tokens_per_s == pytest.approx(
            row.tokens_per_step / row.estimated_step_time_s)
    # Only data parallelism holds the whole training state on every chip.
    arguments = {name: row.memory_breakdown["arguments"] for name, row in rows.items()}
    assert arguments["data"] > max(arguments["fsdp"], arguments["tensor"])


def test_the_compiled_step_lays_params_out_as_the_stepper_asks(v5e_2x2):
    config = tiny_config()
    config.mesh.ici.update(data=1, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(config.mesh, v5e_2x2[1])
    _, stepper = build_stepper(config, ModelConfig.from_config(config.model, TINY_VOCAB), mesh)
    args = aot_args.train_step_args(stepper, train_lengths(config), 16, packed=False)
    with stepper.activate():
        compiled = stepper.jitted_train_step.lower(*args).compile()
    compiled_params = compiled.input_shardings[0][0].params
    assert sharding.spec_table(compiled_params) == sharding.spec_table(
        stepper.state_shardings.params)
    assert sharding.spec_table(compiled_params)["encoder/layer_0/ffn/wi/kernel"] == str(
        jax.sharding.PartitionSpec("fsdp", "tensor"))


def test_base_model_params_follow_the_golden_layout_on_data2_fsdp2_tensor2():
    """The logical axis rules applied to the paper's base model, checked against a table kept
    in the repository: a change to the rules or the model's axis names shows up here.
    UPDATE_GOLDEN=1 rewrites the table."""
    from t2t_jax.config import default_config

    config = default_config()  # configs/base.py: the paper's base model
    config.model.vocab_size = 37_000
    config.mesh.ici.update(data=2, fsdp=2, tensor=2)
    devices = topology.devices(topology.parse("v5e:2x4"))
    mesh = sharding.make_mesh(config.mesh, devices)
    model_config = ModelConfig.from_config(config.model, config.model.vocab_size)
    _, stepper = build_stepper(config, model_config, mesh)
    table = sharding.spec_table(stepper.state_shardings.params)
    if os.environ.get("UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
    with open(GOLDEN) as f:
        assert table == json.load(f)
    assert len(table) == 181 and table["shared_embedding/embedding"] == "P('tensor', 'fsdp')"


@pytest.mark.parametrize("causal, packed", [(True, False), (False, True), (True, True)])
def test_splash_compiles_for_tpu_with_causal_and_packed_masks(v5e_2x2, causal, packed):
    mesh_config = tiny_config().mesh
    mesh_config.ici.update(data=2, tensor=2)
    mesh = sharding.make_mesh(mesh_config, v5e_2x2[1])
    batch, length, heads, depth = 4, 256, 4, 64
    qkv = jax.ShapeDtypeStruct((batch, length, heads, depth), jnp.bfloat16)
    segments = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def loss(query, key, value, query_segments, key_segments):
        mask = AttentionMask(query_segments, key_segments, causal=causal, packed=packed)
        return splash_attention(query, key, value, mask).astype(jnp.float32).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    with sharding.activate(mesh):
        compiled = step.lower(qkv, qkv, qkv, segments, segments).compile()
    text = compiled.as_text()
    # The forward kernel and the two backward ones (dq, dkv), each a Mosaic custom call.
    assert text.count('custom_call_target="tpu_custom_call"') == 3


def test_two_slices_reduce_gradients_over_dcn(tmp_path):
    topo = topology.parse("v5e:2x2", num_slices=2)
    row = aot.compile_train(tiny_config(), topo, topology.devices(topo), TINY_VOCAB)
    assert row.mesh == {"data": 8, "fsdp": 1, "tensor": 1} and row.chips == 8
    reduce = row.collectives["all-reduce"]
    assert reduce["dcn_count"] > 0 and reduce["dcn_bytes"] > 0
    assert row.estimate["dcn_s"] > 0


def test_the_decode_loop_compiles_for_one_host():
    topo = topology.parse("v5e:4x4")  # four hosts of 2x2 chips: each decodes on its own
    row = aot.compile_decode(tiny_config(), topo, topology.devices(topo), TINY_VOCAB, rows=8,
                             beam_size=4, extra_length=5)
    assert row.error is None and row.fits and row.mode == "decode"
    assert row.mesh == {"data": 4, "fsdp": 1, "tensor": 1} and row.chips == 4
    assert row.lengths == {"inputs": 8, "targets": 13} and row.tokens_per_step == 8 * 13
    # XLA counts the loop body once; the estimate runs it once per output position.
    assert row.estimated_step_time_s > row.estimate["ici_s"] and "13 x loop body" in (
        row.estimate_method)


def test_search_ranks_fitting_meshes_by_estimated_tokens_per_s(v5e_2x2, monkeypatch):
    candidates = [dict(data=4, fsdp=1, tensor=1), dict(data=1, fsdp=2, tensor=2)]
    monkeypatch.setattr(aot_search, "candidate_meshes", lambda chips, heads: candidates)
    rows = aot_search.search(tiny_config(), *v5e_2x2, TINY_VOCAB, rows_per_chip=2)
    assert sorted(r.mesh["tensor"] for r in rows) == [1, 2]
    assert all(r.fits for r in rows)
    speeds = [r.estimated_tokens_per_s for r in rows]
    assert speeds == sorted(speeds, reverse=True)
    assert {r.batch_rows for r in rows} == {8, 4}  # 2 rows per data-parallel shard
    flags = aot_search.mesh_flags(rows[0])
    assert flags.startswith("--config.mesh.ici.data=") and "--config.model.remat=none" in flags


def test_candidate_meshes_cover_data_fsdp_and_tensor_splits():
    meshes = aot_search.candidate_meshes(256, num_heads=16)
    assert {"data": 256, "fsdp": 1, "tensor": 1} in meshes
    assert {"data": 1, "fsdp": 256, "tensor": 1} in meshes
    assert {"data": 16, "fsdp": 16, "tensor": 1} in meshes
    assert {"data": 1, "fsdp": 64, "tensor": 4} in meshes
    assert all(m["data"] * m["fsdp"] * m["tensor"] == 256 for m in meshes)
    assert all(m["tensor"] in (1, 2) for m in aot_search.candidate_meshes(16, num_heads=6))


def test_a_batch_that_does_not_divide_names_rows_per_chip():
    config = tiny_config()
    config.data.batch_size = 6
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
    with pytest.raises(ValueError, match="--rows_per_chip"):
        aot_args.global_rows(config, mesh, None)
    assert aot_args.global_rows(config, mesh, 3) == 12


def test_collective_groups_are_read_in_all_three_hlo_spellings():
    line = "%x = f32[8] all-reduce(%y), replica_groups={{0,1},{2,3}}, to_apply=%add"
    assert aot_collectives._groups(line, 4) == [[0, 1], [2, 3]]
    line = "%x = f32[8] all-gather(%y), replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}"
    assert aot_collectives._groups(line, 4) == [[0, 2], [1, 3]]
    line = ("%x = f32[8] all-reduce(%y), replica_groups=mesh['axis_0'=2,'axis_1'=2] "
            "{'axis_0'}, to_apply=%add")
    assert aot_collectives._groups(line, 4) == [[0, 2], [1, 3]]
    line = "%x = (f32[8], f32[8], u32[], u32[]) collective-permute-start(%y), " \
        "source_target_pairs={{0,1},{1,0}}"
    assert aot_collectives._groups(line, 2) == [[0, 1], [1, 0]]


def test_collectives_count_bytes_and_dcn_crossings():
    devices = topology.devices(topology.parse("v5e:2x2", num_slices=2))
    text = "\n".join([
        # 1 MiB of bf16 summed within slice 0's chips: ICI.
        "  %a = bf16[512,1024]{1,0} all-reduce(%p), replica_groups={{0,1,2,3},{4,5,6,7}}",
        # Gathered across the slices: DCN.
        "  %b = f32[1024]{0} all-gather(%q), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}",
        # An async gather: (operand, result); only the result counts.
        "  %c = (f32[256]{0}, f32[1024]{0}) all-gather-start(%r), replica_groups={{0,1,2,3}}",
        "  %d = f32[1024]{0} all-gather-done(%c)",
    ])
    found = aot_collectives.collectives(text, devices)
    assert found["all-reduce"]["count"] == 1 and found["all-reduce"]["bytes"] == 2**20
    assert found["all-reduce"]["dcn_count"] == 0
    gather = found["all-gather"]
    assert gather["count"] == 2 and gather["bytes"] == 2 * 4096
    assert gather["dcn_count"] == 1 and gather["dcn_bytes"] == 4096
    chip = chips.CHIPS["v5e"]
    ring = 2 * (4 - 1) / 4 * 2**20 / (2 * chip.ici_link_bandwidth)
    assert found["all-reduce"]["ici_seconds"] == pytest.approx(ring)
    assert found["all-reduce"]["dcn_seconds"] == 0
    assert found["all-gather"]["dcn_seconds"] == pytest.approx(
        (2 - 1) / 2 * 4096 / chip.dcn_bandwidth)


def test_compile_command_writes_the_table_and_json(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "t2t_jax.cli", "compile", "--config", "configs/tiny.py",
         "--topology", "v5e-4", "--config.mesh.ici.fsdp=2", "--output", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "v5e:2x2" in result.stdout and "estimates are a roofline" in result.stdout
    [row] = json.loads((tmp_path / "compile.json").read_text())
    required = {"topology", "num_slices", "chips", "mesh", "mode", "memory_per_chip_bytes",
                "hbm_per_chip_bytes", "fits", "flops_per_step", "estimated_step_time_s",
                "estimated_tokens_per_s", "estimated_mfu", "collectives", "compile_time_s",
                "error"}
    assert required <= set(row)
    assert row["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and row["fits"] is True
    assert row["hbm_per_chip_bytes"] == 16 * 2**30
    assert set(dataclasses.asdict(aot.Row("", 1, 1, {}, "", "", "", "", 0, {}, 0, 0))) == set(row)


@pytest.mark.parametrize(
    "args, message",
    [(["--topology", "v9:2x2"], "unknown topology 'v9:2x2'"),
     (["--topology", "v5e:2x2", "--config.mesh.ici.data=3"], "needs 3 devices but 4")],
)
def test_compile_command_errors_are_one_line(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "t2t_jax.cli", "compile", "--config", "configs/tiny.py", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_roofline_takes_the_slower_of_compute_and_memory_unless_xla_knows_better():
    v5e = chips.CHIPS["v5e"]
    cost = {"flops": 197e12, "bytes accessed": 8.19e11 / 2, "optimal_seconds": -686.0}
    terms = aot._roofline(cost, v5e)
    assert terms["core"] == pytest.approx(1.0) and not terms["xla"]  # a second of peak FLOPs
    cost["bytes accessed"] = 3 * 8.19e11
    assert aot._roofline(cost, v5e)["core"] == pytest.approx(3.0)  # three seconds of HBM
    cost["optimal_seconds"] = 2.0  # positive: XLA's own figure is used
    assert aot._roofline(cost, v5e)["core"] == 2.0


@pytest.mark.parametrize(
    "message, gib",
    [("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
      "hbm. Used 21.42G of 15.48G hbm. Exceeded hbm capacity by 5.94G.", 21.42),
     ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (20.28G) exceeds available HBM (15.75G).", 20.28)],
)
def test_a_program_the_compiler_refuses_for_memory_is_a_row_that_does_not_fit(message, gib):
    row = aot.Row("v5e:4x4", 1, 16, {}, "train", "", "splash", "none", 64, {}, 0, 16 * 2**30)

    def lower():
        raise jax.errors.JaxRuntimeError(message)

    assert aot._compile(row, lower, chips.CHIPS["v5e"]) is None
    assert row.fits is False and row.memory_per_chip_bytes == int(gib * 2**30)
    assert row.error.startswith("does not fit: Ran out of memory")
    line = aot_report.format_table([row])[-1]
    assert line.endswith(row.error)
    # The second message names the temporaries alone: the total is at least that.
    assert (f">{gib:.2f}" in line) == ("temporaries" in message)


def test_the_tpu_compilers_reduce_scatter_is_counted_as_one():
    """XLA:TPU writes a reduce-scatter as a computation holding an all-reduce of the whole
    buffer, which each chip then slices: counted as a reduce-scatter of the slice."""
    devices = topology.devices(topology.parse("v5e:2x2"))
    text = "\n".join([
        "%all-reduce-scatter.5 (input.5: bf16[4096,1024]) -> bf16[4096,256] {",
        "  %input.5 = bf16[4096,1024]{1,0} parameter(0)",
        "  %all-reduce.7 = bf16[4096,1024]{1,0} all-reduce(%input.5), "
        "replica_groups={{0,1,2,3}}, to_apply=%add",
        "  ROOT %dynamic-slice.1 = bf16[4096,256]{1,0} dynamic-slice(%all-reduce.7, %p)",
        "}",
        "ENTRY %main (p: f32[8]) -> f32[8] {",
        "  %all-reduce.9 = f32[8]{0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%add",
        "}",
    ])
    found = aot_collectives.collectives(text, devices)
    assert found["reduce-scatter"]["count"] == 1
    assert found["reduce-scatter"]["bytes"] == 4096 * 256 * 2  # the slice each chip keeps
    assert found["all-reduce"]["count"] == 1 and found["all-reduce"]["bytes"] == 32
