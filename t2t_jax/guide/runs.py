"""What the paper guide's experiments share: a small task's config, training one variant of it,
matplotlib without a display, and writing NAME.json."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from t2t_jax.config import small_task_config


def plt_module():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def task_config(
    task: str, smoke: bool, steps: int, data_dir: str | None, **algorithmic: Any
) -> ml_collections.ConfigDict:
    """A small model (d_model 64) on a built-in task, trained for `steps` (a few in smoke
    mode) and evaluated once at the end; data in `data_dir` (None: TFDS's default)."""
    config = small_task_config(task)
    config.data.data_dir = data_dir
    config.model.d_model, config.model.d_ff, config.model.num_heads = 64, 256, 4
    config.data.algorithmic.update(algorithmic)
    longest = config.data.algorithmic.max_length + (1 if task != "addition" else 2)
    test_longest = config.data.algorithmic.test_max_length + 2
    config.data.max_source_length = config.data.max_target_length = longest
    config.data.test_max_source_length = config.data.test_max_target_length = test_longest
    config.data.algorithmic.num_train = 20_000
    config.data.batch_size = 64
    config.data.eval_batch_size = 100
    config.train.num_steps = 6 if smoke else steps
    config.train.warmup_steps = 2 if smoke else max(steps // 5, 1)
    config.train.log_every = max(config.train.num_steps // 20, 1)
    config.train.eval_every = config.train.checkpoint_every = config.train.num_steps
    config.train.num_decode_examples = 0
    config.train.async_checkpoints = False
    if smoke:
        config.data.algorithmic.update(num_train=256, num_validation=32, num_test=32)
        config.model.num_encoder_layers = config.model.num_decoder_layers = 1
        config.train.compilation_cache_dir = ""
    return config


def train_variant(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if done before) and returns its final metrics and
    its training loss curve [(step, loss), ...]."""
    from t2t_jax import checkpoint, run_config
    from t2t_jax.train import train_and_evaluate

    saved = checkpoint.saved_config(workdir)
    if saved is not None:  # a run of an earlier t2t_jax resumes with the defaults it was built in
        for key in run_config.PREDATING_MODEL_DEFAULTS:
            config.model[key] = saved.model[key]
    result = train_and_evaluate(config, workdir, jax.devices()[:1])
    curve = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                curve.append((row["step"], row["loss"]))
    keys = ("loss", "accuracy", "eval_loss", "eval_accuracy", "test_loss", "test_accuracy")
    return {k: result[k] for k in keys if k in result} | {"curve": curve}


def write_results(output: str, name: str, results: dict[str, Any]) -> dict[str, Any]:
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results
