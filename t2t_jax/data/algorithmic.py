"""Tensor2Tensor-style algorithmic tasks as a TFDS dataset, generated locally and deterministically.

Each example is a pair of text lines of space-separated symbols, `3 1 4 1 5` -> `5 1 4 1 3`, so the
same tokenizer, pipeline and decoder serve these tasks and real text alike. Splits: `train` and
`validation` with lengths in [min_length, max_length], and `test` with longer inputs in
[max_length + 1, test_max_length] to show length generalisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

SPLITS = ("train", "validation", "test")


def _digits(rng: np.random.Generator, base: int, length: int) -> list[int]:
    return rng.integers(0, base, size=length).tolist()


def _reverse(rng: np.random.Generator, base: int, length: int) -> tuple[list, list]:
    source = _digits(rng, base, length)
    return source, source[::-1]


def _copy(rng: np.random.Generator, base: int, length: int) -> tuple[list, list]:
    source = _digits(rng, base, length)
    return source, list(source)


def _sort(rng: np.random.Generator, base: int, length: int) -> tuple[list, list]:
    source = _digits(rng, base, length)
    return source, sorted(source)


def _to_base(number: int, base: int) -> list[int]:
    digits = []
    while True:
        number, digit = divmod(number, base)
        digits.append(digit)
        if number == 0:
            return digits[::-1]


def _addition(rng: np.random.Generator, base: int, length: int) -> tuple[list, list]:
    """Two numbers in base `base`, most significant digit first; `length` digits for the first,
    a random number of digits in [1, length] for the second."""
    first = [int(rng.integers(1, base))] + _digits(rng, base, length - 1)
    second_length = int(rng.integers(1, length + 1))
    second = [int(rng.integers(1, base))] + _digits(rng, base, second_length - 1)
    value = sum(d * base**i for i, d in enumerate(first[::-1]))
    value += sum(d * base**i for i, d in enumerate(second[::-1]))
    return first + ["+"] + second, _to_base(value, base)


TASKS: dict[str, Callable[[np.random.Generator, int, int], tuple[list, list]]] = {
    "reverse": _reverse,
    "copy": _copy,
    "sort": _sort,
    "addition": _addition,
}


def generate_examples(
    task: str, vocab_size: int, min_length: int, max_length: int, count: int, seed: int
) -> Iterator[tuple[str, str]]:
    """Yields `count` (source, target) text pairs; the same arguments give the same pairs."""
    if task not in TASKS:
        raise ValueError(f"unknown data.task {task!r}; choose one of {', '.join(TASKS)}")
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    rng = np.random.default_rng(seed)
    for _ in range(count):
        length = int(rng.integers(min_length, max_length + 1))
        source, target = TASKS[task](rng, vocab_size, length)
        yield " ".join(map(str, source)), " ".join(map(str, target))


def text_pair_info(
    builder: tfds.core.GeneratorBasedBuilder, with_line: bool = False
) -> tfds.core.DatasetInfo:
    """The features of every text-pair dataset here: `inputs` and `targets` strings, and with
    `with_line` the example's 0-based line in its file (TFDS stores examples shuffled)."""
    features = {"inputs": tfds.features.Text(), "targets": tfds.features.Text()}
    if with_line:
        features["line"] = tfds.features.Scalar(np.int64)
    return builder.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("inputs", "targets"),
    )


@dataclasses.dataclass
class AlgorithmicConfig(tfds.core.BuilderConfig):
    """One task at one vocabulary size, length range and split sizes."""

    task: str = "reverse"
    vocab_size: int = 10
    min_length: int = 1
    max_length: int = 20
    test_max_length: int = 40
    num_train: int = 50_000
    num_validation: int = 1_000
    num_test: int = 1_000
    seed: int = 0

    @classmethod
    def create(cls, **fields) -> AlgorithmicConfig:
        """A config whose name spells out every field, so different settings never share files."""
        cfg = cls(name="tmp", **fields)
        name = (
            f"{cfg.task}_v{cfg.vocab_size}_l{cfg.min_length}-{cfg.max_length}"
            f"_t{cfg.test_max_length}_n{cfg.num_train}-{cfg.num_validation}-{cfg.num_test}"
            f"_s{cfg.seed}"
        )
        return cls(name=name, description=f"The {cfg.task} task.", **fields)

    def split_spec(self, split: str) -> tuple[int, int, int, int]:
        """(min_length, max_length, count, seed) of a split."""
        seeds = {name: self.seed * len(SPLITS) + i for i, name in enumerate(SPLITS)}
        if split == "test":
            return self.max_length + 1, self.test_max_length, self.num_test, seeds[split]
        count = self.num_train if split == "train" else self.num_validation
        return self.min_length, self.max_length, count, seeds[split]


class SaysWhatItPrepares:
    """For builders that download nothing: TFDS announces every dataset it prepares with
    "Downloading and preparing dataset"; these say what they do instead (`PREPARES`: "generating",
    "reading your files into"), through the two hooks TFDS prints those lines from."""

    PREPARES = "generating"

    def _log_download_bytes(self) -> None:
        print(f"{self.PREPARES} dataset {self.name}/{self.builder_config.name} in "
              f"{self.data_dir}", flush=True)

    def _log_download_done(self) -> None:
        print(f"dataset {self.name}/{self.builder_config.name} ready", flush=True)


class AlgorithmicTasks(SaysWhatItPrepares, tfds.core.GeneratorBasedBuilder):
    """reverse, copy, sort and addition; nothing is downloaded."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [AlgorithmicConfig.create(task=task) for task in TASKS]

    def _info(self) -> tfds.core.DatasetInfo:
        return text_pair_info(self)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # generated, not downloaded
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        min_length, max_length, count, seed = cfg.split_spec(split)
        pairs = generate_examples(cfg.task, cfg.vocab_size, min_length, max_length, count, seed)
        for index, (source, target) in enumerate(pairs):
            yield index, {"inputs": source, "targets": target}


def algorithmic_builder(data_dir: str | None, **fields) -> AlgorithmicTasks:
    """The builder of one task's settings (`fields` of AlgorithmicConfig), not yet prepared."""
    config = AlgorithmicConfig.create(**fields)
    # TFDS refuses a custom config that shares a name with a registered one: pass the name then.
    registered = config.name in AlgorithmicTasks.builder_configs
    return AlgorithmicTasks(config=config.name if registered else config, data_dir=data_dir)
