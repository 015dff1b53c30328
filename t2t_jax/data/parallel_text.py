"""Your own parallel corpus as a TFDS dataset: two aligned text files per split, or one TSV.

Files may be gzipped (`.gz`) and may live wherever `tf.io.gfile` reaches (local, `gs://`). They
are checked before anything is written: a missing file, files whose line counts differ, or an
empty line is an error naming the file and line.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
from collections.abc import Iterator

import tensorflow as tf
import tensorflow_datasets as tfds

from t2t_jax.data.algorithmic import SaysWhatItPrepares, text_pair_info
from t2t_jax.data.sources import files_from_config


def read_lines(path: str) -> Iterator[str]:
    """Lines of a text file (gzipped if it ends in .gz) without their line ends."""
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path}: no such file; check the data.*_source/target paths")
    with tf.io.gfile.GFile(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        for line in stream:
            yield line.decode("utf-8").rstrip("\r\n")


def read_pairs(source: str, target: str | None) -> Iterator[tuple[str, str]]:
    """(source, target) lines of two aligned files, or of one TSV (`target` None)."""
    if target is None:
        for number, line in enumerate(read_lines(source), start=1):
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise ValueError(
                    f"{source}:{number}: expected 'source<TAB>target' with both sides non-empty"
                )
            yield fields[0], fields[1]
        return
    lines = itertools.zip_longest(read_lines(source), read_lines(target))
    for number, (src, tgt) in enumerate(lines, start=1):
        if src is None or tgt is None:
            longer = target if src is None else source
            raise ValueError(
                f"{source} and {target} have different line counts ({longer} goes on at line "
                f"{number}); the files must be aligned line by line"
            )
        for path, text in ((source, src), (target, tgt)):
            if not text.strip():
                raise ValueError(f"{path}:{number}: empty line; remove the pair or fill it in")
        yield src, tgt


def check_pairs(source: str, target: str | None) -> int:
    """Reads the pairs once to raise any error before TFDS writes; returns their number."""
    return sum(1 for _ in read_pairs(source, target))


def _fingerprint(files: tuple) -> str:
    """Changes when a path, size or modification time changes, so edited files regenerate."""
    digest = hashlib.sha1()
    for split, source, target in files:
        for path in (source, target):
            if path:
                stat = tf.io.gfile.stat(path)
                digest.update(f"{split}|{path}|{stat.length}|{stat.mtime_nsec}".encode())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class ParallelTextConfig(tfds.core.BuilderConfig):
    """files: (split, source path, target path or None for a TSV) for each split given."""

    files: tuple = ()


class ParallelText(SaysWhatItPrepares, tfds.core.GeneratorBasedBuilder):
    """Local parallel text; splits train, validation and test as far as files are given."""

    PREPARES = "reading your files into"

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Each example keeps its line in the file (`line`).",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return text_pair_info(self, with_line=True)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # local files
        return {
            split: self._generate_examples(source, target)
            for split, source, target in self.builder_config.files
        }

    def _generate_examples(self, source: str, target: str | None):
        for index, (src, tgt) in enumerate(read_pairs(source, target)):
            yield index, {"inputs": src, "targets": tgt, "line": index}


def parallel_text_builder(data_config) -> ParallelText:
    """The builder of the files a config names, after checking them."""
    files = files_from_config(data_config)
    for _, source, target in files:
        if not tf.io.gfile.exists(source) or (target and not tf.io.gfile.exists(target)):
            missing = source if not tf.io.gfile.exists(source) else target
            raise FileNotFoundError(f"{missing}: no such file; check the data.* paths")
    config = ParallelTextConfig(
        name=f"files_{_fingerprint(files)}", description="Local parallel text.", files=files
    )
    builder = ParallelText(config=config, data_dir=data_config.data_dir)
    if not builder.is_prepared():
        for _, source, target in files:
            check_pairs(source, target)
    return builder
