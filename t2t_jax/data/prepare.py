"""Tokenizing a dataset once: a TFDS text dataset -> a prepared dataset (`data/prepared.py`).

`t2t-jax prepare` runs this, and `train` does on first use. The prepared dataset lives beside the
TFDS data, in DATA_DIR/t2t_jax_prepared/NAME-IDENTITY/TOKENIZER/ (or `data.prepared_dir`), where
IDENTITY hashes the config's description of the data (task, files, languages, settings of
the generated tasks) and TOKENIZER the tokenizer's bytes. Its manifest records the state (size,
modification time) of every file it was made from, the user's text files and TFDS's shards,
so that a changed file is noticed, said, and the ids made again; a new tokenizer gets a
directory of its own.

Preparing streams the train split in chunks (memory bounded by a chunk; the dev and test
splits, small, are read whole to be put in line order), tokenizes each on
`data.prepare_threads` threads (SentencePiece's batched encoder), and commits each chunk, so a
killed prepare resumes where it stopped; the dataset counts as complete only once its manifest
is written, last. Finding and checking a prepared dataset needs no TensorFlow; making one reads
TFDS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tqdm

from t2t_jax import __version__, files
from t2t_jax.data import prepared, sources, tasks
from t2t_jax.data.tokenizer import EOS_ID, Tokenizer

CHUNK_EXAMPLES = 16_384
SPLITS = ("train", "validation", "test")
SHARD_MARKERS = (".tfrecord", ".array_record", "dataset_info.json")
PREPARING = "preparing.json"  # an unfinished prepare: the source files' fingerprint


def dataset_directory(data_config: Any, tokenizer: Tokenizer) -> str:
    """The directory of the config's data tokenized by `tokenizer`."""
    name, _ = sources.dataset_identity(data_config)
    token = prepared.tokenizer_hash(tokenizer.to_json())[:16]
    return os.path.join(sources.prepared_root(data_config), name, token)


def _file_states(paths: list[str]) -> list[list]:
    """[path, size, mtime_ns] of each file, and of each TFDS shard in each directory (none
    for a path that is not there, as TFDS's mock data has none)."""
    states = []
    for path in paths:
        if not files.exists(path):
            continue
        if files.isdir(path):
            names = sorted(n for n in files.listdir(path) if any(m in n for m in SHARD_MARKERS))
            states += _file_states([os.path.join(path, n) for n in names])
        else:
            size, mtime = files.stat(path)
            states.append([path, size, mtime])
    return states


def changed_sources(manifest: dict) -> list[str]:
    """The files of a manifest whose size or modification time differ now. A file no longer
    there is not counted: a host may hold the prepared ids without the text they came from."""
    changed = []
    for path, size, mtime in manifest["sources"]:
        if files.exists(path) and files.stat(path) != (size, mtime):
            changed.append(path)
    return changed


def find(data_config: Any, tokenizer: Tokenizer) -> prepared.PreparedDataset | None:
    """The config's prepared dataset for `tokenizer` if it is complete and its files are
    unchanged, else None (logging why). Needs no TensorFlow."""
    directory = dataset_directory(data_config, tokenizer)
    dataset = prepared.open_prepared(directory)
    if dataset is None:
        others = os.listdir(os.path.dirname(directory)) if os.path.isdir(
            os.path.dirname(directory)) else []
        if os.path.exists(os.path.join(directory, PREPARING)):
            logging.warning("the prepared ids in %s are incomplete (a prepare was stopped); "
                            "preparing them again from where it stopped", directory)
        elif os.path.isdir(directory):
            logging.warning("the prepared ids in %s are of another format or incomplete; "
                            "preparing them again", directory)
        elif others:
            logging.warning("the prepared ids of this data in %s are another tokenizer's; "
                            "preparing ids for this one in %s", os.path.dirname(directory),
                            directory)
        return None
    changed = changed_sources(dataset.manifest)
    if changed:
        logging.warning("%s changed since its ids were prepared in %s; preparing them again",
                        changed[0], directory)
        return None
    return dataset


