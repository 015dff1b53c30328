"""Orbax checkpoints under WORKDIR/checkpoints: the train state and the resolved config.

A checkpoint stores global arrays, so it restores onto any mesh: the restore target carries the
shardings of the run that reads it, not of the run that wrote it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
import tensorflow as tf

from t2t_jax.data.tokenizer import Tokenizer, tokenizer_from_json

CONFIG_FILENAME = "config.json"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, train_config: Any) -> ocp.CheckpointManager:
    """Keeps the last `train.keep_checkpoints`, saving asynchronously if `async_checkpoints`."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=train_config.keep_checkpoints,
        enable_async_checkpointing=train_config.async_checkpoints,
        create=True,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=("state", "config", "tokenizer")
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
) -> None:
    """Starts saving `state`, `config` and `tokenizer` as checkpoint `step`, so that a checkpoint
    alone is enough to decode (returns before it is written when saves are asynchronous;
    `manager.wait_until_finished()` waits)."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
            tokenizer=ocp.args.JsonSave(tokenizer.to_json()),
        ),
        force=True,
    )


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


def input_state_dir(workdir: str, step: int, process_index: int, process_count: int) -> str:
    """Where one process keeps its input position for checkpoint `step`."""
    return os.path.join(
        os.path.abspath(workdir), "input_state", str(step),
        f"process_{process_index}_of_{process_count}",
    )


def prune_input_states(workdir: str, keep_steps: set[int]) -> None:
    """Removes the input positions of checkpoints that no longer exist."""
    root = os.path.join(os.path.abspath(workdir), "input_state")
    for name in tf.io.gfile.listdir(root) if tf.io.gfile.exists(root) else []:
        name = name.rstrip("/")
        if name.isdigit() and int(name) not in keep_steps:
            tf.io.gfile.rmtree(os.path.join(root, name))


def save_config_json(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the resolved config as WORKDIR/config.json (what decode and info rebuild from)."""
    path = os.path.join(workdir, CONFIG_FILENAME)
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    return path


def warn_on_changed_data(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Logs a warning for each seed or data field that differs from the run this workdir holds:
    a resumed run then no longer sees the batches the first run would have. Returns them."""
    if not os.path.exists(os.path.join(workdir, CONFIG_FILENAME)):
        return []
    old = _flatten(load_config_json(workdir).to_dict())
    new = _flatten(json.loads(config.to_json_best_effort()))
    changed = [
        key for key in sorted(set(old) | set(new))
        if key.split(".")[0] in ("seed", "data") and old.get(key) != new.get(key)
    ]
    for key in changed:
        logging.warning(
            "%s changed from %r to %r since this workdir's run; resumed input will differ",
            key, old.get(key), new.get(key),
        )
    return changed


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_config_json(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {CONFIG_FILENAME} in {workdir}; is it a t2t-jax workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
