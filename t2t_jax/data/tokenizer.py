"""Tokenizers: text <-> ids, in Python for decoding and in TensorFlow for the input pipeline.

`SymbolTokenizer` maps space-separated symbols (the built-in tasks) one to one onto ids;
`SentencePieceTokenizer` splits real text into subwords (one vocabulary for both languages).
Ids 0, 1 and 2 are reserved for padding (also the decoder's start symbol), end of sequence and
unknown symbols, the same in every tokenizer of the project.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from t2t_jax.lazy_tf import tf

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

    def to_json(self) -> dict: ...


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

    def to_json(self) -> dict:
        return {"type": "symbols", "symbols": self.symbols[len(RESERVED) :]}

    @classmethod
    def load(cls, directory: str) -> SymbolTokenizer:
        path = os.path.join(directory, cls.FILENAME)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; train in this workdir first")
        with tf.io.gfile.GFile(path) as f:
            return cls([line.rstrip("\n") for line in f if line.strip()])


class SentencePieceTokenizer:
    """A SentencePiece model (unigram by default) with the project's reserved ids 0, 1, 2."""

    FILENAME = "spm.model"

    def __init__(self, model_proto: bytes, sampling_alpha: float = 0.0, sampling_nbest: int = 64):
        import sentencepiece

        self.model_proto = model_proto
        self.sampling_alpha = sampling_alpha
        self.sampling_nbest = sampling_nbest
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        reserved = (self._processor.pad_id(), self._processor.eos_id(), self._processor.unk_id())
        if reserved != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(
                f"SentencePiece model has pad/eos/unk ids {reserved}, t2t_jax needs "
                f"{(PAD_ID, EOS_ID, UNK_ID)}; train it with pad_id=0 eos_id=1 unk_id=2 bos_id=-1"
            )

    @classmethod
    def train(
        cls,
        sentences: Iterator[str],
        vocab_size: int,
        max_sentences: int = 10_000_000,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        byte_fallback: bool = True,
    ) -> SentencePieceTokenizer:
        """Trains on `sentences` (at most `max_sentences` of them, the character budget).

        With `byte_fallback` characters outside the vocabulary become byte pieces, so any text
        round-trips exactly (it takes 256 of the vocabulary's ids).
        """
        import sentencepiece

        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=sentences,
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                pad_id=PAD_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                bos_id=-1,
                byte_fallback=byte_fallback,
                hard_vocab_limit=False,
                minloglevel=2,
            )
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1]
            raise ValueError(
                f"SentencePiece could not train a {vocab_size}-piece model ({reason}); "
                "change data.spm_vocab_size"
            ) from error
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def sampled(self, alpha: float, nbest: int = 64) -> SentencePieceTokenizer:
        """This model drawing a segmentation of each text from its `nbest` best ones, with
        probabilities proportional to P(segmentation)^alpha (subword regularization, Kudo 2018,
        l-best sampling; unigram models): for training batches only, so that a small corpus is
        seen in many segmentations. The draw is a function of the text and a seed
        (`encode_sampled`), so that a resumed run draws again what it drew before."""
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"data.spm_sampling_alpha must be in (0, 1], got {alpha}")
        if nbest < 2:
            raise ValueError(f"data.spm_sampling_nbest must be >= 2, got {nbest}")
        return SentencePieceTokenizer(self.model_proto, alpha, nbest)

    def encode(self, text: str) -> list[int]:
        """The best segmentation's ids (sampled tokenizers too: they sample in
        `encode_sampled`)."""
        return self._processor.encode(text)

    def encode_sampled(self, text: str, seed: Sequence[int]) -> list[int]:
        """A segmentation drawn with numpy's generator seeded by `seed` (non-negative ints)
        from the `sampling_nbest` best, weighted by P^alpha: the same text and seed always give
        the same ids, on any machine (SentencePiece's own sampler cannot be seeded per call)."""
        nbests = self._processor.nbest_encode(
            text, return_type="proto", nbest_size=self.sampling_nbest
        ).nbests
        if len(nbests) < 2:
            return [piece.id for piece in nbests[0].pieces] if nbests else []
        logits = self.sampling_alpha * np.array([n.score for n in nbests], np.float64)
        weights = np.exp(logits - logits.max())
        choice = np.random.default_rng(list(seed)).choice(len(nbests), p=weights / weights.sum())
        return [piece.id for piece in nbests[choice].pieces]

    def decode(self, ids: Sequence[int]) -> str:
        """Stops at the first end-of-sequence id and drops padding."""
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self._processor.decode([i for i in ids if i != PAD_ID])

    def tf_encode(self, text: tf.Tensor, seed: tf.Tensor | None = None) -> tf.Tensor:
        """Scalar string tensor -> int32 ids [length] (runs SentencePiece in Python); a sampled
        tokenizer draws with `seed` (int64 [k], non-negative), which it needs."""
        if not self.sampling_alpha:
            def encode(value) -> np.ndarray:
                return np.asarray(self.encode(np.asarray(value).item().decode("utf-8")), np.int32)

            ids = tf.numpy_function(encode, [text], tf.int32, stateful=False)
        else:
            if seed is None:
                raise ValueError("a sampling SentencePiece tokenizer needs a seed per example")

            def encode(value, seed_value) -> np.ndarray:
                ids = self.encode_sampled(np.asarray(value).item().decode("utf-8"),
                                           np.asarray(seed_value).tolist())
                return np.asarray(ids, np.int32)

            ids = tf.numpy_function(encode, [text, seed], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def save(self, directory: str) -> None:
        tf.io.gfile.makedirs(directory)
        with tf.io.gfile.GFile(os.path.join(directory, self.FILENAME), "wb") as f:
            f.write(self.model_proto)

    def to_json(self) -> dict:
        return {"type": "sentencepiece", "model": base64.b64encode(self.model_proto).decode()}

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        """From a model file, or from the spm.model in a directory."""
        if tf.io.gfile.isdir(path):
            path = os.path.join(path, cls.FILENAME)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"no SentencePiece model at {path}")
        with tf.io.gfile.GFile(path, "rb") as f:
            return cls(f.read())


def has_tokenizer(workdir: str) -> bool:
    """Whether a training run saved its tokenizer in `workdir`."""
    names = (SentencePieceTokenizer.FILENAME, SymbolTokenizer.FILENAME)
    return any(tf.io.gfile.exists(os.path.join(workdir, name)) for name in names)


def load_tokenizer(workdir: str) -> Tokenizer:
    """The tokenizer a training run saved in `workdir` (spm.model or vocab.txt)."""
    if tf.io.gfile.exists(os.path.join(workdir, SentencePieceTokenizer.FILENAME)):
        return SentencePieceTokenizer.load(workdir)
    if tf.io.gfile.exists(os.path.join(workdir, SymbolTokenizer.FILENAME)):
        return SymbolTokenizer.load(workdir)
    raise FileNotFoundError(
        f"no tokenizer ({SentencePieceTokenizer.FILENAME} or {SymbolTokenizer.FILENAME}) in "
        f"{workdir}; is it the workdir of a training run?"
    )


def tokenizer_from_json(value: dict) -> Tokenizer:
    """The inverse of `to_json`: how a checkpoint carries its tokenizer."""
    if value.get("type") == "symbols":
        return SymbolTokenizer(value["symbols"])
    if value.get("type") == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(value["model"]))
    raise ValueError(f"unknown tokenizer type {value.get('type')!r} in checkpoint")
