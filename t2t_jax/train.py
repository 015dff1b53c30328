"""The training loop: config -> data -> model -> sharded steps -> metrics, eval, checkpoints.

The loop itself does no per-step host work beyond feeding batches: metrics stay on device and are
summed there, and the host reads them every `train.log_every` steps.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import tqdm
from flax import linen as nn

from t2t_jax import checkpoint, evaluate, metrics, run_config, selection, sharding
from t2t_jax.config import check_retired
from t2t_jax.data import loader, prepare, prepared, tasks
from t2t_jax.data import planner as planner_lib
from t2t_jax.data.batching import Position
from t2t_jax.data.tokenizer import has_tokenizer
from t2t_jax.model import ModelConfig, build_model
from t2t_jax.model.models import model_type
from t2t_jax.runtime.distributed import PreemptionWatch
from t2t_jax.train_step import (
    Stepper,
    TrainState,
    accumulate,
    make_rngs,
    make_step_fns,
    make_stepper,
)


@dataclasses.dataclass
class Experiment:
    """Everything built from a config before training starts."""

    config: ml_collections.ConfigDict
    dataset: prepared.PreparedDataset  # train, validation and test ids, tokenized once
    tokenizer: Any
    model_config: ModelConfig
    model: nn.Module
    stepper: Stepper
    steps_per_epoch: float | None = None  # worked out when training by train.num_epochs


DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"


def apply_process_settings(config: ml_collections.ConfigDict) -> None:
    """The process-wide settings a config asks for, which must be in place before JAX starts its
    backends: `deterministic` adds XLA's deterministic GPU ops to XLA_FLAGS. `train_and_evaluate`
    calls it, and the command line earlier (before the distributed runtime starts). Where JAX
    already runs on a GPU without the flag, it can no longer apply: a one-line error says so.
    CPU and TPU runs are deterministic either way."""
    if not config.deterministic:
        return
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_GPU_FLAG in xla_flags.split():
        return
    from jax._src import xla_bridge  # whether the backends started: no public API says

    if xla_bridge.backends_are_initialized():
        if jax.default_backend() == "gpu":
            raise ValueError(
                "deterministic=True needs XLA_FLAGS=--xla_gpu_deterministic_ops=true before JAX "
                "starts, and JAX already runs on the GPU: set it in the environment, or call "
                "train_and_evaluate before any JAX computation")
        return
    os.environ["XLA_FLAGS"] = f"{xla_flags} {DETERMINISTIC_GPU_FLAG}".strip()


def enable_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> None:
    """JAX's persistent compilation cache, so a restart does not recompile."""
    cache_dir = config.train.compilation_cache_dir
    if cache_dir == "":
        return
    cache_dir = cache_dir or os.path.join(workdir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def train_lengths(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The features of a train batch and their lengths, as the config's model type lays them."""
    return model_type(config.model).feature_lengths(config.data.max_source_length,
                                                    config.data.max_target_length)


def build_experiment(
    config: ml_collections.ConfigDict, devices: list | None = None, workdir: str | None = None
) -> Experiment:
    """Finds (or makes) the tokenizer, kept in `workdir`, and the prepared ids, and builds the
    model, optimizer, mesh and compiled steps."""
    check_retired(config)
    tokenizer = tasks.tokenizer_from_config(config.data, workdir)
    dataset = prepare.open_or_prepare(config.data, tokenizer)
    model_config = ModelConfig.from_config(config.model, tokenizer.vocab_size)
    model, stepper = build_stepper(config, model_config, sharding.make_mesh(config.mesh, devices))
    return Experiment(config, dataset, tokenizer, model_config, model, stepper)


def build_stepper(
    config: ml_collections.ConfigDict, model_config: ModelConfig, mesh: jax.sharding.Mesh
) -> tuple[nn.Module, Stepper]:
    """The model, built for the platform of `mesh`'s devices, and the compiled steps over
    `mesh`: what training runs, and what `t2t-jax compile` compiles for a TPU topology."""
    model = build_model(model_config, sharding.platform(mesh))
    fns = make_step_fns(config, model, model_config.d_model)
    return model, make_stepper(fns, mesh, config.train.mode, train_lengths(config))


def in_epochs(exp: Experiment) -> Experiment:
    """The experiment with `train.num_steps` worked out from `train.num_epochs` (a copy of the
    config), or unchanged when training is by steps."""
    epochs = exp.config.train.num_epochs
    if not epochs:
        return exp
    if epochs < 0:
        raise ValueError(f"train.num_epochs must be positive (or 0 to use train.num_steps), "
                         f"got {epochs}")
    planner = loader.make_planner(exp.config, exp.dataset.split("train"))
    per_epoch = planner.batches_per_epoch()
    planner.close()
    config = exp.config.copy_and_resolve_references()
    config.train.num_steps = max(1, math.ceil(epochs * per_epoch))
    logging.info("train.num_epochs=%g: %.1f steps an epoch, %d steps", epochs, per_epoch,
                 config.train.num_steps)
    exp = dataclasses.replace(exp, config=config, steps_per_epoch=per_epoch)
    if config.train.get("cooldown_fraction"):  # the cooldown needs the worked-out length
        model, stepper = build_stepper(config, exp.model_config, exp.stepper.mesh)
        exp = dataclasses.replace(exp, model=model, stepper=stepper)
    return exp


class TrainingDiverged(RuntimeError):
    """The loss, gradients or update became NaN or Inf and `train.on_nonfinite` is "stop"."""


class DevicePrefetcher:
    """Keeps `size` batches in flight to the devices ahead of the step that consumes them, and
    what a checkpoint needs of them: the input position of the oldest not yet trained on."""

    def __init__(self, batches: loader.TrainInput, put: Callable, size: int = 2):
        self._batches, self._put, self._size = batches, put, size
        self._queue: collections.deque = collections.deque()

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self):
        while len(self._queue) <= self._size:
            position = self._batches.position
            self._queue.append((position, self._put(next(self._batches))))
        return self._queue.popleft()[1]

    def position(self) -> Position:
        """Where the input resumes after the batches returned so far: the position of the
        oldest batch put on the devices but not yet returned."""
        return self._queue[0][0] if self._queue else self._batches.position


def input_position(exp: Experiment, workdir: str, start: int,
                   planner: planner_lib.Planner) -> Position:
    """Where the train input of a run resumed at step `start` continues: the position saved
    with that checkpoint; for checkpoints of an older t2t_jax (tf.data iterator states), the
    position this version's batch order reaches after `start` batches."""
    saved = checkpoint.restore_input_position(workdir, start) if start else None
    if saved is not None:
        if saved.get("dataset") != exp.dataset.key:
            logging.warning("the prepared ids changed since step %d was saved (dataset %s, now "
                            "%s: another tokenizer or changed files); the resumed input differs",
                            start, saved.get("dataset"), exp.dataset.key)
        return Position.from_json(saved)
    if start:
        old = ("a tf.data iterator state, which t2t_jax no longer reads"
               if checkpoint.has_tf_data_input_state(workdir, start) else "no input position")
        logging.warning("checkpoint %d has %s; continuing at the batch this version's input "
                        "order reaches after %d steps (not the batches the old run would have "
                        "seen next)", start, old, start)
    position = planner.advance(Position(), start)
    planner.forget_before(position.epoch)
    return position


def open_input(exp: Experiment, workdir: str, start: int) -> loader.TrainInput:
    """The train input positioned after `start` steps (`input_position`), this process's block
    of each global batch, gathered by `data.input_workers` workers."""
    data = exp.config.data
    split = exp.dataset.split("train")
    sampler = loader.sampling_tokenizer(exp.config, exp.tokenizer)
    block = exp.stepper.batch_shard
    planner = loader.make_planner(exp.config, split, sampler, block,
                                  rows_multiple=jax.local_device_count())
    try:
        planner_lib.log_plan(planner)
        position = input_position(exp, workdir, start, planner)
        return loader.TrainInput(split, planner, position, data.input_workers)
    except BaseException:
        planner.close()
        raise


def restore_or_init(exp: Experiment, manager, rng: jax.Array) -> TrainState:
    """The latest checkpoint's state if there is one, else a fresh one."""
    step = manager.latest_step()
    if step is None:
        return exp.stepper.init_state(rng)
    target = checkpoint.restore_target(exp.stepper.abstract_state, exp.stepper.state_shardings)
    return exp.stepper.to_devices(checkpoint.restore(manager, step, target))


@dataclasses.dataclass
class Run:
    """One training run's fixed parts: the experiment, where it writes, and the step RNG."""

    exp: Experiment
    workdir: str
    manager: Any  # Orbax CheckpointManager of WORKDIR/checkpoints
    writer: Any  # clu metric writer (metrics.jsonl and TensorBoard)
    step_rng: jax.Array


@dataclasses.dataclass
class LoopParts:
    """What the loop keeps besides the state: its input (the host iterator, whose position a
    checkpoint saves, and the batches in flight to the devices), the kept checkpoints, the
    progress bar (or lines) and the preemption watch."""

    batches: loader.TrainInput
    device_batches: DevicePrefetcher
    kept: selection.KeptCheckpoints
    progress: tqdm.tqdm
    preemption: PreemptionWatch
    lines: metrics.ProgressLines  # the bar's figures as text, where no bar is seen


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices: list | None = None
) -> dict[str, Any]:
    """Trains to `train.num_steps`, or for `train.num_epochs` (resuming from WORKDIR/checkpoints)
    on `devices` (default: all) and returns the last metrics, eval and test included, and decoded
    `samples`."""
    apply_process_settings(config)
    workdir = checkpoint.absolute(workdir)
    enable_compilation_cache(config, workdir)
    selection.check_select_by(config.train)
    exp = build_experiment(config, devices, workdir)
    # Before config.json is rewritten, so that a workdir of another model keeps its run's record.
    checkpoint.check_resumable(config, workdir, exp.stepper.abstract_state.params)
    is_main = jax.process_index() == 0
    if is_main:
        run_config.warn_on_changed_data(config, workdir)
        run_config.save_config_json(config, workdir)
        if not has_tokenizer(workdir):
            exp.tokenizer.save(workdir)
    exp = in_epochs(exp)
    config = exp.config
    manager = checkpoint.make_manager(workdir, config.train)
    writer = metrics.make_writer(workdir, is_main)
    init_rng, step_rng = make_rngs(config.seed, config.train.dropout_rng)
    run = Run(exp, workdir, manager, writer, exp.stepper.put_replicated(step_rng))
    try:
        with exp.stepper.activate():
            state = restore_or_init(exp, manager, init_rng)
            start = int(jax.device_get(exp.stepper.to_checkpoint(state).step))
            logging.info("training from step %d to %d", start, config.train.num_steps)
            return _train_loop(run, state, start)
    finally:  # a save in flight completes, whatever stopped the run
        manager.wait_until_finished()
        manager.close()
        writer.close()


