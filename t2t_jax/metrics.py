"""Metric writers: TensorBoard and logging through clu, plus WORKDIR/metrics.jsonl.

`metrics.jsonl` holds one JSON object per logged step: `{"step": 100, "loss": ..., ...}`;
evaluation rows carry `eval_loss`, `eval_accuracy` (and `test_*` for the longer test split);
BLEU rows `bleu`, `dev_bleu`, and at the end `test_bleu`, `test_chrf`, `best_test_bleu`; text
rows hold the sacrebleu signatures (`bleu_signature`, ...) as strings.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from t2t_jax import files


class JsonlWriter:
    """Appends scalars to a JSON-lines file; other summary kinds are ignored (a clu
    `MetricWriter` by its methods, so that it needs no TensorFlow). On object stores (gs://),
    which cannot append, the file is rewritten on each flush."""

    def __init__(self, path: str):
        self._path = path
        self._remote = files.is_url(path)
        if self._remote:
            previous = ""
            if files.exists(path):
                with files.open_file(path) as f:
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
            with files.open_file(self._path + ".tmp", "w") as f:
                f.write(self._file.getvalue())
            files.rename(self._path + ".tmp", self._path, overwrite=True)
        else:
            self._file.flush()

    def close(self):
        self.flush()
        self._file.close()


class _LogWriter(JsonlWriter):
    """Scalars and texts to the log, where clu (which needs TensorFlow) is not installed."""

    def __init__(self):
        pass

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        shown = ", ".join(f"{k} = {float(np.asarray(v)):.6g}" for k, v in scalars.items())
        logging.info("[%d] %s", step, shown)

    def write_texts(self, step, texts):
        logging.info("[%d] %s", step, ", ".join(f"{k} = {v}" for k, v in texts.items()))

    def flush(self):
        pass

    def close(self):
        pass


class _Writers(_LogWriter):
    """Each call to each of `writers`: clu's MultiWriter, without clu."""

    def __init__(self, writers: list):
        self._writers = writers

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for writer in self._writers:
            writer.write_scalars(step, scalars)

    def write_texts(self, step, texts):
        for writer in self._writers:
            writer.write_texts(step, texts)

    def flush(self):
        for writer in self._writers:
            writer.flush()

    def close(self):
        for writer in self._writers:
            writer.close()


def make_writer(workdir: str, is_main_process: bool) -> Any:
    """TensorBoard + log + metrics.jsonl on process 0; logging only elsewhere. Without
    TensorFlow (and so clu), no TensorBoard events: metrics.jsonl and the log."""
    try:
        from clu import metric_writers
    except ImportError:
        if is_main_process:
            logging.warning("TensorBoard events need TensorFlow: metrics go to metrics.jsonl "
                            "and the log only")
        if not is_main_process:
            return _LogWriter()
        files.makedirs(workdir)
        return _Writers([_LogWriter(), JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])
    if not is_main_process:
        return metric_writers.create_default_writer(just_logging=True)
    files.makedirs(workdir)
    return metric_writers.MultiWriter(
        [
            metric_writers.create_default_writer(workdir, asynchronous=False),
            JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
        ]
    )


def summarize_train(sums: Mapping[str, Any], seconds: float,
                    input_wait: float = 0.0) -> dict[str, float]:
    """Interval sums of the train step's metrics -> the logged scalars (`tokens_per_s` counts
    the target tokens that enter the loss; `input_wait_s` is the mean time a step waited for
    its batch on the host, beside `step_time_s`, the mean time a step took)."""
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
        "step_time_s": seconds / steps,
        "input_wait_s": input_wait / steps,
        "nonfinite_steps": float(sums["nonfinite"]),
    }


def summarize_eval(sums: Mapping[str, Any], prefix: str) -> dict[str, float]:
    weight = max(float(sums["weight"]), 1.0)
    return {
        f"{prefix}_loss": float(sums["loss"]) / weight,
        f"{prefix}_accuracy": float(sums["correct"]) / weight,
    }


class ProgressLines:
    """A line of text every `train.log_every` steps where no progress bar is seen: when stdout
    or stderr is not a terminal (`make train | tee log`, a batch job's log file), which tqdm
    leaves without a bar. On stdout, so that a piped or redirected run's log has them."""

    def __init__(self, num_steps: int, enabled: bool):
        self.num_steps = num_steps
        self.enabled = enabled

    @classmethod
    def where_unseen(cls, num_steps: int, is_main: bool) -> ProgressLines:
        import sys

        terminal = sys.stdout.isatty() and sys.stderr.isatty()
        return cls(num_steps, is_main and not terminal)

    def line(self, step: int, row: Mapping[str, float]) -> str:
        """`step 200/1500: loss 1.2345, accuracy 0.6789, 12,345 tokens/s, input wait 1.2%,
        ETA 3m 12s` (the ETA at the last interval's step time, evaluations aside)."""
        step_time = row["step_time_s"]
        wait = row["input_wait_s"] / step_time if step_time > 0 else 0.0
        return (f"step {step}/{self.num_steps}: loss {row['loss']:.4f}, accuracy "
                f"{row['accuracy']:.4f}, {row['tokens_per_s']:,.0f} tokens/s, input wait "
                f"{wait:.1%}, ETA {_duration((self.num_steps - step) * step_time)}")

    def write(self, step: int, row: Mapping[str, float]) -> None:
        if self.enabled:
            print(self.line(step, row), flush=True)


def _duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"
