"""Which params a run reports: the best checkpoint by a dev score, early stopping on it, and the
average of checkpoints from the end of training.

Each kept set is a workdir of its own inside the run's (`best/`, `average_pool/`, `averaged/`:
checkpoints, config and tokenizer), so that `t2t-jax decode` and `evaluate` take any of them.

- best: whenever the dev score of `train.select_by` beats every earlier one (dev BLEU, greedy
  on the validation split, by default; or the validation loss), the state is saved into
  WORKDIR/best, replacing the previous best; WORKDIR/best/record.json keeps the score, so that
  a resumed run goes on comparing against it.
- early stopping: `train.early_stop_evals=K` ends training once K evaluations of that score in
  a row have not beaten the best.
- averaging: with `train.average_last=K`, the params (not the optimizer state: a third of a
  train state) go into WORKDIR/average_pool every `train.average_span * num_steps / K` steps
  over the final `average_span` of the run; at the end the pool is averaged into
  WORKDIR/averaged. So the average is over the end of the run, as the paper's checkpoints every
  10 minutes were, whatever `checkpoint_every` is. With early stopping the end is not known in
  advance: the pool then fills all along, keeping the newest K.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
from typing import Any

import ml_collections

from t2t_jax import checkpoint, files, run_config

BEST = "best"
POOL = "average_pool"
AVERAGED = "averaged"


SELECT_BY = ("dev_bleu", "eval_loss")


def check_select_by(train_config: ml_collections.ConfigDict) -> str:
    """`train.select_by`, checked: the dev metric that picks the best checkpoint."""
    select_by = train_config.get("select_by", "dev_bleu")
    if select_by not in SELECT_BY:
        raise ValueError(f"train.select_by must be one of {', '.join(SELECT_BY)}, "
                         f"got {select_by!r}")
    return select_by


@dataclasses.dataclass
class DevRecord:
    """The best dev score so far (`metric`: higher BLEU or lower loss is better), its step, and
    how many evaluations since beat it."""

    metric: str = "dev_bleu"
    best_score: float | None = None
    best_step: int = 0
    evals_since_best: int = 0

    def better(self, score: float) -> bool:
        if self.best_score is None:
            return True
        if self.metric.endswith("loss"):
            return score < self.best_score
        return score > self.best_score

    def update(self, step: int, score: float) -> bool:
        """Notes one dev evaluation; True when it is a new best."""
        if self.better(score):
            self.best_score, self.best_step, self.evals_since_best = score, step, 0
            return True
        self.evals_since_best += 1
        return False

    def patience_spent(self, early_stop_evals: int) -> bool:
        return early_stop_evals > 0 and self.evals_since_best >= early_stop_evals


def _record_path(workdir: str) -> str:
    return os.path.join(workdir, BEST, "record.json")


def load_record(workdir: str, metric: str = "dev_bleu") -> DevRecord:
    """The record a previous run of this workdir left for `metric`, or a fresh one (also when
    that run selected by another metric, whose best says nothing of this one)."""
    path = _record_path(workdir)
    if not files.exists(path):
        return DevRecord(metric)
    with files.open_file(path) as f:
        saved = json.load(f)
    if "best_bleu" in saved:  # written before select_by existed
        saved = {"metric": "dev_bleu", "best_score": saved.pop("best_bleu"), **saved}
    if saved["metric"] != metric:
        logging.warning("%s picked this workdir's best checkpoint, train.select_by is now %s: "
                        "comparing afresh", saved["metric"], metric)
        return DevRecord(metric)
    return DevRecord(**saved)


def save_record(workdir: str, record: DevRecord) -> None:
    """Writes the record whole or not at all (a new file renamed over the old)."""
    path = _record_path(workdir)
    files.makedirs(os.path.dirname(path))
    with files.open_file(path + ".tmp", "w") as f:
        json.dump(dataclasses.asdict(record), f)
    files.rename(path + ".tmp", path, overwrite=True)


def open_kept(workdir: str, name: str, keep: int, asynchronous: bool) -> Any:
    """A checkpoint manager for the kept set `name` (a workdir inside `workdir`)."""
    options = types.SimpleNamespace(keep_checkpoints=keep, async_checkpoints=asynchronous)
    return checkpoint.make_manager(os.path.join(workdir, name), options)


def save_kept(
    manager: Any, workdir: str, name: str, step: int, state: Any,
    config: ml_collections.ConfigDict, tokenizer: Any,
) -> None:
    """Saves `state` as checkpoint `step` of the kept set, with what decoding it needs."""
    checkpoint.save(manager, step, state, config, tokenizer)
    kept = os.path.join(workdir, name)
    if not files.exists(os.path.join(kept, run_config.CONFIG_FILENAME)):
        run_config.save_config_json(config, kept)
        tokenizer.save(kept)


def pool_interval(train_config: ml_collections.ConfigDict) -> int:
    """Steps between the averaging pool's checkpoints (0: no pool)."""
    last = train_config.average_last
    if last <= 0:
        return 0
    if not 0.0 < train_config.average_span <= 1.0:
        raise ValueError(
            f"train.average_span must be in (0, 1], got {train_config.average_span}"
        )
    return max(1, round(train_config.average_span * train_config.num_steps / last))