def _save_checkpoint(run: Run, parts: LoopParts, step: int, state: TrainState) -> None:
    """The train state with Orbax, and in the same checkpoint the input position (the same on
    every process) and the prepared dataset's key. Orbax writes into a temporary directory and
    renames it when complete, so a killed save is never taken for a checkpoint."""
    position = parts.device_batches.position().to_json() | {"dataset": run.exp.dataset.key}
    checkpoint.save(run.manager, step, run.exp.stepper.to_checkpoint(state), run.exp.config,
                    run.exp.tokenizer, position)


def _check_finite(exp: Experiment, sums: dict | None, step: int, manager) -> dict | None:
    """Stops (`train.on_nonfinite` "stop") or warns ("skip") if a step since the last check was
    not finite (such steps did not change the state); returns the sums fetched to the host."""
    if sums is None:
        return None
    fetched = exp.stepper.fetch_metrics(sums)
    skipped = int(fetched["nonfinite"])
    if not skipped:
        return fetched
    if exp.config.train.on_nonfinite == "skip":
        logging.warning("step %d: %d steps had a NaN/Inf loss or update and were skipped",
                        step, skipped)
        return fetched
    raise TrainingDiverged(
        f"the loss or update became NaN/Inf in {skipped} of the steps up to {step}; kept the "
        f"last good checkpoint (step {manager.latest_step()}): lower train.learning_rate, raise "
        "train.warmup_steps, set train.grad_clip_norm (in a fresh workdir: clipping changes "
        "the optimizer state), or set train.on_nonfinite=skip"
    )


