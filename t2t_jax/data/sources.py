"""What data a config names, without reading any: the task, its text files, its identity (the
prepared ids' directory name), the tokenizer settings, and where TFDS and the prepared ids live.
Every data module reads these; this one imports none of them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Any

from t2t_jax import files

TRANSLATION_TASKS = ("wmt14_translate/de-en", "wmt17_translate/de-en")


# The built-in tasks (data/algorithmic.py, which needs TFDS to import).
BUILTIN_TASKS = ("reverse", "copy", "sort", "addition")


# TFDS split names and the data.* prefix of the files that give them (task parallel_text).
SPLIT_KEYS = {"train": "train", "validation": "eval", "test": "test"}


def is_builtin(data_config: Any) -> bool:
    return data_config.task in BUILTIN_TASKS


def tensorflow_available() -> bool:
    """Whether TensorFlow and TFDS can be imported (making datasets needs them, reading
    prepared ids does not)."""
    return all(importlib.util.find_spec(name) is not None
               for name in ("tensorflow", "tensorflow_datasets"))


def tfds_data_dir(data_config: Any) -> str:
    """`data.data_dir`, else TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    return data_config.data_dir or os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def files_from_config(data_config: Any) -> tuple:
    """(split, source, target) triples from data.{train,eval,test}_{source,target,tsv}."""
    triples = []
    for split, key in SPLIT_KEYS.items():
        tsv = data_config.get(f"{key}_tsv")
        source, target = data_config.get(f"{key}_source"), data_config.get(f"{key}_target")
        if tsv:
            triples.append((split, tsv, None))
        elif source or target:
            if not (source and target):
                raise ValueError(f"set both data.{key}_source and data.{key}_target (or {key}_tsv)")
            triples.append((split, source, target))
        elif split == "train":
            raise ValueError(
                "data.task='parallel_text' needs data.train_source and data.train_target "
                "(or data.train_tsv)"
            )
    return tuple(triples)


def user_files(data_config: Any) -> list[str]:
    """The text files a parallel_text config reads (absolute); none for other tasks."""
    if data_config.task != "parallel_text":
        return []
    paths = [p for _, source, target in files_from_config(data_config) for p in (source, target)]
    return [p if files.is_url(p) else os.path.abspath(p) for p in paths if p]


def dataset_identity(data_config: Any) -> tuple[str, dict]:
    """(name, identity): what the config says its examples are (task, files, languages, the
    generated tasks' settings), and a directory name for it: the task and the identity's hash.
    Tokenizer settings are not part of it (each tokenizer has its own prepared ids)."""
    task = data_config.task
    # Not the data dir: the prepared ids live under it, and may move with it to another host.
    identity = {"task": task}
    if is_builtin(data_config):
        identity["algorithmic"] = dict(data_config.algorithmic)
    elif task == "parallel_text":
        identity["files"] = [[split, *(p and os.path.abspath(p) for p in pair)]
                             for split, *pair in files_from_config(data_config)]
    else:
        identity["languages"] = [data_config.source_language, data_config.target_language]
        identity["test_task"] = data_config.test_task
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"{task.replace('/', '_')}-{digest}", identity


def tokenizer_settings(data_config: Any) -> dict:
    """What decides a trained tokenizer: a prepared dataset made with the same settings may lend
    its tokenizer to a new workdir."""
    if is_builtin(data_config):
        return {"symbols": data_config.algorithmic.vocab_size}
    if data_config.tokenizer_model:
        return {"model": data_config.tokenizer_model}
    return {key: data_config[key] for key in ("spm_vocab_size", "spm_model_type",
                                               "spm_max_sentences")}


def prepared_root(data_config: Any) -> str:
    """Where prepared datasets live: `data.prepared_dir`, else beside the TFDS data."""
    if data_config.get("prepared_dir"):
        root = data_config.prepared_dir
    else:
        root = os.path.join(tfds_data_dir(data_config), "t2t_jax_prepared")
    if files.is_url(root):
        raise ValueError(
            f"prepared ids are memory-mapped from a local disk, and {root} is not local: set "
            "data.prepared_dir to a local directory (each host prepares its own copy)")
    return os.path.abspath(os.path.expanduser(root))
