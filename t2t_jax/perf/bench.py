"""Throughput and memory against sequence length: `t2t-jax bench`.

For each sequence length and attention implementation the compiled train step (or forward pass,
or decoding of seq_len tokens per row with the key/value cache, greedy or beam search) is timed
on random tokens: the mean time of steps dispatched back to back after a warm-up step, as
training runs them (the host queues the next step while the devices run this one); tokens/s;
model FLOPs per step from the formula below (cross-checked against XLA's cost analysis); MFU
against the device's peak; peak memory and compile time. A point that does not fit in memory
is a row with `error`. `--profile` adds where the devices' time went (`t2t_jax/perf/profiling.py`).

Model FLOPs are each model type's formula (`ModelType.flops_per_step`, Kaplan et al. 2020 and
PaLM appendix B conventions: 2 FLOPs per weight a token multiplies, plus attention's scores
and weighted sum over the full length; a train step is 3 forward passes' worth).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from t2t_jax import sharding
from t2t_jax.model import ModelConfig, build_model
from t2t_jax.model.kernels import select_attention
from t2t_jax.model.models import NotSupported, model_type
from t2t_jax.perf import profiling
from t2t_jax.runtime import chips
from t2t_jax.train_step import JitStepper, eval_step, make_rngs, make_step_fns

COLUMNS = (
    "seq_len", "attention", "mode", "tokens_per_s", "step_time_s", "flops_per_step",
    "xla_flops_per_step", "mfu", "peak_memory_bytes", "compile_time_s", "error", "beam_size",
)


def device_peak_flops(matmul_size: int = 2048) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from): the table for known
    accelerators; on anything else, a float32 matmul measured now."""
    kind = jax.devices()[0].device_kind
    peak = chips.peak_flops_of(kind)
    if peak is not None:
        return peak, f"{kind}: data-sheet bf16 peak"
    a = jnp.ones((matmul_size, matmul_size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    # The first few runs after compiling are slower (thread pools, clocks ramping up), and a
    # shared VM varies from run to run: warm up, then take the best of many, so that the
    # denominator is the peak and MFU errs low.
    for _ in range(5):
        matmul(a).block_until_ready()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    peak = 2 * matmul_size**3 / min(times)
    return peak, f"{kind}: measured {matmul_size}^3 float32 matmul"


def _fake_batch(
    config: ModelConfig, rows: int, seq_len: int, seed: int, packed_examples: int = 0
) -> dict[str, np.ndarray]:
    """Random full rows; with `packed_examples` K, each row packs K examples of equal length
    (the last takes the remainder), with their segment ids and positions, as data.packing
    makes them."""
    rng = np.random.default_rng(seed)
    tokens = lambda: rng.integers(3, config.vocab_size, size=(rows, seq_len), dtype=np.int32)  # noqa: E731
    sides = model_type(config).token_features()
    batch = {side: tokens() for side in sides}
    if packed_examples:
        width = seq_len // packed_examples
        example = np.minimum(np.arange(seq_len) // width, packed_examples - 1)
        for side in sides:
            batch[f"{side}_segmentation"] = np.tile(example + 1, (rows, 1)).astype(np.int32)
            batch[f"{side}_position"] = np.tile(np.arange(seq_len) - example * width,
                                                (rows, 1)).astype(np.int32)
    return batch


def _memory_bytes(compiled: Any) -> int:
    """Device memory the step needs: the compiled program's arguments + outputs + temporaries
    (XLA's buffer assignment, fused kernels' workspaces included). Not the allocator's
    `peak_bytes_in_use`: that never resets, so every later point would inherit the largest."""
    memory = compiled.memory_analysis()
    return int(
        memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


@dataclasses.dataclass
class Point:
    """One measured (length, attention, mode) point."""

    seq_len: int
    attention: str
    mode: str
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    flops_per_step: float | None = None
    xla_flops_per_step: float | None = None
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    compile_time_s: float | None = None
    error: str | None = None
    beam_size: int = 1  # decode mode: beams per row (1: greedy)
    profile: dict | None = None  # `profiling.Breakdown` as a dict, with --profile
    packed_examples: int = 0  # examples packed in each row (0: one example filling the row)


def measure_point(
    config: ml_collections.ConfigDict,
    model_config: ModelConfig,
    seq_len: int,
    rows: int,
    mode: str,
    steps: int,
    peak_flops: float,
    profile_dir: str | None = None,
    beam_size: int = 1,
    packed_examples: int = 0,
) -> Point:
    """Times `steps` steps at one sequence length; out-of-memory becomes the row's error.
    With `profile_dir`, up to 3 more steps run under the profiler: their trace goes to a
    folder of it named after the point, their device time by category to `point.profile`.
    `packed_examples`: rows of that many packed examples (`_fake_batch`)."""
    label = _attention_label(model_config)
    point = Point(seq_len, label, mode, beam_size=beam_size if mode == "decode" else 1,
                  packed_examples=packed_examples)
    lengths = {side: seq_len for side in model_type(model_config).token_features()}
    model = build_model(model_config)
    fns = dataclasses.replace(
        make_step_fns(config, model, model_config.d_model), grad_accum_steps=1
    )
    try:
        stepper = JitStepper(fns, sharding.make_mesh(config.mesh), lengths)
        with stepper.activate():
            state = stepper.init_state(jax.random.key(0))
            batch = stepper.put_batch(
                _fake_batch(model_config, rows, seq_len, 0, packed_examples)
            )
            rng = make_rngs(config.seed, config.train.dropout_rng)[1]
            function, args = _program(mode, stepper, model, state, batch, rng, seq_len,
                                      point.beam_size)
            start = time.perf_counter()
            compiled = function.lower(*args).compile()
            point.compile_time_s = time.perf_counter() - start
            point.xla_flops_per_step = _xla_flops(compiled, stepper.mesh.devices.size)
            run_step = _Runner(compiled, args, donates_state=mode == "train")
            step_time = _mean_step_time(run_step, steps)
            point.peak_memory_bytes = _memory_bytes(compiled)
            if profile_dir:
                log_dir = os.path.join(profile_dir, f"{mode}_{label}_{seq_len}".replace(":", "_"))
                result = profiling.profile(
                    lambda: run_step(wait=False), compiled.as_text(), log_dir, min(steps, 3)
                )
                point.profile = dataclasses.asdict(result)
    except Exception as error:  # XLA reports out-of-memory as several exception types.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
            raise
        point.error = f"out of memory: {message[:200]}"
        return point
    _set_speed(point, model_config, rows, step_time, peak_flops)
    return point


def _attention_label(model_config: ModelConfig) -> str:
    """The kernel's name; for "auto", what it chose on this device ("auto:cudnn")."""
    if model_config.attention != "auto":
        return model_config.attention
    chosen = select_attention("auto", jax.devices()[0].platform, model_config.dtype)[0]
    return f"auto:{chosen}"


def _set_speed(point: Point, model_config: ModelConfig, rows: int, step_time: float,
               peak_flops: float) -> None:
    """The point's step time, tokens/s, model FLOPs and MFU (none for a model type without a
    FLOPs formula). Decoding does a forward pass's useful work, token by token, on every beam."""
    point.step_time_s = step_time
    point.tokens_per_s = rows * point.seq_len / step_time
    mode = "forward" if point.mode == "decode" else point.mode
    try:
        point.flops_per_step = model_type(model_config).flops_per_step(
            rows * point.beam_size, point.seq_len, mode)
    except NotSupported:  # the LSTM baseline: speed without MFU
        return
    point.mfu = point.flops_per_step / step_time / (peak_flops * jax.device_count())


def _program(mode: str, stepper: JitStepper, model, state, batch: dict, rng, seq_len: int,
             beam_size: int) -> tuple[Callable, tuple]:
    """(the jitted function one step of `mode` runs, its arguments)."""
    if mode == "train":
        return stepper.jitted_train_step, (state, batch, rng)
    if mode == "decode":
        function, args = _decoder(model, model.config, batch, seq_len, beam_size)
        return function, (state.params, *args)
    return jax.jit(lambda p, b: eval_step(stepper.fns, p, b)), (state.params, batch)


def _xla_flops(compiled, num_devices: int) -> float | None:
    """XLA's FLOPs of the whole step (it analyses the per-device SPMD program)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    device_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return device_flops * num_devices or None


class _Runner:
    """Runs a compiled step again and again; a train step goes on from the state it returns
    (it donated the one it was given)."""

    def __init__(self, compiled, args: tuple, donates_state: bool):
        self.compiled, self.args, self.donates_state = compiled, args, donates_state

    def __call__(self, wait: bool = True):
        out = self.compiled(*self.args)
        if self.donates_state:
            self.args = (out[0], *self.args[1:])
        return jax.block_until_ready(out) if wait else out


def _mean_step_time(run_step: _Runner, steps: int) -> float:
    """Seconds a step, after a warm-up step. Dispatched back to back, as the training loop does:
    the host prepares the next step while the devices run this one, so its dispatch cost is not
    step time."""
    run_step()
    start = time.perf_counter()
    for _ in range(steps):
        out = run_step(wait=False)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def _decoder(model, model_config: ModelConfig, batch: dict, seq_len: int, beam_size: int):
    """(jittable function of (params, *args), args): the decoding path's own batch search
    (`decode.search_batch`), generating seq_len tokens per row over the key/value cache,
    greedily or by beam search: from a seq_len-token source for the encoder-decoder, from a
    one-token prompt for the decoder-only model. Random weights seldom end a sentence, so
    every row runs to seq_len tokens."""
    from t2t_jax import decode

    settings = decode.Search(beam_size=beam_size, alpha=0.6)
    inputs, length = model_type(model_config).search_inputs(batch, seq_len)
    rng = jax.random.key(0)
    return jax.jit(
        lambda p, x: decode.search_batch((model,), (p,), x, rng, settings, length)
    ), (inputs,)


def run_bench(
    config: ml_collections.ConfigDict,
    vocab_size: int,
    seq_lens: list[int],
    attentions: list[str],
    mode: str,
    batch_tokens: int,
    steps: int = 3,
    on_point: Callable[[Point], None] | None = None,
    profile_dir: str | None = None,
    beam_size: int = 1,
    packed_examples: int = 0,
) -> tuple[list[Point], str]:
    """All points (lengths ascending; an implementation stops at its first out-of-memory
    length), and where the peak FLOP/s figure comes from. Each point has about `batch_tokens`
    tokens a side: batch_tokens // seq_len rows, a multiple of the device count. `on_point` sees
    each point as it is measured (progress on long runs); `profile_dir`: see `measure_point`;
    `beam_size` > 1: decode mode searches with that many beams; `packed_examples` K: train and
    forward rows pack K examples each (the FLOPs counted stay those of full rows)."""
    if mode not in ("train", "forward", "decode"):
        raise ValueError(f"--mode must be train, forward or decode, got {mode!r}")
    if packed_examples and (mode == "decode" or min(seq_lens) < packed_examples):
        raise ValueError(f"--packed_examples {packed_examples} needs --mode train or forward "
                         "and sequence lengths of at least that many tokens")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1 (steps timed after the warm-up), got {steps}")
    peak, peak_source = device_peak_flops()
    points = []
    for attention in attentions:
        model_config = ModelConfig.from_config(
            dict(config.model) | {"attention": attention}, vocab_size
        )
        for seq_len in sorted(seq_lens):
            rows = max(jax.device_count(), batch_tokens // seq_len // jax.device_count()
                       * jax.device_count())
            point = measure_point(
                config, model_config, seq_len, rows, mode, steps, peak, profile_dir, beam_size,
                packed_examples,
            )
            logging.info("bench %s", point)
            points.append(point)
            if on_point:
                on_point(point)
            if point.error:  # longer sequences will not fit either
                break
    return points, peak_source


def write_outputs(points: list[Point], output: str, title: str) -> list[str]:
    """bench.json, bench.csv and bench.png (tokens/s and memory against length) in `output`."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output, exist_ok=True)
    rows = [dataclasses.asdict(p) for p in points]
    paths = [os.path.join(output, name) for name in ("bench.json", "bench.csv", "bench.png")]
    with open(paths[0], "w") as f:
        json.dump(rows, f, indent=2)
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for attention in sorted({p.attention for p in points}):
        ok = [p for p in points if p.attention == attention and not p.error]
        lengths = [p.seq_len for p in ok]
        speed.plot(lengths, [p.tokens_per_s for p in ok], marker="o", label=attention)
        memory.plot(lengths, [p.peak_memory_bytes / 2**20 for p in ok], marker="o",
                    label=attention)
    for axis, label in ((speed, "tokens/s"), (memory, "peak memory (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(paths[2], dpi=100)
    plt.close(figure)
    return paths


def format_table(points: list[Point]) -> list[str]:
    """The terminal table."""
    lines = [
        f"{'seq_len':>8} {'attention':>22} {'mode':>7} {'tokens/s':>11} {'step s':>9} "
        f"{'GFLOP/step':>11} {'XLA GFLOP':>10} {'MFU':>7} {'mem MiB':>9} {'compile s':>9}"
    ]
    for p in points:
        mode = p.mode if p.beam_size == 1 else f"beam{p.beam_size}"
        if p.error:
            lines.append(f"{p.seq_len:>8} {p.attention:>22} {mode:>7}  {p.error}")
            continue
        lines.append(
            f"{p.seq_len:>8} {p.attention:>22} {mode:>7} {p.tokens_per_s:>11,.0f} "
            f"{p.step_time_s:>9.4f} {(p.flops_per_step or 0) / 1e9:>11.2f} "
            f"{(p.xla_flops_per_step or 0) / 1e9:>10.2f} {p.mfu or 0:>7.2%} "
            f"{p.peak_memory_bytes / 2**20:>9.1f} {p.compile_time_s:>9.2f}"
        )
    return lines