def _open_device_input(run: Run, start: int) -> tuple[loader.TrainInput, DevicePrefetcher]:
    """The host input after `start` steps, and the batches it feeds to the devices."""
    batches = open_input(run.exp, run.workdir, start)
    return batches, DevicePrefetcher(batches, run.exp.stepper.put_batch)


def _train_loop(run: Run, state: TrainState, start: int) -> dict[str, Any]:
    """The steps from `start`, then (unless preempted) the final report."""
    exp, config = run.exp, run.exp.config
    if config.train.on_nonfinite not in ("stop", "skip"):
        raise ValueError(
            f"train.on_nonfinite must be 'stop' or 'skip', got {config.train.on_nonfinite!r}"
        )
    is_main = jax.process_index() == 0
    # disable=None: a bar on a terminal, none in a log file; only process 0 shows one.
    progress = tqdm.tqdm(initial=start, total=config.train.num_steps,
                         disable=None if is_main else True, unit="step")
    preemption = PreemptionWatch()
    kept = selection.KeptCheckpoints(run.workdir, config, exp.tokenizer, is_main)
    parts = None
    try:
        lines = metrics.ProgressLines.where_unseen(config.train.num_steps, is_main)
        parts = LoopParts(*_open_device_input(run, start), kept, progress, preemption, lines)
        last = _loop(run, parts, state, start)
    finally:
        if parts is not None:
            parts.batches.close()
        kept.close()
        preemption.close()
        progress.close()
        run.writer.flush()
    if "preempted_at" in last:
        return last
    run.manager.wait_until_finished()
    if config.train.bleu_every and config.train.final_beam_size > 0 and is_main:
        step = last.get("step", config.train.num_steps)
        scores, texts = evaluate.final_report(exp, run.workdir)
        run.writer.write_texts(step, texts)
        _write(run.writer, step, scores)
        last = last | scores | texts
    return last


