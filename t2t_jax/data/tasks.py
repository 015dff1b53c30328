"""Which dataset and tokenizer a config names: built-in tasks, your own files, or WMT via TFDS.

`data.task` is one of the built-in tasks (reverse, copy, sort, addition), `parallel_text`
(files named by data.train_source etc.), or a TFDS translation dataset such as
`wmt14_translate/de-en`. Built-in tasks use a symbol tokenizer; text uses SentencePiece, trained
on the training split once and saved in the workdir.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from t2t_jax import files
from t2t_jax.data.tokenizer import SentencePieceTokenizer, SymbolTokenizer, Tokenizer

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


def _tfds_builder(name: str, data_config: Any, prepare: bool) -> Any:
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_config.data_dir)
    if prepare:
        builder.download_and_prepare()
    elif not builder.is_prepared():
        raise FileNotFoundError(
            f"{name} is not prepared in {builder.data_dir}; run `t2t-jax prepare --config "
            "CONFIG` once to download it (training never downloads)"
        )
    return builder


def prepare_once(make_builder: Callable[[], Any]) -> Any:
    """The builder `make_builder` makes, its data generated unless present. With several
    processes, process 0 first and the others after it (with builders made then, which see its
    files), so that processes sharing a file system do not write the same files at once; hosts
    with their own disks each generate their copy."""
    from t2t_jax.distributed import process_0_first

    def made() -> Any:
        builder = make_builder()
        builder.download_and_prepare()
        return builder

    with _without_custom_config_warning():
        return process_0_first(made, "t2t_jax dataset prepared")


class _NotCustomConfigWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")


@contextlib.contextmanager
def _without_custom_config_warning() -> Iterator[None]:
    """TFDS warns "Using custom data configuration ..." for every builder config it was not
    shipped with, which is every config of our own builders (one per task and file set): drop
    that one message while they are made."""
    quiet = _NotCustomConfigWarning()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def builder_from_config(data_config: Any, split: str = "train", prepare: bool = False) -> Any:
    """The TFDS builder that holds `split` of the config's data, ready to read.

    Built-in tasks and local files are generated on first use. Downloaded datasets (WMT) must
    have been prepared by `t2t-jax prepare`, or `prepare=True` downloads them now.
    """
    from t2t_jax.data import algorithmic, parallel_text

    task = data_config.task
    if task in algorithmic.TASKS:
        return prepare_once(
            lambda: algorithmic.algorithmic_builder(
                data_config.data_dir, task=task, **dict(data_config.algorithmic)
            )
        )
    if task == "parallel_text":
        return prepare_once(lambda: parallel_text.parallel_text_builder(data_config))
    if task in TRANSLATION_TASKS:
        name = (data_config.test_task or task) if split == "test" else task
        return _tfds_builder(name, data_config, prepare)
    raise ValueError(
        f"unknown data.task {task!r}; choose a built-in task ({', '.join(algorithmic.TASKS)}), "
        f"'parallel_text', or one of {', '.join(TRANSLATION_TASKS)}"
    )


def expected_vocab_size(config: Any) -> int:
    """The model's vocabulary size before any tokenizer is trained: `model.vocab_size` if set,
    the symbol count of a built-in task, else the SentencePiece size aimed at."""
    if config.model.vocab_size:
        return config.model.vocab_size
    if is_builtin(config.data):
        return tokenizer_from_config(config.data).vocab_size
    return config.data.spm_vocab_size


def text_pairs(ds: Any, data_config: Any) -> Any:
    """Examples as {'inputs', 'targets'} text; translation datasets are keyed by language."""
    if data_config.task in TRANSLATION_TASKS:
        source, target = data_config.source_language, data_config.target_language
        return ds.map(lambda ex: {"inputs": ex[source], "targets": ex[target]})
    return ds


def text_examples(
    builder: Any, split: str, data_config: Any, count: int = -1
) -> tuple[list[str], list[str]]:
    """(sources, targets) of a split as text, in the order of the user's file where the data
    came from files (TFDS stores examples shuffled; each keeps its `line`), so that outputs
    line up with the file's sources and references; the first `count` (-1: all)."""
    pairs = [
        (int(example.get("line", index)), example["inputs"].decode(), example["targets"].decode())
        for index, example in enumerate(
            text_pairs(builder.as_dataset(split=split), data_config).as_numpy_iterator()
        )
    ]
    pairs.sort(key=lambda pair: pair[0])
    pairs = pairs if count < 0 else pairs[:count]
    return [source for _, source, _ in pairs], [target for _, _, target in pairs]


