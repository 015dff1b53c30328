"""A prepared dataset: a corpus tokenized once, as flat token arrays with offsets, read by mmap.

One directory per (dataset, tokenizer):

  manifest.json                   written last: the splits, what they were made from, the key
  tokenizer.json                  the tokenizer the ids come from (`Tokenizer.to_json`)
  SPLIT.SIDE.ids                  every example's token ids, one after another, EOS included
  SPLIT.SIDE.offsets              int64 [examples + 1]: example i is ids[offsets[i]:offsets[i+1]]
  SPLIT.SIDE.text, .text_offsets  the UTF-8 text likewise (subword sampling, BLEU references)

SPLIT is train, validation or test; SIDE is `inputs` (source) or `targets`. Files are raw
little-endian arrays whose dtypes the manifest names, as fairseq's `.bin` and `.idx`. The reader
needs numpy alone (no TensorFlow, TFDS or array_record), so accelerator hosts need none of them.

Why flat arrays and not ArrayRecord: the batch planner needs every example's length, which the
offsets give without reading a record; a batch is then one vectorized gather from the page
cache, where ArrayRecord reads each record (about 100 us each, 6-9x less batched); and the GPU
and TPU hosts we target have no array_record. What it costs: the files must be on a local disk
(mmap), uncompressed (WMT14 en-de: about 0.6 GB of ids and 1.3 GB of text).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from t2t_jax.data import sources
from t2t_jax.data.tokenizer import EOS_ID, Tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SIDES = ("inputs", "targets")
OFFSET_DTYPE = np.dtype("<i8")


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id: uint16 for vocabularies up to 65,536."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def tokenizer_hash(tokenizer_json: dict) -> str:
    """A tokenizer's identity: the hash of its JSON form (the SentencePiece model's bytes, or
    the symbol list)."""
    text = json.dumps(tokenizer_json, sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest()


def dataset_key(name: str, tokenizer: str, contents: str) -> str:
    """The key checkpoints store: what the data is, which tokenizer, and the ids' contents
    (`contents_hash`), so that copies made apart from the same data, on other hosts or at other
    times, have the same key, and ids that differ never do."""
    text = f"{FORMAT_VERSION}|{name}|{tokenizer}|{contents}".encode()
    return hashlib.sha256(text).hexdigest()[:16]


def contents_hash(directory: str, splits: Iterable[str]) -> str:
    """The hash of every split's ids and offsets (about 1 s a GB)."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        for side in SIDES:
            for kind in ("ids", "offsets"):
                with open(_path(directory, split, side, kind), "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
    return digest.hexdigest()


def _path(directory: str, split: str, side: str, kind: str) -> str:
    return os.path.join(directory, f"{split}.{side}.{kind}")


class Split:
    """One split of a prepared dataset, memory-mapped: lengths, ids and text of every example."""

    def __init__(self, directory: str, name: str, info: dict):
        self.directory, self.name, self.info = directory, name, info
        self.num_examples = int(info["examples"])
        self._ids_dtype = np.dtype(info["ids_dtype"])
        self._maps: dict[tuple[str, str], np.ndarray] = {}

    def __getstate__(self) -> dict:  # to other processes by name: they map the files anew
        return {"directory": self.directory, "name": self.name, "info": self.info}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _map(self, side: str, kind: str, dtype: np.dtype) -> np.ndarray:
        if (side, kind) not in self._maps:
            path = _path(self.directory, self.name, side, kind)
            # A plain array over the map: np.memmap's indexing costs microseconds a call.
            self._maps[side, kind] = (
                np.memmap(path, dtype=dtype, mode="r").view(np.ndarray) if os.path.getsize(path)
                else np.zeros(0, dtype)  # numpy cannot map an empty file
            )
        return self._maps[side, kind]

    def ids(self, side: str) -> np.ndarray:
        """All token ids of one side, example after example: [total tokens]."""
        return self._map(side, "ids", self._ids_dtype)

    def offsets(self, side: str) -> np.ndarray:
        """int64 [examples + 1]: where each example's ids start (and the last ends)."""
        return self._map(side, "offsets", OFFSET_DTYPE)

    def lengths(self, side: str) -> np.ndarray:
        """int32 [examples]: each example's token count, EOS included."""
        if (side, "lengths") not in self._maps:
            self._maps[side, "lengths"] = np.diff(self.offsets(side)).astype(np.int32)
        return self._maps[side, "lengths"]

    def example_ids(self, side: str, index: int) -> np.ndarray:
        offsets = self.offsets(side)
        return np.asarray(self.ids(side)[offsets[index] : offsets[index + 1]], np.int32)

    def texts(self, side: str, indices: Iterable[int] | None = None) -> list[str]:
        """The text of the examples `indices` (default: all), in that order."""
        data = self._map(side, "text", np.dtype(np.uint8))
        offsets = self._map(side, "text_offsets", OFFSET_DTYPE)
        indices = range(self.num_examples) if indices is None else indices
        return [bytes(data[offsets[i] : offsets[i + 1]]).decode("utf-8") for i in indices]


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A complete prepared dataset (its manifest exists) in `directory`."""

    directory: str
    manifest: dict
    # Each split opened once: its memory maps are shared by every eval and the train input.
    _opened: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    def split(self, name: str) -> Split:
        if name not in self.manifest["splits"]:
            raise ValueError(f"the prepared dataset in {self.directory} has no {name} split "
                             f"(it has {', '.join(self.splits)})")
        if name not in self._opened:
            self._opened[name] = Split(self.directory, name, self.manifest["splits"][name])
        return self._opened[name]

    def tokenizer_json(self) -> dict:
        with open(os.path.join(self.directory, TOKENIZER)) as f:
            return json.load(f)


def open_prepared(directory: str) -> PreparedDataset | None:
    """The prepared dataset in `directory`, or None if there is none or it is incomplete (no
    manifest: a prepare that did not finish) or of another format version."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_VERSION:
        return None
    return PreparedDataset(directory, manifest)


class SplitWriter:
    """Appends examples to one split's files, chunk by chunk (bounded memory), and can pick up
    after a kill: `committed()` is what the last `commit` saved, and reopening truncates the
    files back to it."""

    def __init__(self, directory: str, split: str, vocab_size: int, resume: bool = True):
        self.directory, self.split = directory, split
        self.dtype = ids_dtype(vocab_size)
        self._progress_path = os.path.join(directory, f"{split}.progress.json")
        self._state = self._read_progress(resume)
        self._files = {}
        for side in SIDES:
            for kind in ("ids", "offsets", "text", "text_offsets"):
                path = _path(directory, split, side, kind)
                handle = open(path, "ab")  # noqa: SIM115 - closed by close()
                handle.truncate(self._state["bytes"].get(f"{side}.{kind}", 0))
                self._files[side, kind] = handle
        for side in SIDES:  # offsets start with a 0 in a fresh file
            if self._state["examples"] == 0:
                for kind in ("offsets", "text_offsets"):
                    self._files[side, kind].write(np.zeros(1, OFFSET_DTYPE).tobytes())
        self._lines: list[np.ndarray] = []

    def _read_progress(self, resume: bool) -> dict:
        if resume and os.path.exists(self._progress_path):
            with open(self._progress_path) as f:
                return json.load(f)
        return {"examples": 0, "tokens": {side: 0 for side in SIDES},
                "text_bytes": {side: 0 for side in SIDES}, "bytes": {}}

    def committed(self) -> int:
        """Examples written by the last `commit` (0 for a fresh split)."""
        return int(self._state["examples"])

    def append(self, ids: dict[str, Sequence[list[int]]],
               texts: dict[str, Sequence[bytes]]) -> None:
        """Adds examples: for each side, their token ids (EOS included) and their UTF-8 text."""
        for side in SIDES:
            lengths = np.fromiter(map(len, ids[side]), np.int64, len(ids[side]))
            flat = np.fromiter(itertools.chain.from_iterable(ids[side]), self.dtype,
                               int(lengths.sum()))
            ends = self._state["tokens"][side] + np.cumsum(lengths)
            self._files[side, "ids"].write(flat.tobytes())
            self._files[side, "offsets"].write(ends.astype(OFFSET_DTYPE).tobytes())
            if len(ends):
                self._state["tokens"][side] = int(ends[-1])
            text = texts[side]
            text_ends = self._state["text_bytes"][side] + np.cumsum(
                np.fromiter((len(t) for t in text), np.int64, len(text)))
            self._files[side, "text"].write(b"".join(text))
            self._files[side, "text_offsets"].write(text_ends.astype(OFFSET_DTYPE).tobytes())
            if len(text_ends):
                self._state["text_bytes"][side] = int(text_ends[-1])
        self._state["examples"] += len(ids[SIDES[0]])

    def commit(self) -> None:
        """Makes what was appended durable: a kill after this resumes from here."""
        for handle in self._files.values():
            handle.flush()
            os.fsync(handle.fileno())
        self._state["bytes"] = {
            f"{side}.{kind}": handle.tell() for (side, kind), handle in self._files.items()
        }
        write_json_atomically(self._progress_path, self._state)

    def close(self) -> dict:
        """Closes the files; returns the split's entry for the manifest."""
        self.commit()
        for handle in self._files.values():
            handle.close()
        return {"examples": self._state["examples"], "ids_dtype": self.dtype.str,
                "tokens": dict(self._state["tokens"])}


def write_json_atomically(path: str, value: Any) -> None:
    """Writes JSON to a temporary file and renames it over `path`: readers see the old file or
    the new one, never half of one."""
    temporary = f"{path}.tmp{os.getpid()}.{os.urandom(4).hex()}"  # unique across hosts too
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


class Candidates:
    """Every example's n-best segmentations of one split, for subword sampling, computed once
    (`ensure_candidates`): SPLIT.SIDE.nbestN.{ids, offsets, first, logp}. Example i's
    candidates are first[i]:first[i + 1]; candidate c is ids[offsets[c]:offsets[c + 1]] (EOS
    included) with log-probability logp[c]."""

    def __init__(self, split: Split, nbest: int):
        self.split, self.nbest = split, nbest
        self._maps: dict[tuple[str, str], np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"split": self.split, "nbest": self.nbest}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def path(self, side: str, kind: str) -> str:
        return _path(self.split.directory, self.split.name, side, f"nbest{self.nbest}.{kind}")

    def _map(self, side: str, kind: str, dtype: Any) -> np.ndarray:
        if (side, kind) not in self._maps:
            self._maps[side, kind] = np.memmap(self.path(side, kind), dtype=dtype,
                                               mode="r").view(np.ndarray)
        return self._maps[side, kind]

    def ids(self, side: str) -> np.ndarray:
        return self._map(side, "ids", self.split._ids_dtype)

    def offsets(self, side: str) -> np.ndarray:
        return self._map(side, "offsets", OFFSET_DTYPE)

    def first(self, side: str) -> np.ndarray:
        return self._map(side, "first", OFFSET_DTYPE)

    def logp(self, side: str) -> np.ndarray:
        return self._map(side, "logp", np.dtype("<f4"))

    @property
    def done_path(self) -> str:
        return os.path.join(self.split.directory, f"{self.split.name}.nbest{self.nbest}.json")


def _nbest_chunk(tokenizer: Any, texts: list[str], nbest: int) -> list:
    return tokenizer.nbest(texts, nbest)


def ensure_candidates(split: Split, tokenizer: Any, nbest: int, workers: int = 0,
                      chunk: int = 2048) -> Candidates:
    """The split's n-best candidates, computed now (on `workers` processes; 0: this one) if
    they are not yet: SentencePiece's n-best search costs about a millisecond a sentence, so it
    runs once, not every epoch. Written to temporary files renamed into place, then marked done:
    a killed run computes them again, never reads half of them."""
    candidates = Candidates(split, nbest)
    if os.path.exists(candidates.done_path):
        return candidates
    import concurrent.futures
    import multiprocessing

    executor = None
    if workers:
        executor = concurrent.futures.ProcessPoolExecutor(
            workers, multiprocessing.get_context("spawn"))
    try:
        for side in SIDES:
            chunks = (split.texts(side, range(i, min(i + chunk, split.num_examples)))
                      for i in range(0, split.num_examples, chunk))
            if executor is None:
                results = (_nbest_chunk(tokenizer, c, nbest) for c in chunks)
            else:
                results = _bounded_map(executor, functools.partial(_nbest_chunk, tokenizer,
                                                                   nbest=nbest),
                                       chunks, 2 * workers)
            _write_candidates(candidates, side, results, split._ids_dtype)
    finally:
        if executor is not None:
            executor.shutdown()
    write_json_atomically(candidates.done_path, {"nbest": nbest, "examples": split.num_examples})
    return candidates


def _bounded_map(executor: Any, function: Callable, items: Iterable, in_flight: int
                 ) -> Iterator:
    """`executor.map` in order, with at most `in_flight` items read ahead (a split's texts are
    not all held at once)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(executor.submit(function, item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write_candidates(candidates: Candidates, side: str, results: Iterable, dtype: np.dtype
                      ) -> None:
    kinds = ("ids", "offsets", "first", "logp")
    # Temporary files of unique names in the same directory: hosts sharing it do not collide.
    temporary, handles = {}, {}
    for kind in kinds:
        target = candidates.path(side, kind)
        descriptor, temporary[kind] = tempfile.mkstemp(
            prefix=os.path.basename(target) + ".", dir=os.path.dirname(target))
        handles[kind] = os.fdopen(descriptor, "wb")
    tokens = count = 0
    handles["offsets"].write(np.zeros(1, OFFSET_DTYPE).tobytes())
    handles["first"].write(np.zeros(1, OFFSET_DTYPE).tobytes())
    try:
        for result in results:
            for segmentations, logps in result:
                lengths = np.array([len(c) + 1 for c in segmentations], np.int64)
                pieces = itertools.chain.from_iterable(c + [EOS_ID] for c in segmentations)
                flat = np.fromiter(pieces, dtype, int(lengths.sum()))
                handles["ids"].write(flat.tobytes())
                handles["offsets"].write((tokens + np.cumsum(lengths)).astype(OFFSET_DTYPE)
                                         .tobytes())
                handles["logp"].write(np.asarray(logps, "<f4").tobytes())
                tokens += int(lengths.sum())
                count += len(segmentations)
                handles["first"].write(np.array([count], OFFSET_DTYPE).tobytes())
    finally:
        for handle in handles.values():
            handle.close()
    for kind, path in temporary.items():
        os.chmod(path, 0o644)  # as open() would have made it, not mkstemp's 0600
        os.replace(path, candidates.path(side, kind))


def prepared_tokenizer(data_config: Any) -> tuple[str, Tokenizer] | None:
    """(directory, tokenizer) of the newest complete prepared dataset of the config's data whose
    tokenizer was made with the config's settings, or None: a new workdir then needs neither
    TFDS nor a tokenizer training of its own."""
    from t2t_jax.data.tokenizer import tokenizer_from_json

    name, _ = sources.dataset_identity(data_config)
    root = os.path.join(sources.prepared_root(data_config), name)
    settings = sources.tokenizer_settings(data_config)
    found = []
    for entry in os.listdir(root) if os.path.isdir(root) else []:
        dataset = open_prepared(os.path.join(root, entry))
        if dataset and dataset.manifest.get("tokenizer_settings") == settings:
            found.append((os.path.getmtime(os.path.join(dataset.directory, MANIFEST)),
                          dataset.directory))
    if not found:
        return None
    directory = max(found)[1]
    return directory, tokenizer_from_json(open_prepared(directory).tokenizer_json())