def _write(writer, step: int, scalars: dict) -> None:
    """Logs a row and flushes it, so that metrics.jsonl and TensorBoard show it while training
    runs and a killed run keeps it."""
    writer.write_scalars(step, scalars)
    writer.flush()


def _loop(run: Run, parts: LoopParts, state: TrainState, start: int) -> dict:
    exp, config, stepper, writer = run.exp, run.exp.config, run.exp.stepper, run.writer
    num_steps = config.train.num_steps
    kept = parts.kept
    sums, tick, last, waited = None, time.perf_counter(), {}, 0.0
    restored = start
    if kept.stopped():
        logging.info("early stopping ended this run at step %d; not training further", start)
        start = num_steps
    for step in range(start + 1, num_steps + 1):
        before = time.perf_counter()
        batch = next(parts.device_batches)
        waited += time.perf_counter() - before
        # Everything the step takes is on the devices already: an implicit host transfer here
        # would be a hidden round-trip on every step, so it is an error.
        with jax.transfer_guard("disallow"):
            state, step_metrics = stepper.train(state, batch, run.step_rng)
            sums = accumulate(sums, step_metrics)
        parts.progress.update()
        if parts.preemption.reached(step):
            _check_finite(exp, sums, step, run.manager)
            _save_checkpoint(run, parts, step, state)
            logging.warning("preempted: saved step %d; run the same command to resume", step)
            return last | {"preempted_at": step}
        if step % config.train.log_every == 0 or step == num_steps:
            fetched = _check_finite(exp, sums, step, run.manager)
            last = metrics.summarize_train(fetched, time.perf_counter() - tick, waited)
            if exp.steps_per_epoch:
                last["epoch"] = step / exp.steps_per_epoch
            _write(writer, step, last)
            parts.progress.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}")
            parts.lines.write(step, last)
            sums, tick, waited = None, time.perf_counter(), 0.0
        evaluated, dev_scores = _evaluations_due(run, step, state)
        if evaluated:  # their time is not the steps'
            last, tick, waited = last | evaluated, time.perf_counter(), 0.0
        stop = bool(dev_scores) and kept.note_dev_scores(
            step, dev_scores, stepper.to_checkpoint(state))
        if kept.pool_due(step):
            kept.save_to_pool(step, stepper.to_checkpoint(state))
        if stop or step % config.train.checkpoint_every == 0 or step == num_steps:
            _check_finite(exp, sums, step, run.manager)
            _save_checkpoint(run, parts, step, state)
        last["step"] = step
        if stop:
            record = kept.record
            logging.warning("early stop at step %d: %s has not beaten %.4g (step %d) in %d "
                            "evaluations", step, record.metric, record.best_score,
                            record.best_step, config.train.early_stop_evals)
            last["stopped_early_at"] = step
            break
    if start >= num_steps:  # nothing left to train: report the restored state
        last = evaluate.eval_metrics(exp, state) | {"step": restored}
    last["samples"] = evaluate.decode_samples(exp, state)
    return last


def _evaluations_due(run: Run, step: int, state: TrainState) -> tuple[dict, dict]:
    """The evaluations due at `step`, written to the metrics: (what they add to the last row,
    the dev scores that select checkpoints); both empty when none is due."""
    exp, config, writer = run.exp, run.exp.config, run.writer
    last_step = step == config.train.num_steps
    row, dev_scores = {}, {}
    if step % config.train.eval_every == 0 or last_step:
        evals = evaluate.eval_metrics(exp, state)
        _write(writer, step, evals)
        row, dev_scores = row | evals, dev_scores | evals
    bleu_every = config.train.bleu_every
    if bleu_every and (step % bleu_every == 0 or last_step):
        scores, signatures = evaluate.bleu_scores(exp, state)
        writer.write_texts(step, signatures)
        _write(writer, step, scores)
        row, dev_scores = row | scores | signatures, dev_scores | scores
    return row, dev_scores
