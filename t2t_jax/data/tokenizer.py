"""Tokenizers: text <-> ids, in Python for decoding and in TensorFlow for the input pipeline.

`SymbolTokenizer` maps space-separated symbols (the built-in tasks) one to one onto ids.
Ids 0, 1 and 2 are reserved for padding (also the decoder's start symbol), end of sequence and
unknown symbols, the same in every tokenizer of the project.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import tensorflow as tf

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
RESERVED = ("<pad>", "<eos>", "<unk>")


class Tokenizer(Protocol):
    """What the pipeline, trainer and decoder need of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def tf_encode(self, text: tf.Tensor) -> tf.Tensor: ...

    def save(self, directory: str) -> None: ...


class SymbolTokenizer:
    """One id per whitespace-separated symbol; the pipeline, not this, appends EOS."""

    FILENAME = "vocab.txt"

    def __init__(self, symbols: Sequence[str]):
        self.symbols = list(RESERVED) + [s for s in symbols if s not in RESERVED]
        self._ids = {symbol: i for i, symbol in enumerate(self.symbols)}
        self._table = None

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(symbol, UNK_ID) for symbol in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        """Stops at the first end-of-sequence id and drops padding."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i != PAD_ID:
                out.append(self.symbols[i] if i < len(self.symbols) else RESERVED[UNK_ID])
        return " ".join(out)

    def tf_encode(self, text: tf.Tensor) -> tf.Tensor:
        """Scalar string tensor -> int32 ids [length]."""
        if self._table is None:
            # Built eagerly even when first called while tracing a tf.data map, so every
            # pipeline of the process can share it.
            with tf.init_scope():
                self._table = self._make_table()
        return tf.cast(self._table.lookup(tf.strings.split(text)), tf.int32)

    def _make_table(self) -> tf.lookup.StaticHashTable:
        return tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(self.symbols), tf.range(len(self.symbols), dtype=tf.int64)
            ),
            default_value=UNK_ID,
        )

    def save(self, directory: str) -> None:
        tf.io.gfile.makedirs(directory)
        with tf.io.gfile.GFile(os.path.join(directory, self.FILENAME), "w") as f:
            f.write("\n".join(self.symbols) + "\n")

    @classmethod
    def load(cls, directory: str) -> SymbolTokenizer:
        path = os.path.join(directory, cls.FILENAME)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; train in this workdir first")
        with tf.io.gfile.GFile(path) as f:
            return cls([line.rstrip("\n") for line in f if line.strip()])
