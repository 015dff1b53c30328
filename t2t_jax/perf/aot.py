"""Ahead-of-time compilation for TPU topologies, on any machine: `t2t-jax compile`.

The real TPU compiler (libtpu) compiles the project's own steps for a topology's devices
(`topology.devices`), with no TPU present: the train step that training runs (`Stepper`, built
by `train.build_stepper` over a mesh made by `sharding.make_mesh`, slices as the DCN granules),
or the beam-search decode loop that `t2t-jax decode` runs. Each compilation becomes a `Row`:
per-chip memory against the chip's HBM (the compiler itself refuses a program that does not
fit), XLA's FLOPs and bytes, the collectives in the compiled program, and an estimated step
time with the tokens/s and MFU it implies.

The estimate is not a measurement. It is a roofline: the compiled program's FLOPs at the chip's
peak bf16 rate, or its bytes accessed at the HBM bandwidth, whichever takes longer (XLA's own
`optimal_seconds` replaces that pair where it is positive: it comes back negative for large
programs), plus every collective's time over its links (ring algorithms; ICI at two links'
bandwidth, DCN at the chip's share of the host network), not overlapped with compute. XLA's
bytes accessed on TPU also count on-chip (VMEM) reads and tile padding, so the memory term
overstates HBM time: `estimated_mfu_compute_bound` leaves it out, and the truth lies between the
two. Real kernels reach only part of peak, and XLA overlaps some collectives with compute, so a
measured step differs; the estimate ranks meshes and sizes a pod, it does not replace a
benchmark.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from t2t_jax import sharding
from t2t_jax.model import ModelConfig, build_model
from t2t_jax.model.kernels import cudnn_version, select_attention
from t2t_jax.model.models import model_type
from t2t_jax.perf import hlo, topology
from t2t_jax.perf.aot_args import abstract, global_rows, train_step_args
from t2t_jax.perf.aot_collectives import collectives
from t2t_jax.runtime import chips
from t2t_jax.runtime.xla_flags import gpu_compiler_options
from t2t_jax.train import build_stepper, train_lengths
from t2t_jax.train_step import init_boxed_params

MODES = ("train", "decode")


@dataclasses.dataclass
class Row:
    """One compilation: what was compiled, for which chips, and what the compiler reports."""

    topology: str
    num_slices: int
    chips: int
    mesh: dict[str, int]
    mode: str
    model: str
    attention: str
    remat: str
    batch_rows: int
    lengths: dict[str, int]
    tokens_per_step: int
    hbm_per_chip_bytes: int
    memory_per_chip_bytes: int | None = None
    memory_breakdown: dict[str, int] | None = None  # arguments, outputs, aliased, temporaries
    fits: bool | None = None
    flops_per_step: float | None = None  # XLA's count, all chips
    flops_per_chip: float | None = None
    model_flops_per_step: float | None = None  # the formula of `bench`, as MFU counts it
    hbm_bytes_per_chip: float | None = None  # XLA's bytes accessed; GPU: the kernels' (census)
    collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    tpu_kernels: int | None = None  # Mosaic (Pallas) custom calls, e.g. splash attention
    # Launches by category and in all ("total"; `hlo.kernel_census`) of a train step, or
    # of the encoder and one decoding step: on a GPU each costs a few microseconds however
    # little it does.
    kernels: dict[str, int] | None = None
    estimated_step_time_s: float | None = None
    estimated_tokens_per_s: float | None = None
    estimated_tokens_per_s_per_chip: float | None = None
    estimated_mfu: float | None = None
    # The same with the HBM term left out (XLA's bytes overstate HBM traffic on TPU: they count
    # on-chip VMEM reads and tile padding too): the other end of the range.
    estimated_mfu_compute_bound: float | None = None
    estimate: dict[str, float] | None = None  # the terms of the estimate, in seconds
    estimate_method: str | None = None
    compile_time_s: float | None = None
    error: str | None = None


def describe_model(model_config: ModelConfig, params: Any) -> str:
    """E.g. "encoder_decoder d_model 512, 6+6 layers, 63.05M params, bfloat16"."""
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    layers = model_type(model_config).layers_text()
    return (f"{model_config.type} d_model {model_config.d_model}, {layers} layers, "
            f"{count / 1e6:,.2f}M params, {model_config.dtype}")


def compile_train(
    config: ml_collections.ConfigDict,
    topo: topology.Topology,
    devices: list,
    vocab_size: int,
    rows_per_chip: int | None = None,
) -> Row:
    """Compiles the train step of `config` over `config.mesh` on the topology's `devices`."""
    if config.train.mode != "jit":
        raise ValueError(
            f"t2t-jax compile compiles the sharded jit step, not train.mode={config.train.mode!r}"
            "; drop --config.train.mode (pmap is data parallel over one host's devices)"
        )
    mesh = sharding.make_mesh(config.mesh, devices)
    model_config = ModelConfig.from_config(config.model, vocab_size)
    _require_cudnn_where_used(topo, model_config)
    model, stepper = build_stepper(config, model_config, mesh)
    lengths = train_lengths(config)
    rows = global_rows(config, mesh, rows_per_chip)
    row = _new_row(topo, mesh, "train", model_config, model, stepper.abstract_state.params,
                   rows, lengths, rows * lengths["targets"])
    args = train_step_args(stepper, lengths, rows, config.data.packing)
    with stepper.activate():
        compiled = _compile(row, lambda: stepper.jitted_train_step.lower(*args), topo.chip)
    if compiled is not None:
        source = lengths.get("inputs")
        row.model_flops_per_step = model_type(model_config).flops_per_step(
            rows, lengths["targets"], "train", source)
        _analyse(row, compiled, mesh, topo.chip)
    return row


