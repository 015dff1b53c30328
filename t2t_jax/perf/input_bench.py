"""Is the input pipeline fast enough? Its examples/s and tokens/s from prepared ids (padded,
packed, token-budget, with subword sampling on), with 0, 1 and 2 workers, next to plain-Python
SentencePiece on the same lines and to the tokens/s the train step of the same config consumes
(or, with `accelerator`, what one such accelerator consumes: `chips.INPUT_DEMAND`).

The generated corpus is WMT-like: Zipf-distributed words from a 20,000-word vocabulary,
sentence lengths around 25 words, and a target side that maps each word to another and swaps
neighbouring pairs, so that SentencePiece, lengths and packing behave as on real text.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from t2t_jax.data import loader, prepare, tasks
from t2t_jax.data.batching import Position
from t2t_jax.runtime import chips


def synthetic_corpus(directory: str, pairs: int = 100_000, seed: int = 0) -> dict[str, str]:
    """Writes train/eval/test source and target files; returns the data.* keys naming them.
    Streamed in blocks, so that millions of pairs take little memory."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, size=rng.integers(2, 10)))
                      for _ in range(20_000)])
    translation = rng.permutation(len(words))
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    os.makedirs(directory, exist_ok=True)
    keys = {}
    for split, count in (("train", pairs), ("eval", 500), ("test", 500)):
        paths = {side: os.path.join(directory, f"{split}.{side}") for side in ("source", "target")}
        with open(paths["source"], "w") as source, open(paths["target"], "w") as target:
            for first in range(0, count, 50_000):
                sources, targets = _sentences(rng, words, translation, zipf,
                                              min(50_000, count - first))
                source.write("\n".join(sources) + "\n")
                target.write("\n".join(targets) + "\n")
        keys |= {f"{split}_{side}": path for side, path in paths.items()}
    return keys


def _sentences(rng, words, translation, zipf, count) -> tuple[list[str], list[str]]:
    lengths = np.clip(rng.poisson(25, size=count), 1, 80)
    ids = rng.choice(len(words), size=int(lengths.sum()), p=zipf)
    sources, targets, offset = [], [], 0
    for length in lengths:
        sentence = ids[offset : offset + length]
        offset += length
        mapped = translation[sentence]
        pairs = len(mapped) // 2 * 2
        mapped[:pairs] = mapped[:pairs].reshape(-1, 2)[:, ::-1].reshape(-1)
        sources.append(" ".join(words[sentence]).capitalize() + ".")
        targets.append(" ".join(words[mapped]).capitalize() + ".")
    return sources, targets


def _real_tokens(batch: dict[str, np.ndarray]) -> int:
    """Non-padding source and target tokens of a batch."""
    return sum(int(np.count_nonzero(batch[k])) for k in ("inputs", "targets") if k in batch)


def _examples(batch: dict[str, np.ndarray]) -> int:
    if "targets_segmentation" in batch:
        return int(batch["targets_segmentation"].max(axis=1).sum())
    return int(np.count_nonzero(batch["targets"].any(axis=1)))


