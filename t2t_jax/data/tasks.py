"""Which dataset and tokenizer a config names: built-in tasks, your own files, or WMT via TFDS.

`data.task` is one of the built-in tasks (reverse, copy, sort, addition), `parallel_text`
(files named by data.train_source etc.), or a TFDS translation dataset such as
`wmt14_translate/de-en`. Built-in tasks use a symbol tokenizer; text uses SentencePiece, trained
on the training split once and saved in the workdir.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from t2t_jax import files
from t2t_jax.data import prepared, sources
from t2t_jax.data.tokenizer import SentencePieceTokenizer, SymbolTokenizer, Tokenizer


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
    from t2t_jax.runtime.distributed import process_0_first

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
    if task in sources.TRANSLATION_TASKS:
        name = (data_config.test_task or task) if split == "test" else task
        return _tfds_builder(name, data_config, prepare)
    raise ValueError(
        f"unknown data.task {task!r}; choose a built-in task ({', '.join(algorithmic.TASKS)}), "
        f"'parallel_text', or one of {', '.join(sources.TRANSLATION_TASKS)}"
    )


def expected_vocab_size(config: Any) -> int:
    """The model's vocabulary size before any tokenizer is trained: `model.vocab_size` if set,
    the symbol count of a built-in task, else the SentencePiece size aimed at."""
    if config.model.vocab_size:
        return config.model.vocab_size
    if sources.is_builtin(config.data):
        return tokenizer_from_config(config.data).vocab_size
    return config.data.spm_vocab_size


def text_pairs(ds: Any, data_config: Any) -> Any:
    """Examples as {'inputs', 'targets'} text; translation datasets are keyed by language."""
    if data_config.task in sources.TRANSLATION_TASKS:
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
    if sources.is_builtin(data_config):
        return SymbolTokenizer(task_symbols(data_config.task, data_config.algorithmic.vocab_size))
    if data_config.tokenizer_model:
        return SentencePieceTokenizer.load(data_config.tokenizer_model)
    if workdir is None:
        raise ValueError("a text task needs a workdir to keep its tokenizer in")
    path = os.path.join(workdir, SentencePieceTokenizer.FILENAME)
    lent = None if files.exists(path) else prepared.prepared_tokenizer(data_config)
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


