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

import copy
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from t2t_jax import profiling, sharding, topology
from t2t_jax.bench import model_flops_per_step
from t2t_jax.model import ModelConfig, build_model
from t2t_jax.model.attention import cudnn_version, select_attention
from t2t_jax.train import build_stepper, train_lengths
from t2t_jax.train_step import Stepper, init_boxed_params
from t2t_jax.xla_flags import gpu_compiler_options

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
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
    # Launches by category and in all ("total"; `profiling.kernel_census`) of a train step, or
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


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: what `.lower()` takes instead of arrays."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def batch_shapes(
    lengths: dict[str, int], rows: int, packed: bool, batch_sharding: NamedSharding
) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract global batch the train step takes: the pipeline's features, [rows, len]
    int32, with segment ids and positions when rows are packed."""
    features = dict(lengths)
    if packed:
        for key in (k for k in lengths if k != "loss_mask"):
            features[f"{key}_segmentation"] = features[f"{key}_position"] = lengths[key]
    return {
        name: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch_sharding)
        for name, length in features.items()
    }


def train_step_args(
    stepper: Stepper, lengths: dict[str, int], rows: int, packed: bool
) -> tuple[Any, dict[str, jax.ShapeDtypeStruct], jax.ShapeDtypeStruct]:
    """Abstract (state, batch, rng) for the stepper's train step, laid out as training lays
    them out."""
    mesh = stepper.mesh
    state = abstract(stepper.abstract_state, stepper.state_shardings)
    batch = batch_shapes(lengths, rows, packed, sharding.batch_sharding(mesh))
    rng = jax.eval_shape(lambda: jax.random.key(0))
    return state, batch, jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                                              sharding=sharding.replicated(mesh))


def global_rows(config: ml_collections.ConfigDict, mesh, rows_per_chip: int | None) -> int:
    """Rows per step: `rows_per_chip` times the data-parallel shards (data x fsdp), else the
    config's `data.batch_size`, which must divide over them."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows_per_chip:
        return rows_per_chip * shards
    rows = config.data.batch_size
    if rows % shards:
        raise ValueError(
            f"data.batch_size={rows} does not divide over the mesh's {shards} data-parallel "
            f"shards (data x fsdp); pass --rows_per_chip N for N rows per shard, or set "
            f"--config.data.batch_size to a multiple of {shards}"
        )
    return rows


def set_seq_len(config: ml_collections.ConfigDict, seq_len: int) -> None:
    """Makes `seq_len` the tokens a row holds: source and target each for the encoder-decoder,
    the two together for the decoder-only model."""
    data = config.data
    if config.model.type == "decoder_only":
        data.max_source_length, data.max_target_length = seq_len // 2, seq_len - seq_len // 2
    else:
        data.max_source_length = data.max_target_length = seq_len
    config.model.max_positions = max(config.model.max_positions, seq_len)


def describe_model(model_config: ModelConfig, params: Any) -> str:
    """E.g. "encoder_decoder d_model 512, 6+6 layers, 63.05M params, bfloat16"."""
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    layers = (f"{model_config.num_decoder_layers}" if model_config.type == "decoder_only" else
              f"{model_config.num_encoder_layers}+{model_config.num_decoder_layers}")
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
        row.model_flops_per_step = model_flops_per_step(
            model_config, rows, lengths["targets"], "train", source)
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
        row.model_flops_per_step = model_flops_per_step(
            model_config, rows * beam_size, max_length, "forward", source_len)
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
    # The decoder-only model's buffer holds its prompt too: max_length tokens in all.
    output_length = max_length - source_len if model.config.type == "decoder_only" else max_length

    def program():
        return decode.search_batch.lower((model,), (params,), inputs, rng, settings,
                                         output_length)

    if model.config.type == "decoder_only":
        return program, None
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    return program, lambda: encode.lower(params, inputs)


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


def _compile(row: Row, lower: Callable[[], Any], chip: topology.Chip) -> Any:
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