def _require_cudnn_where_used(topo: topology.Topology, model_config: ModelConfig) -> None:
    """A clear error for compiling cuDNN attention for a GPU where cuDNN's library is missing:
    JAX asks it its version while tracing, even to compile only."""
    if topo.chip.gpu is None:
        return
    implementation = select_attention(model_config.attention, "gpu", model_config.dtype)[0]
    if implementation == "cudnn" and cudnn_version() is None:
        raise ValueError(
            "compiling cuDNN attention for a GPU needs cuDNN's library, which JAX asks its "
            "version: pip install 'nvidia-cudnn-cu12>=9' (or -e '.[gpu]'), or pass "
            "--attention xla"
        )


def compile_decode(
    config: ml_collections.ConfigDict,
    topo: topology.Topology,
    devices: list,
    vocab_size: int,
    rows: int,
    beam_size: int = 4,
    alpha: float = 0.6,
    extra_length: int = 50,
) -> Row:
    """Compiles the decode loop `t2t-jax decode` runs, for one host of the topology: its chips
    on a data axis, params replicated, `rows` sources of `data.max_source_length` tokens decoded
    up to `extra_length` tokens longer (beam search, or greedy for beam_size 1; the decoder-only
    model continues its prompts by the same search). `devices`: the topology's, of which the
    first host's (the compiler takes a one-host slice of the same chips: it rejects a subset of
    a larger slice's device ids)."""
    host = [d for d in devices if d.process_index == devices[0].process_index]
    if len(host) < len(devices):
        host = topology.devices(topology.host_slice(topo))
    mesh = sharding.local_mesh(host)
    model_config = dataclasses.replace(
        ModelConfig.from_config(config.model, vocab_size), scan_layers=False
    )
    _require_cudnn_where_used(topo, model_config)
    model = build_model(model_config, sharding.platform(mesh))
    source_len = config.data.max_source_length
    max_length = source_len + extra_length
    lengths = {"inputs": source_len, "targets": max_length}
    with sharding.activate(mesh):
        boxed = jax.eval_shape(
            lambda: init_boxed_params(model, jax.random.key(0), {"inputs": 1, "targets": 1}))
    shapes = nn.meta.unbox(boxed)
    params = abstract(shapes, jax.tree.map(lambda _: sharding.replicated(mesh), shapes))
    row = _new_row(topo, mesh, "decode", model_config, model, shapes, rows, lengths,
                   rows * max_length)
    row.chips = len(host)
    program, encoder = _decode_programs(model, params, mesh, rows, source_len, max_length,
                                        beam_size, alpha)
    with sharding.activate(mesh):
        compiled = _compile(row, program, topo.chip)
        # The part that runs once, for the estimate (see `_analyse`).
        once = None if compiled is None or encoder is None else encoder().compile(
            gpu_compiler_options() if topo.chip.gpu is not None else None)
    if compiled is not None:
        row.model_flops_per_step = model_type(model_config).flops_per_step(
            rows * beam_size, max_length, "forward", source_len)
        _analyse(row, compiled, mesh, topo.chip, loop_steps=max_length, once=once)
    return row


