"""Orbax checkpoints under WORKDIR/checkpoints: the train state and the resolved config.

A checkpoint stores global arrays, so it restores onto any mesh: the restore target carries the
shardings of the run that reads it, not of the run that wrote it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from t2t_jax import files
from t2t_jax.data.tokenizer import Tokenizer, tokenizer_from_json
from t2t_jax.run_config import flatten, save_config_json, with_predating_defaults

# Settings of `config.model` that may change the params' tree or shapes: what `check_resumable`
# names when a workdir's checkpoints do not fit the model a config builds.
PARAM_SHAPING_KEYS = (
    "type", "num_encoder_layers", "num_decoder_layers", "d_model", "d_ff", "num_heads",
    "share_embeddings", "attention_bias", "norm", "positional", "max_positions", "scan_layers",
    "vocab_size",
)
# Settings of `config.train` that add parts to the optimizer state above these values (clipping
# adds a transformation to the chain, accumulation wraps the chain).
OPTIMIZER_SHAPING_KEYS = {"grad_clip_norm": 0.0, "grad_accum_steps": 1}


def absolute(path: str) -> str:
    """A local path made absolute; a URL (gs://...) as it is."""
    return path if "://" in path else os.path.abspath(path)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(absolute(workdir), "checkpoints")


def make_manager(workdir: str, train_config: Any) -> ocp.CheckpointManager:
    """Keeps the last `train.keep_checkpoints`, saving asynchronously if `async_checkpoints`."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=train_config.keep_checkpoints,
        enable_async_checkpointing=train_config.async_checkpoints,
        create=True,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options,
        item_names=("state", "config", "tokenizer", "input"),
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    input_position: dict | None = None,
) -> None:
    """Starts saving `state`, `config`, `tokenizer` and the train input's position (the same on
    every process: the epoch and index of the next global batch, and the prepared dataset's
    key) as checkpoint `step`, so that a checkpoint alone is enough to decode and to resume
    (returns before it is written when saves are asynchronous;
    `manager.wait_until_finished()` waits)."""
    items = dict(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        tokenizer=ocp.args.JsonSave(tokenizer.to_json()),
    )
    if input_position is not None:
        items["input"] = ocp.args.JsonSave(input_position)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_input_position(workdir: str, step: int) -> dict | None:
    """The train input's position saved with checkpoint `step`; None for checkpoints written
    before it was saved there (t2t_jax of before 2026-12-04 kept tf.data iterator states)."""
    step_dir = os.path.join(checkpoint_dir(workdir), str(step))
    if not files.isdir(os.path.join(step_dir, "input")):
        return None
    return _json_item(step_dir, "input")


def restore_tokenizer(manager: ocp.CheckpointManager, step: int) -> Tokenizer:
    """The tokenizer stored with checkpoint `step`."""
    restored = manager.restore(step, args=ocp.args.Composite(tokenizer=ocp.args.JsonRestore()))
    return tokenizer_from_json(restored.tokenizer)


def restore_target(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the shardings to restore onto."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
    """The state saved at `step`, laid out as `target` says; a clear error if it cannot be."""
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    except Exception as error:  # Orbax raises many types for unreadable or mismatched files.
        path = os.path.join(str(manager.directory), str(step))
        raise ValueError(
            f"checkpoint {path} could not be restored ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); it is corrupt or from another "
            "model config: delete it, or train in a fresh workdir"
        ) from error
    logging.info("restored checkpoint at step %d", step)
    return restored.state


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the finished checkpoints in `workdir`, oldest first."""
    directory = checkpoint_dir(workdir)
    if not files.isdir(directory):
        return []
    return sorted(int(name) for name in files.listdir(directory) if name.isdigit())


def _step_or_latest(workdir: str, step: int | None) -> int:
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}; train first")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; there are {steps}"
        )
    return step


