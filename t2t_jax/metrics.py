"""Metric writers: TensorBoard and logging through clu, plus WORKDIR/metrics.jsonl.

`metrics.jsonl` holds one JSON object per logged step: `{"step": 100, "loss": ..., ...}`;
evaluation rows carry `eval_loss`, `eval_accuracy` (and `test_*` for the longer test split);
BLEU rows `bleu`, `dev_bleu`, and at the end `test_bleu`, `test_chrf`, `best_test_bleu`; text
rows hold the sacrebleu signatures (`bleu_signature`, ...) as strings.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
    """Appends scalars to a JSON-lines file; other summary kinds are ignored. On object stores
    (gs://), which cannot append, the file is rewritten on each flush."""

    def __init__(self, path: str):
        self._path = path
        self._remote = "://" in path
        if self._remote:
            previous = ""
            if tf.io.gfile.exists(path):
                with tf.io.gfile.GFile(path) as f:
                    previous = f.read()
            self._file = io.StringIO(previous)
            self._file.seek(0, io.SEEK_END)
        else:
            self._file = open(path, "a")  # noqa: SIM115 - closed by close()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step)} | {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._file.write(json.dumps(row) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        """Short texts (sacrebleu signatures) go in as a row of strings."""
        row = {"step": int(step)} | {k: str(v) for k, v in texts.items()}
        self._file.write(json.dumps(row) + "\n")

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        if self._remote:  # a whole new file, then renamed over the old: never half a file
            with tf.io.gfile.GFile(self._path + ".tmp", "w") as f:
                f.write(self._file.getvalue())
            tf.io.gfile.rename(self._path + ".tmp", self._path, overwrite=True)
        else:
            self._file.flush()

    def close(self):
        self.flush()
        self._file.close()


def make_writer(workdir: str, is_main_process: bool) -> metric_writers.MetricWriter:
    """TensorBoard + log + metrics.jsonl on process 0; logging only elsewhere."""
    if not is_main_process:
        return metric_writers.create_default_writer(just_logging=True)
    tf.io.gfile.makedirs(workdir)
    return metric_writers.MultiWriter(
        [
            metric_writers.create_default_writer(workdir, asynchronous=False),
            JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
        ]
    )


def summarize_train(sums: Mapping[str, Any], seconds: float) -> dict[str, float]:
    """Interval sums of the train step's metrics -> the logged scalars (`tokens_per_s` counts
    the target tokens that enter the loss)."""
    steps = max(float(sums["steps"]), 1.0)
    weight = max(float(sums["weight"]), 1.0)
    return {
        "loss": float(sums["loss"]) / weight,
        "accuracy": float(sums["correct"]) / weight,
        "z_loss": float(sums["z_loss"]) / weight,
        "learning_rate": float(sums["learning_rate"]) / steps,
        "grad_norm": float(sums["grad_norm"]) / steps,
        "tokens_per_s": float(sums["weight"]) / max(seconds, 1e-9),
        "steps_per_s": steps / max(seconds, 1e-9),
        "nonfinite_steps": float(sums["nonfinite"]),
    }


def summarize_eval(sums: Mapping[str, Any], prefix: str) -> dict[str, float]:
    weight = max(float(sums["weight"]), 1.0)
    return {
        f"{prefix}_loss": float(sums["loss"]) / weight,
        f"{prefix}_accuracy": float(sums["correct"]) / weight,
    }