def _decode_programs(model, params, mesh, rows, source_len, max_length, beam_size, alpha):
    """(lowering of the decode loop, lowering of the encoder or None), over abstract inputs
    split over the host's data axis: the decoding path's batch search (beam search, greedy
    for beam_size 1), for either kind of model."""
    from t2t_jax import decode

    split = NamedSharding(mesh, P("data"))
    settings = decode.Search(beam_size=beam_size, alpha=alpha)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    inputs = jax.ShapeDtypeStruct((rows, source_len), jnp.int32, sharding=split)
    kind = model_type(model.config)
    output_length = kind.search_length(max_length, source_len)

    def program():
        return decode.search_batch.lower((model,), (params,), inputs, rng, settings,
                                         output_length)

    return program, kind.encoder_program(model, params, inputs)


def _new_row(topo, mesh, mode, model_config, model, params, rows, lengths, tokens) -> Row:
    return Row(
        topology=topo.name, num_slices=topo.num_slices, chips=topo.chips,
        mesh=dict(mesh.shape), mode=mode, model=describe_model(model_config, params),
        attention=model.config.attention, remat=model_config.remat, batch_rows=rows,
        lengths=dict(lengths), tokens_per_step=tokens,
        hbm_per_chip_bytes=topology.usable_memory(topo.chip),
    )


# The TPU compiler's ways of saying a program does not fit: "Used 21.4G of 15.75G hbm", or
# "the total memory required for HLO temporaries (20.28G) exceeds available HBM (15.75G)".
_OOM = re.compile(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm|\(([\d.]+)([KMGT])\) exceeds "
                  r"available HBM")


def _compile(row: Row, lower: Callable[[], Any], chip: chips.Chip) -> Any:
    """Lowers and compiles, timing it; a program that does not fit the chip's HBM (the TPU
    compiler refuses it) or that fails to compile becomes the row's `error`. GPU programs get
    the project's XLA flags (`xla_flags`), as training on the GPU would."""
    start = time.perf_counter()
    options = gpu_compiler_options() if chip.gpu is not None else None
    try:
        compiled = lower().compile(options)
    except Exception as error:  # XLA reports compile failures as several exception types
        row.compile_time_s = time.perf_counter() - start
        message = " ".join(str(error).split())
        used = _OOM.search(message)
        if "RESOURCE_EXHAUSTED" in message or used:
            row.fits = False
            if used:  # what the compiler names: all of it, or the temporaries alone
                number, unit = used.group(1) or used.group(3), used.group(2) or used.group(4)
                scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
                row.memory_per_chip_bytes = int(float(number) * scale[unit])
                if used.group(3):
                    row.memory_breakdown = {"temporaries": row.memory_per_chip_bytes}
            row.error = "does not fit: " + _oom_sentence(message)
        else:
            row.error = f"{type(error).__name__}: {message[:300]}"
        return None
    row.compile_time_s = time.perf_counter() - start
    return compiled


def _oom_sentence(message: str) -> str:
    """The compiler's out-of-memory message, from "Ran out of memory" on, at most 200 chars."""
    start = message.find("Ran out of memory")
    return message[start if start >= 0 else 0:][:200]


def memory_breakdown(compiled: Any) -> dict[str, int]:
    """Per-chip bytes of the compiled program: arguments, outputs, the outputs that reuse
    (alias) donated arguments, temporaries, and the total live at once."""
    m = compiled.memory_analysis()
    parts = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
    }
    parts["total"] = (parts["arguments"] + parts["outputs"] - parts["aliased"]
                      + parts["temporaries"] + parts["code"])
    return {k: int(v) for k, v in parts.items()}