def pool_due(train_config: ml_collections.ConfigDict, every: int, step: int) -> bool:
    """Whether the pool keeps `step`: one of the last `average_last` steps `every` apart that
    end at `num_steps` (all along that grid when early stopping may end the run before)."""
    before_end = train_config.num_steps - step
    if not every or before_end < 0 or before_end % every:
        return False
    return train_config.early_stop_evals > 0 or before_end < train_config.average_last * every


def average_pool(workdir: str, last: int) -> tuple[str, list[int]] | None:
    """Averages the newest `last` pool checkpoints (fewer if the run was shorter) into
    WORKDIR/averaged; (that workdir, the averaged steps), or None if the pool is empty."""
    pool = os.path.join(workdir, POOL)
    available = len(checkpoint.checkpoint_steps(pool))
    if not available:
        return None
    output = os.path.join(workdir, AVERAGED)
    if files.exists(output):  # derived from the pool: made again from what it holds now
        files.rmtree(output)
    steps = checkpoint.average_checkpoints(pool, min(last, available), output)
    return output, steps


class KeptCheckpoints:
    """The run's kept sets beside its checkpoints: the best by a dev score and the averaging pool,
    with the dev record that decides the best and early stopping. Every process calls the
    saves (Orbax saves are collective); only process 0 writes the record."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, tokenizer: Any,
                 is_main: bool):
        self.workdir, self.config, self.tokenizer, self.is_main = (
            workdir, config, tokenizer, is_main
        )
        train = config.train
        self.select_by = check_select_by(train)
        self.record = load_record(workdir, self.select_by)
        self.pool_every = pool_interval(train)
        self._managers: dict[str, Any] = {}

    def _manager(self, name: str, keep: int) -> Any:
        if name not in self._managers:
            self._managers[name] = open_kept(
                self.workdir, name, keep, self.config.train.async_checkpoints
            )
        return self._managers[name]

    def note_dev_scores(self, step: int, scores: dict[str, float], state: Any) -> bool:
        """Records the selecting dev score if `scores` has it; a new best saves `state`
        (checkpoint layout) as the best. True when training should stop early."""
        if self.select_by not in scores:
            return False
        if self.record.update(step, scores[self.select_by]):
            save_kept(self._manager(BEST, 1), self.workdir, BEST, step, state, self.config,
                      self.tokenizer)
        if self.is_main:
            save_record(self.workdir, self.record)
        return self.stopped()

    def stopped(self) -> bool:
        """Whether the dev record says to stop (also when a stopped run is started again)."""
        return self.record.patience_spent(self.config.train.early_stop_evals)

    def pool_due(self, step: int) -> bool:
        """Whether `step` is one the averaging pool keeps."""
        return pool_due(self.config.train, self.pool_every, step)

    def save_to_pool(self, step: int, state: Any) -> None:
        """Saves the params and step of `state` (checkpoint layout) into the averaging pool."""
        manager = self._manager(POOL, self.config.train.average_last)
        pooled = {"step": state.step, "params": state.params}
        save_kept(manager, self.workdir, POOL, step, pooled, self.config, self.tokenizer)

    def close(self) -> None:
        """Waits for saves in flight and closes the managers."""
        for manager in self._managers.values():
            manager.wait_until_finished()
            manager.close()
        self._managers.clear()