def _training_sentences(builder: Any, data_config: Any) -> Iterator[str]:
    """Source and target sentences of the train split, alternating, within the budget."""
    ds = text_pairs(builder.as_dataset(split="train"), data_config)
    for example in ds.as_numpy_iterator():
        yield example["inputs"].decode("utf-8")
        yield example["targets"].decode("utf-8")


def task_symbols(task: str, vocab_size: int) -> list[str]:
    """The symbols a built-in task's examples use, in vocabulary order."""
    symbols = [str(i) for i in range(vocab_size)]
    return symbols + ["+"] if task == "addition" else symbols


def tokenizer_from_config(
    data_config: Any,
    workdir: str | None = None,
    builder: Any = None,
) -> Tokenizer:
    """The config's tokenizer: symbols for built-in tasks; for text, `data.tokenizer_model`, the
    workdir's spm.model, the tokenizer of a prepared dataset of this data made with the same
    settings (`prepared_tokenizer`), or a SentencePiece model trained now on the training split
    of `builder` (default: the config's) by process 0, the others waiting for its file."""
    if is_builtin(data_config):
        return SymbolTokenizer(task_symbols(data_config.task, data_config.algorithmic.vocab_size))
    if data_config.tokenizer_model:
        return SentencePieceTokenizer.load(data_config.tokenizer_model)
    if workdir is None:
        raise ValueError("a text task needs a workdir to keep its tokenizer in")
    path = os.path.join(workdir, SentencePieceTokenizer.FILENAME)
    lent = None if files.exists(path) else prepared_tokenizer(data_config)
    trains = lent is None and not files.exists(path)
    if jax.process_count() > 1:  # process 0's disks decide, so that all take the same barriers
        from jax.experimental import multihost_utils

        trains = bool(multihost_utils.broadcast_one_to_all(np.array(trains)))
    if trains:
        # Every process makes the builder (TFDS generates on process 0 first, then syncs).
        builder = builder or builder_from_config(data_config)
    if lent is not None and jax.process_index() == 0:
        logging.info("using the tokenizer of the prepared ids in %s", lent[0])
        lent[1].save(workdir)
    elif not files.exists(path) and jax.process_index() == 0:
        logging.info("training a %d-piece SentencePiece model", data_config.spm_vocab_size)
        sentences = itertools.islice(
            _training_sentences(builder, data_config), data_config.spm_max_sentences
        )
        SentencePieceTokenizer.train(
            sentences, data_config.spm_vocab_size, model_type=data_config.spm_model_type
        ).save(workdir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("t2t_jax tokenizer")
    return SentencePieceTokenizer.load(path)


def prepared_tokenizer(data_config: Any) -> tuple[str, Tokenizer] | None:
    """(directory, tokenizer) of the newest complete prepared dataset of the config's data whose
    tokenizer was made with the config's settings, or None: a new workdir then needs neither
    TFDS nor a tokenizer training of its own."""
    from t2t_jax.data import prepare, prepared
    from t2t_jax.data.tokenizer import tokenizer_from_json

    name, _ = dataset_identity(data_config)
    root = os.path.join(prepare.prepared_root(data_config), name)
    settings = tokenizer_settings(data_config)
    found = []
    for entry in os.listdir(root) if os.path.isdir(root) else []:
        dataset = prepared.open_prepared(os.path.join(root, entry))
        if dataset and dataset.manifest.get("tokenizer_settings") == settings:
            found.append((os.path.getmtime(os.path.join(dataset.directory, prepared.MANIFEST)),
                          dataset.directory))
    if not found:
        return None
    directory = max(found)[1]
    return directory, tokenizer_from_json(prepared.open_prepared(directory).tokenizer_json())
