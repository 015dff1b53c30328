"""Is the input pipeline fast enough? Its examples/s and tokens/s alone, next to the tokens/s
that the train step of the same config consumes.

The corpus is WMT-like and generated: Zipf-distributed words from a 20,000-word vocabulary,
sentence lengths around 25 words, and a target side that maps each word to another and swaps
neighbouring pairs, so that SentencePiece, lengths and packing behave as on real text.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from t2t_jax.data import pipeline, tasks


def synthetic_corpus(directory: str, pairs: int = 100_000, seed: int = 0) -> dict[str, str]:
    """Writes train/eval/test source and target files; returns the data.* keys naming them."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20_000)]
    translation = rng.permutation(len(words))
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    os.makedirs(directory, exist_ok=True)
    keys = {}
    for split, count in (("train", pairs), ("eval", 500), ("test", 500)):
        lengths = np.clip(rng.poisson(25, size=count), 1, 80)
        ids = rng.choice(len(words), size=int(lengths.sum()), p=zipf)
        sources, targets, offset = [], [], 0
        for length in lengths:
            sentence = ids[offset : offset + length]
            offset += length
            mapped = translation[sentence]
            mapped[: len(mapped) // 2 * 2] = mapped[: len(mapped) // 2 * 2].reshape(-1, 2)[
                :, ::-1
            ].reshape(-1)
            sources.append(" ".join(words[i] for i in sentence).capitalize() + ".")
            targets.append(" ".join(words[i] for i in mapped).capitalize() + ".")
        for side, lines in (("source", sources), ("target", targets)):
            path = os.path.join(directory, f"{split}.{side}")
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
            keys[f"{split}_{side}"] = path
    return keys


def _real_tokens(batch: dict[str, np.ndarray]) -> int:
    """Non-padding source and target tokens of a batch."""
    return sum(int((batch[k] > 0).sum()) for k in ("inputs", "targets") if k in batch)


def measure_pipeline(
    config: ml_collections.ConfigDict, builder: Any, tokenizer: Any, num_batches: int
) -> dict[str, float]:
    """Examples/s and non-padding tokens/s (source + target) of the train pipeline alone."""
    batches = pipeline.train_dataset(config, builder, tokenizer).as_numpy_iterator()
    next(batches)  # start-up (file opening, shuffle buffer) is not throughput
    examples = tokens = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(batches)
        tokens += _real_tokens(batch)
        if "targets_segmentation" in batch:
            examples += int(batch["targets_segmentation"].max(axis=1).sum())
        else:
            examples += int((batch["targets"] > 0).any(axis=1).sum())
    seconds = time.perf_counter() - start
    return {"examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds}


def measure_train_step(
    config: ml_collections.ConfigDict, workdir: str, num_steps: int
) -> dict[str, float]:
    """Non-padding tokens/s (source + target) the compiled train step consumes on this machine,
    from the median step time after one warm-up step."""
    from t2t_jax.train import build_experiment  # the model side is only needed here

    exp = build_experiment(config, workdir=workdir)
    batches = pipeline.train_dataset(config, exp.builder, exp.tokenizer).as_numpy_iterator()
    rng = jax.random.key(0)
    with exp.stepper.activate():
        state = exp.stepper.init_state(rng)
        times, tokens = [], []
        for _ in range(num_steps + 1):
            batch = next(batches)
            device_batch = exp.stepper.put_batch(batch)
            start = time.perf_counter()
            state, metrics = exp.stepper.train(state, device_batch, rng)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            tokens.append(_real_tokens(batch))
    step = float(np.median(times[1:]))
    return {"step_time_s": step, "tokens_per_s": float(np.mean(tokens[1:])) / step}


def run(
    config: ml_collections.ConfigDict, workdir: str, num_batches: int, num_steps: int
) -> list[tuple[str, dict[str, float]]]:
    """(what, figures) rows: the pipeline padded, packed and token-budgeted, then the step."""
    builder = tasks.builder_from_config(config.data)
    tokenizer = tasks.tokenizer_from_config(config.data, workdir, builder)
    rows = []
    for name, packing, budget in (
        ("padded", False, 0),
        ("packed", True, 0),
        ("token budget", False, config.data.batch_size * config.data.max_target_length),
    ):
        variant = ml_collections.ConfigDict(config.to_dict())
        variant.data.packing, variant.data.token_budget = packing, budget
        rows.append((f"pipeline, {name}", measure_pipeline(variant, builder, tokenizer,
                                                            num_batches)))
    rows.append(("train step (consumes)", measure_train_step(config, workdir, num_steps)))
    return rows