def _cost(compiled: Any, chip: topology.Chip) -> dict[str, float]:
    """XLA's FLOPs, bytes accessed and optimal seconds; for a GPU, which XLA reports none for
    when compiled without one, no FLOPs (the model formula stands in) and the kernels' bytes
    from `profiling.kernel_census`."""
    if chip.gpu is not None:
        census = profiling.kernel_census(compiled.as_text())
        return {"flops": 0.0, "bytes accessed": census.bytes["total"], "optimal_seconds": 0.0}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {k: float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed", "optimal_seconds")}


def _analyse(row: Row, compiled: Any, mesh, chip: topology.Chip, loop_steps: int = 0,
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
    row.kernels = profiling.kernel_census(text).kernels
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


def _roofline(cost: dict[str, float], chip: topology.Chip) -> dict[str, float]:
    compute = cost["flops"] / chip.peak_flops
    memory = cost["bytes accessed"] / chip.hbm_bandwidth
    xla = cost["optimal_seconds"] > 0
    return {"compute": compute, "memory": memory, "xla": xla,
            "core": cost["optimal_seconds"] if xla else max(compute, memory)}


# An HLO instruction line: `%name = SHAPE op(operands), attributes`.
_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)
# Collectives between slices: the TPU compiler turns each into a send (and a recv) to the
# multi-slice runtime, `_xla_megascale_transfer_type="ALL_REDUCE"` and so on.
_DCN_SEND = re.compile(
    r"=\s*(?P<shape>.*?)\ssend\(.*_xla_megascale_transfer_type=\"(?P<kind>\w+)\""
)


def collectives(hlo_text: str, devices: list) -> dict[str, dict[str, Any]]:
    """Collectives of a compiled SPMD program, per kind: `count`, `bytes` (the buffers each
    produces on one chip), `dcn_count` and `dcn_bytes` (those between slices), `ici_seconds`
    and `dcn_seconds` (their time by ring algorithms over the links they use). `devices`: the
    program's devices in partition order (the mesh's, flattened)."""
    chip = topology.chip_of(devices[0].device_kind) if devices else None
    slices = np.array([sharding.granule_index(d) for d in devices])
    found: dict[str, dict[str, Any]] = {}

    def add(op: str, out: int, n: int, crosses: bool) -> None:
        moved = {"all-reduce": 2 * (n - 1) / n * out, "all-gather": (n - 1) / n * out,
                 "reduce-scatter": (n - 1) * out, "all-to-all": (n - 1) / n * out,
                 "collective-permute": out}.get(op, out)
        entry = found.setdefault(op, {"count": 0, "bytes": 0, "dcn_count": 0, "dcn_bytes": 0,
                                      "ici_seconds": 0.0, "dcn_seconds": 0.0})
        entry["count"] += 1
        entry["bytes"] += out
        if crosses:
            entry["dcn_count"] += 1
            entry["dcn_bytes"] += out
        if chip is not None:
            bandwidth = chip.dcn_bandwidth if crosses else chip.ici_bandwidth
            entry["dcn_seconds" if crosses else "ici_seconds"] += moved / bandwidth

    computation = ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # "%name (params) -> shape {": a new computation
            computation = line.split(" ", 1)[0]
            continue
        if match := _DCN_SEND.search(line):
            kind = match.group("kind").lower().replace("_", "-")
            add(kind, sum(profiling.array_bytes(match.group("shape"))[:1]),
                max(len(set(slices.tolist())), 2), crosses=True)
            continue
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        op = match.group("op")
        sizes = profiling.array_bytes(match.group("shape"))
        if match.group("start") and op in ("all-gather", "collective-permute"):
            sizes = [s for s in sizes if s > 4]  # drop the u32 sync flags
            sizes = sizes[len(sizes) // 2:]  # (operands..., results...): the results
        groups = _groups(line, len(devices))
        crosses = bool(len(slices)) and any(len(set(slices[g])) > 1 for g in groups)
        n = max(len(groups[0]), 2) if groups else 2
        if op == "all-reduce" and computation.startswith("%all-reduce-scatter"):
            # The TPU compiler's reduce-scatter: an all-reduce whose result each chip slices.
            add("reduce-scatter", sum(sizes) // n, n, crosses)
            continue
        add(op, sum(sizes), n, crosses)
    return found


def _groups(line: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective (partition ids), from any of XLA's three spellings:
    explicit `{{0,1},{2,3}}`, iota `[2,2]<=[2,2]T(1,0)`, or `mesh[...] {'axis_1'}`; or the
    source-target pairs of a collective-permute."""
    if match := re.search(r"source_target_pairs=\{([\d,{}]*)\}", line):
        return [[int(x) for x in pair.split(",")] for pair in re.findall(r"\{(\d+,\d+)\}",
                                                                          match.group(1))]
    if match := re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line):
        shape = [int(x) for x in match.group(1).split(",")]
        ids = np.arange(num_devices).reshape([int(x) for x in match.group(2).split(",")])
        if match.group(3):
            ids = ids.transpose([int(x) for x in match.group(3).split(",")])
        return ids.reshape(shape).tolist()
    if match := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
        axes = re.findall(r"'(\w+)'=(\d+)", match.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        grouped = [names.index(a) for a in re.findall(r"'(\w+)'", match.group(2))]
        rest = [i for i in range(len(names)) if i not in grouped]
        ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(rest + grouped)
        return ids.reshape(-1, math.prod(sizes[i] for i in grouped) or 1).tolist()
    if match := re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", line):
        return [[int(x) for x in g.split(",") if x.strip()]
                for g in re.findall(r"\{([\d, ]*)\}", match.group(1))]
    return [list(range(num_devices))]  # no groups: all devices


def candidate_meshes(ici_chips: int, num_heads: int) -> list[dict[str, int]]:
    """The (data, fsdp, tensor) splits of a slice's chips that `--search` compiles: tensor 1,
    2 or 4 (dividing the heads), and for each, fsdp over none, about the square root, or all of
    the rest (memory falls as fsdp grows, collectives change kind), data taking what is left."""
    meshes = []
    for tensor in (1, 2, 4):
        if ici_chips % tensor or num_heads % tensor:
            continue
        rest = ici_chips // tensor
        middle = 2 ** round(math.log2(rest) / 2)
        for fsdp in sorted({1, middle, rest}):
            if rest % fsdp == 0:
                meshes.append({"data": rest // fsdp, "fsdp": fsdp, "tensor": tensor})
    return meshes


def variants(
    config: ml_collections.ConfigDict, seq_lens: list[int], attentions: list[str]
) -> Iterator[ml_collections.ConfigDict]:
    """Copies of `config` for each sequence length and attention implementation asked for
    (none asked: the config itself)."""
    for seq_len in seq_lens or [None]:
        for attention in attentions or [None]:
            variant = copy.deepcopy(config)
            if seq_len:
                set_seq_len(variant, seq_len)
            if attention:
                variant.model.attention = attention
            yield variant


def search(
    config: ml_collections.ConfigDict,
    topo: topology.Topology,
    devices: list,
    vocab_size: int,
    rows_per_chip: int | None,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Compiles `candidate_meshes` within each slice (`mesh.dcn` as configured), each first
    without rematerialisation and, if that does not fit, with `remat=full`; returns every row,
    those that fit first, by estimated tokens/s (the batch grows with the data-parallel shards
    under --rows_per_chip, so tokens/s rather than step time is what compares)."""
    rows = []
    for mesh in candidate_meshes(topo.chips // topo.num_slices, config.model.num_heads):
        for remat in dict.fromkeys((config.model.remat, "full")):
            candidate = copy.deepcopy(config)
            candidate.mesh.ici.update(mesh)
            candidate.model.remat = remat
            try:
                row = compile_train(candidate, topo, devices, vocab_size, rows_per_chip)
            except ValueError as error:  # e.g. a batch that does not divide over this mesh
                row = Row(topology=topo.name, num_slices=topo.num_slices, chips=topo.chips,
                          mesh=mesh, mode="train", model="", attention=candidate.model.attention,
                          remat=remat, batch_rows=0, lengths={}, tokens_per_step=0,
                          hbm_per_chip_bytes=topology.usable_memory(topo.chip),
                          error=str(error))
            rows.append(row)
            if on_row:
                on_row(row)
            if row.fits:
                break
    return sorted(rows, key=lambda r: (not r.fits, -(r.estimated_tokens_per_s or 0)))


def mesh_flags(row: Row) -> str:
    """The command-line flags that select this row's mesh and remat policy in training."""
    flags = [f"--config.mesh.ici.{axis}={row.mesh[axis] // dcn}"
             for axis, dcn in zip(sharding.MESH_AXES, _dcn_sizes(row), strict=True)]
    return " ".join(flags + [f"--config.model.remat={row.remat}"])


def _dcn_sizes(row: Row) -> tuple[int, int, int]:
    """How much of each mesh axis the slices make (data over slices, as `mesh.dcn` defaults)."""
    return (row.num_slices, 1, 1) if row.mesh["data"] % row.num_slices == 0 else (1, 1, 1)


def run(
    config: ml_collections.ConfigDict,
    topology_name: str,
    vocab_size: int,
    num_slices: int = 1,
    mode: str = "train",
    rows_per_chip: int | None = None,
    seq_lens: list[int] | None = None,
    attentions: list[str] | None = None,
    find_mesh: bool = False,
    decode_rows: int = 64,
    beam_size: int = 4,
    alpha: float = 0.6,
    extra_length: int = 50,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Rows for `config` compiled on `topology_name` (x `num_slices`): one per sequence length
    and attention asked for, or with `find_mesh` the candidates of `search` for each."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if rows_per_chip is not None and rows_per_chip < 1:
        raise ValueError(f"--rows_per_chip must be at least 1, got {rows_per_chip}")
    topo = topology.parse(topology_name, num_slices)
    devices = topology.devices(topo)
    rows = []
    for variant in variants(config, seq_lens or [], attentions or []):
        if find_mesh and mode == "train":
            rows += search(variant, topo, devices, vocab_size, rows_per_chip, on_row)
            continue
        if mode == "train":
            row = compile_train(variant, topo, devices, vocab_size, rows_per_chip)
        else:
            host_chips = sum(d.process_index == devices[0].process_index for d in devices)
            row = compile_decode(variant, topo, devices, vocab_size,
                                 rows_per_chip * host_chips if rows_per_chip else decode_rows,
                                 beam_size, alpha, extra_length)
        logging.info("compiled %s", row)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def write_outputs(rows: list[Row], output: str) -> list[str]:
    """OUTPUT/compile.json (the rows as a list of objects) and OUTPUT/compile.md (the Markdown
    table, with the model and the estimate's method above it)."""
    os.makedirs(output, exist_ok=True)
    paths = [os.path.join(output, name) for name in ("compile.json", "compile.md")]
    with open(paths[0], "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    with open(paths[1], "w") as f:
        notes = sorted({f"{r.model}, {r.mode}; estimate: {r.estimate_method}"
                        for r in rows if r.estimate_method})
        f.write("\n".join([*notes, "", *markdown_table(rows)]) + "\n")
    return paths


def _gib(num_bytes: float | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**30:.2f}"


def _kernels(row: Row) -> str:
    return "-" if not row.kernels else str(row.kernels["total"])


def _tflops(row: Row) -> str:
    """XLA's TFLOP per chip; "-" where XLA counts none (a GPU compiled for without one)."""
    return "-" if row.flops_per_chip is None else f"{row.flops_per_chip / 1e12:.2f}"


def _memory(row: Row) -> str:
    """"arguments/temporaries/total" GiB per chip (the compiler's total alone for a program
    it refused)."""
    parts = row.memory_breakdown or {}
    total = _gib(row.memory_per_chip_bytes)
    if "arguments" not in parts and "temporaries" in parts:  # refused: temporaries alone known
        total = ">" + total
    return "/".join([_gib(parts.get("arguments")), _gib(parts.get("temporaries")), total])


def format_table(rows: list[Row]) -> list[str]:
    """The terminal table: one line per row (the header alone for no rows)."""
    lines = [
        f"{'topology':>12} {'mesh d,f,t':>11} {'attention':>9} {'remat':>5} {'rows':>5} "
        f"{'len':>5} {'GiB/chip args/temp/total':>24} {'HBM':>4} {'fits':>4} {'TFLOP/chip':>10} "
        f"{'est s':>8} "
        f"{'est tok/s/chip':>14} {'est MFU (compute)':>17} {'AG/RS/AR/A2A GiB':>22} "
        f"{'kernels':>7} {'compile s':>9}"
    ]
    for r in rows:
        mesh = ",".join(str(r.mesh.get(a, "?")) for a in sharding.MESH_AXES)
        head = (f"{r.topology + ('x' + str(r.num_slices) if r.num_slices > 1 else ''):>12} "
                f"{mesh:>11} {r.attention:>9} {r.remat:>5} {r.batch_rows:>5} "
                f"{max(r.lengths.values(), default=0):>5} {_memory(r):>24} "
                f"{r.hbm_per_chip_bytes / 2**30:>4.0f} {'yes' if r.fits else 'no':>4}")
        if r.estimated_step_time_s is None:
            lines.append(f"{head}  {r.error or ''}")
            continue
        collective = "/".join(
            f"{r.collectives.get(k, {}).get('bytes', 0) / 2**30:.2f}"
            for k in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all"))
        lines.append(
            f"{head} {_tflops(r):>10} {r.estimated_step_time_s:>8.4f} "
            f"{r.estimated_tokens_per_s_per_chip:>14,.0f} "
            f"{f'{r.estimated_mfu:.1%} ({r.estimated_mfu_compute_bound:.0%})':>17} "
            f"{collective:>22} {_kernels(r):>7} {r.compile_time_s:>9.1f}"
        )
    return lines


def markdown_table(rows: list[Row]) -> list[str]:
    """The rows as a Markdown table (what docs/tpu.md shows), written beside compile.json."""
    lines = [
        "| topology | chips | mesh (data, fsdp, tensor) | attention | remat | rows x tokens "
        "| GiB per chip: arguments / temporaries / total (HBM) | fits | est. tokens/s per chip "
        "| est. MFU (compute-bound) | estimate from | collectives per step, GiB per chip: "
        "all-gather / reduce-scatter / all-reduce / all-to-all (over DCN) | kernels | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        slices = (f" x {r.num_slices} {topology.parse(r.topology).slices_name}"
                  if r.num_slices > 1 else "")
        mesh = ", ".join(str(r.mesh.get(a, "?")) for a in sharding.MESH_AXES)
        tokens = max(r.lengths.values(), default=0)
        memory = f"{_memory(r).replace('/', ' / ')} ({r.hbm_per_chip_bytes / 2**30:.0f})"
        kinds = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
        collective = " / ".join(
            f"{r.collectives.get(k, {}).get('bytes', 0) / 2**30:.2f}" for k in kinds)
        dcn = sum(c.get("dcn_bytes", 0) for c in r.collectives.values())
        if dcn:
            collective += f" ({dcn / 2**20:.1f} MiB over DCN)"
        source = "-" if not r.estimate_method else (
            "XLA" if r.estimate_method.startswith("XLA") else "roofline")
        speed = ("-" if r.estimated_tokens_per_s_per_chip is None
                 else f"{r.estimated_tokens_per_s_per_chip:,.0f}")
        mfu = "-" if r.estimated_mfu is None else (
            f"{r.estimated_mfu:.1%} ({r.estimated_mfu_compute_bound:.0%})")
        if r.error and r.estimated_step_time_s is None:
            collective = "does not fit" if r.fits is False else r.error[:80]
        lines.append(
            f"| {r.topology}{slices} | {r.chips} | {mesh} | {r.attention} | {r.remat} | "
            f"{r.batch_rows} x "
            f"{tokens} | {memory} | {'yes' if r.fits else 'no'} | {speed} | {mfu} | {source} | "
            f"{collective} | {_kernels(r)} | {r.compile_time_s or 0:.0f} |"
        )
    return lines