def _text_chunks(builder: Any, split: str, data_config: Any, start: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    """The split's examples from `start` on, in the order of their index (a resumed prepare
    reads on from the example where it stopped), CHUNK_EXAMPLES at a time: {"inputs",
    "targets": bytes arrays, "line": int64 (where the files give it)}. The shards are read one
    after another: TFDS's default interleaves them, and the order it gives the whole split is
    not the order of its slices."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=f"{split}[{start}:]", shuffle_files=False,
                            read_config=tfds.ReadConfig(interleave_cycle_length=1))
    ds = tasks.text_pairs(ds, data_config).batch(CHUNK_EXAMPLES).prefetch(2)
    yield from ds.as_numpy_iterator()


def _encode(tokenizer: Tokenizer, texts: np.ndarray, threads: int) -> list[list[int]]:
    ids = tokenizer.encode_batch([t.decode("utf-8") for t in texts], threads)
    for piece in ids:
        piece.append(EOS_ID)
    return ids


def _write_split(directory: str, split: str, builder: Any, data_config: Any,
                 tokenizer: Tokenizer, threads: int) -> dict:
    """Writes one split chunk by chunk, resuming after the last committed chunk. The train
    split keeps TFDS's order (training shuffles anyway); the others are put in their files'
    line order, so that hypotheses line up with the references."""
    # Small splits are written whole, in line order; only the train split resumes.
    writer = prepared.SplitWriter(directory, split, tokenizer.vocab_size,
                                  resume=split == "train")
    chunks = _text_chunks(builder, split, data_config, writer.committed())
    if split != "train":
        chunks = [_in_line_order(list(chunks))]
    info = builder.info.splits.get(split)
    # disable=None: a bar on a terminal, none in a log file.
    with tqdm.tqdm(total=info.num_examples if info else None, initial=writer.committed(),
                   unit=" pairs", desc=f"preparing {split}", disable=None) as progress:
        for chunk in chunks:
            ids = {side: _encode(tokenizer, chunk[side], threads) for side in prepared.SIDES}
            writer.append(ids, {side: list(chunk[side]) for side in prepared.SIDES})
            writer.commit()
            progress.update(len(chunk["inputs"]))
    return writer.close()


def _in_line_order(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    merged = {side: np.concatenate([c[side] for c in chunks]) if chunks else np.zeros(0, object)
              for side in prepared.SIDES}
    if chunks and "line" in chunks[0]:
        order = np.argsort(np.concatenate([c["line"] for c in chunks]), kind="stable")
        merged = {side: values[order] for side, values in merged.items()}
    return merged


def prepare(data_config: Any, tokenizer: Tokenizer,
            split_builders: dict[str, Any]) -> prepared.PreparedDataset:
    """Makes (or finishes, or remakes) the config's prepared dataset for `tokenizer` from the
    TFDS builders of each split, and returns it."""
    directory = dataset_directory(data_config, tokenizer)
    name, identity = sources.dataset_identity(data_config)
    inputs = sources.user_files(data_config)
    inputs += sorted({b.data_dir for b in split_builders.values()})
    states = _file_states(inputs)
    fingerprint = hashlib.sha256(json.dumps(states).encode()).hexdigest()[:16]
    _start_fresh_unless_resuming(directory, fingerprint)
    started = time.perf_counter()
    threads = data_config.get("prepare_threads") or os.cpu_count() or 1
    splits = {}
    for split, builder in split_builders.items():
        # (TFDS's mock data, in tests, has every split and lists none.)
        if split in builder.info.splits or not builder.info.splits:
            splits[split] = _write_split(directory, split, builder, data_config, tokenizer,
                                         threads)
            logging.info("prepared %s: %d examples", split, splits[split]["examples"])
    with open(os.path.join(directory, prepared.TOKENIZER), "w") as f:
        json.dump(tokenizer.to_json(), f)
    token = prepared.tokenizer_hash(tokenizer.to_json())
    manifest = {
        "format": prepared.FORMAT_VERSION, "name": name, "identity": identity,
        "tokenizer": token, "tokenizer_settings": sources.tokenizer_settings(data_config),
        "sources": states,
        "key": prepared.dataset_key(name, token, prepared.contents_hash(directory, splits)),
        "splits": splits, "t2t_jax": __version__, "seconds": time.perf_counter() - started,
    }
    prepared.write_json_atomically(os.path.join(directory, prepared.MANIFEST), manifest)
    for leftover in os.listdir(directory):  # what resuming needed
        if leftover.endswith(".progress.json") or leftover == PREPARING:
            os.remove(os.path.join(directory, leftover))
    logging.info("prepared ids of %s in %s (%.0f s)", name, directory, manifest["seconds"])
    return prepared.open_prepared(directory)


def _start_fresh_unless_resuming(directory: str, fingerprint: str) -> None:
    """Clears `directory` unless it holds an unfinished prepare of the same source files."""
    marker = os.path.join(directory, PREPARING)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("fingerprint") == fingerprint:
                return
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    prepared.write_json_atomically(marker, {"fingerprint": fingerprint})


def open_or_prepare(data_config: Any, tokenizer: Tokenizer,
                    builders: Callable[[str], Any] | None = None) -> prepared.PreparedDataset:
    """The config's prepared dataset, made now if it is missing, incomplete or stale, from the
    TFDS builders `builders(split)` gives (default: the config's). With several processes, all
    make the builders when any lacks the ids (TFDS generates on process 0 first), process 0
    prepares, and the others then find its files on a shared disk or make their own. Without
    TensorFlow, only a complete prepared dataset is usable."""
    import jax

    found = find(data_config, tokenizer)
    several = jax.process_count() > 1
    missing = found is None
    if several:
        from jax.experimental import multihost_utils

        missing = bool(np.any(multihost_utils.process_allgather(np.array([missing]))))
    if not missing:
        return _same_on_every_host(found)
    if not sources.tensorflow_available():
        raise FileNotFoundError(
            f"no prepared ids for this config in {dataset_directory(data_config, tokenizer)}, "
            "and making them needs TensorFlow and TFDS: run `t2t-jax prepare --config CONFIG "
            "--workdir WORKDIR` where they are installed, with the same data.data_dir")
    builders = builders or (lambda split: tasks.builder_from_config(data_config, split=split))
    split_builders = {split: builders(split) for split in SPLITS}  # in one order everywhere
    if several:
        if jax.process_index() == 0 and found is None:
            found = prepare(data_config, tokenizer, split_builders)
        multihost_utils.sync_global_devices("t2t_jax ids prepared")
        found = found or find(data_config, tokenizer)
    return _same_on_every_host(found or prepare(data_config, tokenizer, split_builders))


def _same_on_every_host(dataset: prepared.PreparedDataset) -> prepared.PreparedDataset:
    """`dataset`, once every process holds ids of the same key: each plans the global batches
    from its own copy's lengths, so copies that differ would plan different batches."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        mine = np.frombuffer(bytes.fromhex(dataset.key), np.uint8).astype(np.int32)
        keys = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(mine))
        if (keys != keys[0]).any():
            raise ValueError(
                f"the processes' prepared ids differ (this one's {dataset.directory}, key "
                f"{dataset.key}): prepare them once on a disk all hosts share "
                "(data.prepared_dir), or from the same files and TFDS version on every host")
    return dataset