def _cpu_seconds(pids: list[int]) -> float | None:
    """User and system CPU seconds the processes `pids` have used (Linux), or None."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure_input(config: ml_collections.ConfigDict, dataset: Any, tokenizer: Any,
                  num_batches: int, workers: int) -> dict[str, float]:
    """Examples/s and non-padding tokens/s (source + target) of the train input alone, after
    its first batches (start-up: worker processes, the first epoch's plan), and `cpu_cores`:
    the CPU time this process and its input processes took over the wall time (2.0: two cores
    kept busy)."""
    split = dataset.split("train")
    sampler = loader.sampling_tokenizer(config, tokenizer)
    planner = loader.make_planner(config, split, sampler)
    batches = loader.TrainInput(split, planner, Position(), workers)
    try:
        for _ in range(max(2 * workers, 2)):
            next(batches)
        pids = batches.process_ids()
        cpu = _cpu_seconds(pids)
        examples = tokens = 0
        start = time.perf_counter()
        for _ in range(num_batches):
            batch = next(batches)
            tokens += _real_tokens(batch)
            examples += _examples(batch)
        seconds = time.perf_counter() - start
        used = _cpu_seconds(pids)
    finally:
        batches.close()
    figures = {"examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds}
    if cpu is not None and used is not None:
        figures["cpu_cores"] = (used - cpu) / seconds
    return figures


def measure_sentencepiece(dataset: Any, tokenizer: Any, count: int = 100_000) -> dict[str, float]:
    """Plain-Python SentencePiece on the train split's lines, one call a sentence, both sides:
    pairs/s and tokens/s (EOS counted, as in the prepared ids)."""
    split = dataset.split("train")
    indices = range(min(count, split.num_examples))
    lines = [split.texts(side, indices) for side in ("inputs", "targets")]
    start = time.perf_counter()
    tokens = sum(len(tokenizer.encode(line)) + 1 for side in lines for line in side)
    seconds = time.perf_counter() - start
    return {"examples_per_s": len(indices) / seconds, "tokens_per_s": tokens / seconds}


def measure_train_step(config: ml_collections.ConfigDict, workdir: str, num_steps: int
                       ) -> dict[str, float]:
    """Non-padding tokens/s (source + target) the compiled train step consumes on this machine,
    from the median step time after one warm-up step."""
    from t2t_jax.train import build_experiment  # the model side is only needed here

    exp = build_experiment(config, workdir=workdir)
    batches = loader.TrainInput(exp.dataset.split("train"),
                                loader.make_planner(config, exp.dataset.split("train")),
                                Position())
    rng = jax.random.key(0)
    times, tokens, examples = [], [], []
    with exp.stepper.activate():
        state = exp.stepper.init_state(rng)
        for _ in range(num_steps + 1):
            batch = next(batches)
            device_batch = exp.stepper.put_batch(batch)
            start = time.perf_counter()
            state, metrics = exp.stepper.train(state, device_batch, rng)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            tokens.append(_real_tokens(batch))
            examples.append(_examples(batch))
    batches.close()
    step = float(np.median(times[1:]))
    return {"step_time_s": step, "examples_per_s": float(np.mean(examples[1:])) / step,
            "tokens_per_s": float(np.mean(tokens[1:])) / step}


def variants(config: ml_collections.ConfigDict, sampling: bool) -> list[tuple[str, Any]]:
    """(what, config) of each pipeline variant measured."""
    out = []
    for name, packing, budget, alpha in (
        ("prepared, padded", False, 0, 0.0),
        ("prepared, packed", True, 0, 0.0),
        ("prepared, token budget", False,
         config.data.batch_size * config.data.max_target_length, 0.0),
        ("prepared, packed, sampled (n-best drawn each epoch)", True, 0,
         config.data.spm_sampling_alpha or 0.1),
    ):
        if alpha and not sampling:
            continue
        variant = ml_collections.ConfigDict(config.to_dict())
        variant.data.packing, variant.data.token_budget = packing, budget
        variant.data.spm_sampling_alpha = alpha
        out.append((name, variant))
    return out


def run(config: ml_collections.ConfigDict, workdir: str, num_batches: int, num_steps: int,
        workers: tuple[int, ...] = (0, 1, 2)) -> list[dict[str, Any]]:
    """Rows {what, workers, examples_per_s, tokens_per_s}: plain SentencePiece, each pipeline
    variant with each worker count, then the train step (`num_steps` 0: not measured)."""
    tokenizer = tasks.tokenizer_from_config(config.data, workdir)
    dataset = prepare.open_or_prepare(config.data, tokenizer)
    rows = []
    sentencepiece = hasattr(tokenizer, "sampled")
    if sentencepiece:
        rows.append({"what": "SentencePiece in Python, one call a sentence", "workers": 0}
                    | measure_sentencepiece(dataset, tokenizer))
    for what, variant in variants(config, sampling=sentencepiece):
        for count in workers:
            rows.append({"what": what, "workers": count}
                        | measure_input(variant, dataset, tokenizer, num_batches, count))
    if num_steps:
        rows.append({"what": "train step (consumes)", "workers": 0}
                    | measure_train_step(config, workdir, num_steps))
    return rows


def demand_ratios(rows: list[dict[str, Any]], accelerator: str) -> list[str]:
    """Lines saying what share of one accelerator's demand each prepared variant meets."""
    if accelerator not in chips.INPUT_DEMAND:
        raise ValueError(f"unknown --accelerator {accelerator!r}; choose one of "
                         f"{', '.join(chips.INPUT_DEMAND)}")
    demand = chips.INPUT_DEMAND[accelerator]
    lines = [f"{accelerator} consumes {demand.tokens_per_s:,.0f} tokens/s ({demand.source})"]
    for row in rows:
        if row["what"].startswith("prepared"):
            lines.append(f"  {row['what']}, {row['workers']} workers: "
                         f"{row['tokens_per_s'] / demand.tokens_per_s:.2f}x its demand")
    return lines


def write_json(rows: list[dict[str, Any]], directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "bench_input.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    return path