def _cost(compiled: Any, chip: chips.Chip) -> dict[str, float]:
    """XLA's FLOPs, bytes accessed and optimal seconds; for a GPU, which XLA reports none for
    when compiled without one, no FLOPs (the model formula stands in) and the kernels' bytes
    from `hlo.kernel_census`."""
    if chip.gpu is not None:
        census = hlo.kernel_census(compiled.as_text())
        return {"flops": 0.0, "bytes accessed": census.bytes["total"], "optimal_seconds": 0.0}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {k: float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed", "optimal_seconds")}


def _analyse(row: Row, compiled: Any, mesh, chip: chips.Chip, loop_steps: int = 0,
             once: Any = None) -> None:
    """Fills the row from the compiled program (see the module docstring for the estimate).
    `loop_steps` > 0: the program is a decode loop whose body XLA's cost analysis counts once,
    and `once` the compiled part that runs once (the encoder): costs are that part plus
    `loop_steps` times the rest."""
    row.memory_breakdown = memory_breakdown(compiled)
    row.memory_per_chip_bytes = row.memory_breakdown["total"]
    row.fits = row.memory_per_chip_bytes <= row.hbm_per_chip_bytes
    text = compiled.as_text()
    row.tpu_kernels = text.count('custom_call_target="tpu_custom_call"')
    row.kernels = hlo.kernel_census(text).kernels
    found = collectives(text, list(mesh.devices.flat))
    row.collectives = {kind: {k: v for k, v in c.items() if not k.endswith("seconds")}
                       for kind, c in found.items()}
    repeats = max(loop_steps, 1)
    ici = repeats * sum(c["ici_seconds"] for c in found.values())
    dcn = repeats * sum(c["dcn_seconds"] for c in found.values())
    cost = _cost(compiled, chip)
    if loop_steps:
        first = _cost(once, chip) if once is not None else dict.fromkeys(cost, 0.0)
        cost = {k: first[k] + loop_steps * max(cost[k] - first[k], 0.0) for k in cost}
    chips = math.prod(row.mesh.values())
    row.hbm_bytes_per_chip = cost["bytes accessed"]
    if chip.gpu is None:  # none from XLA for a GPU program compiled without one
        row.flops_per_chip = cost["flops"]
        row.flops_per_step = row.flops_per_chip * chips
    # XLA does not count inside Pallas kernels (splash attention); the model formula does.
    cost["flops"] = max(cost["flops"], row.model_flops_per_step / chips)
    terms = _roofline(cost, chip)
    row.estimate = {"compute_or_memory_s": terms["core"], "ici_s": ici, "dcn_s": dcn,
                    "compute_s": terms["compute"], "memory_s": terms["memory"]}
    row.estimated_step_time_s = terms["core"] + ici + dcn
    flops_from = (
        "the model formula's, bytes: the kernels' operands and results (XLA has no cost "
        "analysis for a GPU it does not see)" if chip.gpu is not None else
        "XLA's count or the model formula's, whichever is larger (XLA does not count inside "
        "Pallas kernels)")
    row.estimate_method = (
        ("XLA optimal_seconds" if terms["xla"] else "roofline max(FLOPs / peak, HBM bytes / "
         "bandwidth)") + f" + collectives over ICI/DCN, not overlapped; FLOPs: {flops_from}"
        + (f"; decode: encoder + {loop_steps} x loop body, no early stop" if loop_steps else ""))
    if row.estimated_step_time_s > 0:
        row.estimated_tokens_per_s = row.tokens_per_step / row.estimated_step_time_s
        row.estimated_tokens_per_s_per_chip = row.estimated_tokens_per_s / chips
        peak = chip.peak_flops * chips
        row.estimated_mfu = row.model_flops_per_step / (row.estimated_step_time_s * peak)
        compute_bound = (terms["compute"] if not terms["xla"] else terms["core"]) + ici + dcn
        row.estimated_mfu_compute_bound = row.model_flops_per_step / (compute_bound * peak)


def _roofline(cost: dict[str, float], chip: chips.Chip) -> dict[str, float]:
    compute = cost["flops"] / chip.peak_flops
    memory = cost["bytes accessed"] / chip.hbm_bandwidth
    xla = cost["optimal_seconds"] > 0
    return {"compute": compute, "memory": memory, "xla": xla,
            "core": cost["optimal_seconds"] if xla else max(compute, memory)}


