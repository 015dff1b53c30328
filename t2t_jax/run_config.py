"""The workdir's record of its run's config (WORKDIR/config.json): written at each start, compared
with the next start's data settings, and read with the defaults of keys older runs predate."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import ml_collections

from t2t_jax import files
from t2t_jax.config import RETIRED_KEYS

CONFIG_FILENAME = "config.json"


# What a `config.model` key meant before it existed, for configs saved by an earlier t2t_jax:
# attention projections had biases until model.attention_bias came (2026-11-27).
PREDATING_MODEL_DEFAULTS = {"attention_bias": True}


# Data settings that change how the input is read, not which batches it gives.
QUIET_DATA_KEYS = ("data.input_workers", "data.prepare_threads", "data.prepared_dir")


def save_config_json(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the resolved config as WORKDIR/config.json (what decode and info rebuild from)."""
    path = os.path.join(workdir, CONFIG_FILENAME)
    files.makedirs(workdir)
    with files.open_file(path, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    return path


def warn_on_changed_data(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Logs a warning for each seed or data field that differs from the run this workdir holds:
    a resumed run then no longer sees the batches the first run would have. Returns them."""
    if not files.exists(os.path.join(workdir, CONFIG_FILENAME)):
        return []
    old = flatten(load_config_json(workdir).to_dict())
    new = flatten(json.loads(config.to_json_best_effort()))
    changed = [
        key for key in sorted(set(old) | set(new))
        if key.split(".")[0] in ("seed", "data") and old.get(key) != new.get(key)
        and key not in RETIRED_KEYS and key not in QUIET_DATA_KEYS
    ]
    for key in changed:
        logging.warning(
            "%s changed from %r to %r since this workdir's run; resumed input will differ",
            key, old.get(key), new.get(key),
        )
    return changed


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """{"a.b": leaf} of a nested mapping (a config, or a tree of arrays or their metadata)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_config_json(workdir: str) -> ml_collections.ConfigDict:
    """WORKDIR/config.json, with `with_predating_defaults` for keys it was written before."""
    path = os.path.join(workdir, CONFIG_FILENAME)
    if not files.exists(path):
        raise FileNotFoundError(f"no {CONFIG_FILENAME} in {workdir}; is it a t2t-jax workdir?")
    with files.open_file(path) as f:
        return with_predating_defaults(ml_collections.ConfigDict(json.load(f)))


def with_predating_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A saved config, given the value each `PREDATING_MODEL_DEFAULTS` key had implicitly in
    the t2t_jax that wrote it, where the config predates the key."""
    model = config.get("model")
    if model is not None:
        for key, value in PREDATING_MODEL_DEFAULTS.items():
            if key not in model:
                model[key] = value
    return config