def restore_host_state(workdir: str, step: int | None = None, params_only: bool = True):
    """(tree, step): checkpoint `step` (default: the latest) as host numpy arrays, whatever
    mesh wrote it. With `params_only` the optimizer state is not read at all."""
    step = _step_or_latest(workdir, step)
    path = os.path.join(checkpoint_dir(workdir), str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = _quietly(checkpointer.metadata, path).item_metadata.tree
        if params_only:
            tree = {"params": tree["params"]}
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
        restored = checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=item, restore_args=as_numpy, partial_restore=params_only
            ),
        )
    except Exception as error:  # Orbax raises many types for unreadable files.
        raise ValueError(
            f"checkpoint {path} could not be read ({type(error).__name__}); it is corrupt or "
            "incomplete: pass another --step"
        ) from error
    return restored, step


def _quietly(fn, *args):
    """Calls fn with Orbax's warnings muted: reading one item of a composite checkpoint warns
    that the item has no metadata file of its own, which is how Orbax writes it."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return fn(*args)
    finally:
        absl_logger.setLevel(level)


def restore_config_and_tokenizer(workdir: str, step: int) -> tuple[ml_collections.ConfigDict, Any]:
    """The resolved config and the tokenizer stored with checkpoint `step`."""
    step_dir = os.path.join(checkpoint_dir(workdir), str(step))
    items = {name: _json_item(step_dir, name) for name in ("config", "tokenizer")}
    config = with_predating_defaults(ml_collections.ConfigDict(items["config"]))
    return config, tokenizer_from_json(items["tokenizer"])


def _json_item(step_dir: str, name: str) -> Any:
    """The JSON item `name` of one checkpoint step (its config or tokenizer)."""
    path = os.path.join(step_dir, name)
    if not files.isdir(path):
        raise FileNotFoundError(
            f"checkpoint {step_dir} has no {name}; it is incomplete or from an older t2t_jax"
        )
    reader = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    return reader.restore(path, args=ocp.args.JsonRestore())


def newest_steps(workdir: str, last: int, up_to: int | None = None) -> list[int]:
    """The steps of the newest `last` checkpoints of `workdir` (those up to step `up_to` if
    given), oldest first; a clear error if there are fewer."""
    steps = checkpoint_steps(workdir)
    if up_to is not None:
        _step_or_latest(workdir, up_to)
        steps = [step for step in steps if step <= up_to]
    if last < 1 or len(steps) < last:
        raise ValueError(
            f"asked to average the last {last} checkpoints but {checkpoint_dir(workdir)} has "
            f"{len(steps)}{f' up to step {up_to}' if up_to is not None else ''}; average fewer "
            "or keep more (train.keep_checkpoints)"
        )
    return steps[-last:]


def mean_params(workdir: str, steps: Sequence[int]) -> Any:
    """The mean of the params of checkpoints `steps` (host numpy, summed in float64, in the
    saved dtypes)."""
    total, like = None, None
    for step in steps:
        like = restore_host_state(workdir, step)[0]["params"]
        params = jax.tree.map(lambda x: x.astype(np.float64), like)
        total = params if total is None else jax.tree.map(np.add, total, params)
    return jax.tree.map(lambda mean, x: (mean / len(steps)).astype(x.dtype), total, like)


def average_checkpoints(workdir: str, last: int, output: str) -> list[int]:
    """Writes the mean of the params of the last `last` checkpoints of `workdir` as a checkpoint
    of `output` (at the newest step, with its config and tokenizer, and what else it holds: the
    optimizer state of a train checkpoint, so that training could continue); returns the
    averaged steps. The paper averages the last 5 (base) or 20 (big) checkpoints, written at
    10-minute intervals."""
    steps = newest_steps(workdir, last)
    params = mean_params(workdir, steps)
    state, newest = restore_host_state(workdir, steps[-1], params_only=False)
    state["params"] = params
    config, tokenizer = restore_config_and_tokenizer(workdir, newest)
    config.train.async_checkpoints = False
    manager = make_manager(output, config.train)
    save(manager, newest, state, config, tokenizer)
    manager.wait_until_finished()
    manager.close()
    save_config_json(config, output)
    tokenizer.save(output)
    return steps


def has_tf_data_input_state(workdir: str, step: int) -> bool:
    """Whether an older t2t_jax saved a tf.data iterator state for checkpoint `step`
    (WORKDIR/input_state/STEP), which the prepared-ids reader cannot read."""
    return files.isdir(os.path.join(absolute(workdir), "input_state", str(step)))


def check_resumable(config: ml_collections.ConfigDict, workdir: str, abstract_params: Any) -> None:
    """Raises where the newest checkpoint in WORKDIR cannot restore into the train state that
    `config` builds, naming the settings to pass: Orbax's own error would say neither what
    differs nor what to do. Params are compared by shape with `abstract_params`, naming the
    `PARAM_SHAPING_KEYS` in which the run differed; the optimizer state's layout by
    `OPTIMIZER_SHAPING_KEYS`. It reads only the checkpoint (metadata and config), which no run
    rewrites, so every process may ask at once."""
    steps = checkpoint_steps(workdir)
    if not steps:
        return
    step_dir = os.path.join(checkpoint_dir(workdir), str(steps[-1]))
    try:
        metadata = _quietly(ocp.PyTreeCheckpointer().metadata, os.path.join(step_dir, "state"))
        saved_shapes = _shapes(metadata.item_metadata.tree["params"])
    except Exception:  # unreadable or incomplete: restoring it says so, in its own words
        return
    try:
        saved = with_predating_defaults(ml_collections.ConfigDict(_json_item(step_dir, "config")))
    except Exception:  # only needed to name the settings
        saved = None
    wanted_shapes = _shapes(abstract_params)
    if saved_shapes != wanted_shapes:
        first = next(path for path in sorted(saved_shapes.keys() | wanted_shapes.keys())
                     if saved_shapes.get(path) != wanted_shapes.get(path))
        raise ValueError(
            f"{workdir} holds checkpoints of another model ({first}: "
            f"{saved_shapes.get(first, 'absent')} there, {wanted_shapes.get(first, 'absent')} "
            f"here); resume with "
            f"{_model_settings_to_pass(saved, config) or 'the settings of its run'}, or train in "
            "a fresh workdir"
        )
    if saved is None:
        return
    settings = _optimizer_settings_to_pass(saved, config)
    if settings:
        raise ValueError(
            f"{workdir} holds an optimizer state of another layout (clipping or accumulation "
            f"adds a part to it); resume with {settings}, or train in a fresh workdir"
        )


def _optimizer_settings_to_pass(saved: ml_collections.ConfigDict,
                                config: ml_collections.ConfigDict) -> str:
    """The --config.train flags that give `config` the optimizer state's layout of `saved`."""

    def adds_a_part(train: ml_collections.ConfigDict, key: str) -> bool:
        return (train.get(key) or OPTIMIZER_SHAPING_KEYS[key]) > OPTIMIZER_SHAPING_KEYS[key]

    return " ".join(
        f"--config.train.{key}={saved.train.get(key, without)!r}"
        for key, without in OPTIMIZER_SHAPING_KEYS.items()
        if adds_a_part(saved.train, key) != adds_a_part(config.train, key)
    )


def _model_settings_to_pass(saved: ml_collections.ConfigDict | None,
                            config: ml_collections.ConfigDict) -> str:
    """The --config.model flags that give `config` the values of `saved` that shape params."""
    if saved is None:
        return ""
    learned = "learned" in (saved.model.get("positional"), config.model.get("positional"))
    keys = [key for key in PARAM_SHAPING_KEYS if key != "max_positions" or learned]
    return " ".join(f"--config.model.{key}={saved.model[key]!r}" for key in keys
                    if key in saved.model and saved.model[key] != config.model.get(key))


def _shapes(tree: Mapping) -> dict[str, tuple[int, ...]]:
    """{"encoder.layer_0....": shape} of a nested mapping of arrays or array metadata."""
    return {path: tuple(leaf.shape) for path, leaf in flatten(tree).items()}


def saved_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config of WORKDIR's newest checkpoint (`with_predating_defaults`), None if there is
    none or it has none."""
    steps = checkpoint_steps(workdir)
    if not steps:
        return None
    try:
        return restore_config_and_tokenizer(workdir, steps[-1])[0]
    except FileNotFoundError:  # a checkpoint without its config: restoring it will say so
        return None
