"""Tokenizers: text <-> ids, one text at a time (decoding) or in batches (preparing ids).

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

from t2t_jax import files

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
RESERVED = ("<pad>", "<eos>", "<unk>")


class Tokenizer(Protocol):
    """What the pipeline, trainer and decoder need of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str) -> None: ...

    def to_json(self) -> dict: ...


class UnknownSymbol(ValueError):
    """An input symbol that a SymbolTokenizer's vocabulary does not hold."""


class SymbolTokenizer:
    """One id per whitespace-separated symbol; the pipeline, not this, appends EOS."""

    FILENAME = "vocab.txt"

    def __init__(self, symbols: Sequence[str]):
        self.symbols = list(RESERVED) + [s for s in symbols if s not in RESERVED]
        self._ids = {symbol: i for i, symbol in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        """The ids of the symbols; a symbol outside the vocabulary is an UnknownSymbol error,
        never a silent <unk>: the tasks' symbols are all known, so one that is not is a
        mistake in the input."""
        try:
            return [self._ids[symbol] for symbol in text.split()]
        except KeyError as error:
            shown = " ".join(self.symbols[len(RESERVED):][:40])
            raise UnknownSymbol(f"symbol {error.args[0]!r} is not in the model's vocabulary "
                                f"({shown})") from None

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        return [self.encode(text) for text in texts]

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

    def save(self, directory: str) -> None:
        files.makedirs(directory)
        with files.open_file(os.path.join(directory, self.FILENAME), "w") as f:
            f.write("\n".join(self.symbols) + "\n")

    def to_json(self) -> dict:
        return {"type": "symbols", "symbols": self.symbols[len(RESERVED) :]}

    def pieces(self) -> list[str]:
        """Each id's token string, in id order (an exported model's vocabulary)."""
        return list(self.symbols)

    @classmethod
    def load(cls, directory: str) -> SymbolTokenizer:
        path = os.path.join(directory, cls.FILENAME)
        if not files.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; train in this workdir first")
        with files.open_file(path) as f:
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

    def __getstate__(self) -> dict:  # for worker processes: the model's bytes, not the C++ object
        return {"model_proto": self.model_proto, "sampling_alpha": self.sampling_alpha,
                "sampling_nbest": self.sampling_nbest}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

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
        seen in many segmentations. The draw is a function of the text and a uniform number
        (`sample_ids`), so that a resumed run draws again what it drew before."""
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"data.spm_sampling_alpha must be in (0, 1], got {alpha}")
        if nbest < 2:
            raise ValueError(f"data.spm_sampling_nbest must be >= 2, got {nbest}")
        return SentencePieceTokenizer(self.model_proto, alpha, nbest)

    def encode(self, text: str) -> list[int]:
        """The best segmentation's ids (sampled tokenizers too: they sample in `sample_ids`)."""
        return self._processor.encode(text)

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        """The best segmentations of many texts, on `threads` of SentencePiece's own threads."""
        return self._processor.encode(list(texts), num_threads=threads)

    def _piece_scores(self) -> np.ndarray:
        if not hasattr(self, "_scores"):
            self._scores = np.array([self._processor.get_score(i)
                                     for i in range(self.vocab_size)], np.float64)
        return self._scores

    def nbest(self, texts: Sequence[str], nbest: int) -> list[tuple[list[list[int]], list[float]]]:
        """Each text's `nbest` best segmentations and their log-probabilities (up to a
        constant per text, for characters outside the vocabulary, which cancels when they are
        weighed against each other): what subword sampling draws from."""
        scores, out = self._piece_scores(), []
        for text in texts:
            candidates = self._processor.nbest_encode(text, nbest_size=nbest, out_type=int)
            out.append((candidates, [float(scores[c].sum()) for c in candidates]))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Stops at the first end-of-sequence id and drops padding."""
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self._processor.decode([i for i in ids if i != PAD_ID])

    def save(self, directory: str) -> None:
        files.makedirs(directory)
        with files.open_file(os.path.join(directory, self.FILENAME), "wb") as f:
            f.write(self.model_proto)

    def to_json(self) -> dict:
        return {"type": "sentencepiece", "model": base64.b64encode(self.model_proto).decode()}

    def pieces(self) -> list[str]:
        """Each id's piece, in id order (an exported model's vocabulary)."""
        return [self._processor.id_to_piece(i) for i in range(self.vocab_size)]

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        """From a model file, or from the spm.model in a directory."""
        if files.isdir(path):
            path = os.path.join(path, cls.FILENAME)
        if not files.exists(path):
            raise FileNotFoundError(f"no SentencePiece model at {path}")
        with files.open_file(path, "rb") as f:
            return cls(f.read())


def has_tokenizer(workdir: str) -> bool:
    """Whether a training run saved its tokenizer in `workdir`."""
    names = (SentencePieceTokenizer.FILENAME, SymbolTokenizer.FILENAME)
    return any(files.exists(os.path.join(workdir, name)) for name in names)


def load_tokenizer(workdir: str) -> Tokenizer:
    """The tokenizer a training run saved in `workdir` (spm.model or vocab.txt)."""
    if files.exists(os.path.join(workdir, SentencePieceTokenizer.FILENAME)):
        return SentencePieceTokenizer.load(workdir)
    if files.exists(os.path.join(workdir, SymbolTokenizer.FILENAME)):
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
