"""Teacher-forced scoring: each (source, target) pair's log-probability under a model.

For rescoring n-best lists, filtering a corpus, or perplexity. The per-pair sums are the eval
step's loss sums with label smoothing 0 (the same `cross_entropy_sums`, per row), so a score
here and an eval loss there are one number.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import linen as nn

from t2t_jax import sharding
from t2t_jax.data.tokenizer import EOS_ID
from t2t_jax.decode import (
    Decoder,
    encode_lines,
    encode_numbered,
    length_sorted_batches,
)
from t2t_jax.loss import cross_entropy_sums
from t2t_jax.train_step import model_kwargs

Array = jax.Array


class PairScore(NamedTuple):
    """log_prob: the target's total log-probability given the source (EOS included);
    tokens: how many target tokens (EOS included) it sums over."""

    log_prob: float
    tokens: int

    @property
    def per_token(self) -> float:
        return self.log_prob / max(self.tokens, 1)


@partial(jax.jit, static_argnames=("model",))
def score_batch(model: nn.Module, params: Any, batch: dict[str, Array]) -> tuple[Array, Array]:
    """Per row of a batch (the training batch's features): the summed log-probability of its
    weighted target tokens, and their count."""
    logits = model.apply({"params": params}, **model_kwargs(batch))

    def row_sums(row_logits, row):
        one_row = jax.tree.map(lambda x: x[None], row)
        return cross_entropy_sums(row_logits[None], one_row, label_smoothing=0.0, z_loss=0.0)

    sums = jax.vmap(row_sums)(logits, batch)
    return -sums["loss"], sums["weight"]


def score_pairs(
    decoder: Decoder, sources: Sequence[str], targets: Sequence[str], batch_size: int = 64
) -> tuple[list[PairScore], dict[str, float]]:
    """Each pair's score, in input order, and throughput (pairs/s, target tokens/s). Sources
    over the model's length are cut as `translate` cuts them; targets are scored whole."""
    if len(decoder.models) != 1:
        raise ValueError("score takes one model: pass a single --workdir")
    if len(sources) != len(targets):
        raise ValueError(f"--source has {len(sources)} lines and --target {len(targets)}; "
                         "score needs one target line per source line")
    encoded_sources, _ = encode_lines(decoder, sources)
    encoded_targets = [ids + [EOS_ID] for ids in encode_numbered(decoder.tokenizer, targets,
                                                                   "target")]
    lengths = [len(s) + len(t) for s, t in zip(encoded_sources, encoded_targets, strict=True)]
    scores: list[PairScore] = [PairScore(0.0, 0)] * len(sources)
    start = time.perf_counter()
    with sharding.activate(decoder.mesh):
        for rows in length_sorted_batches(lengths, batch_size):
            batch = decoder.model_type.scoring_batch(encoded_sources, encoded_targets, rows,
                                                     batch_size, decoder.max_source_length)
            batch = {k: decoder.place_batch(v) for k, v in batch.items()}
            log_prob, tokens = (np.asarray(x) for x in score_batch(
                decoder.model, decoder.params[0], batch))
            for row, i in enumerate(rows):
                scores[i] = PairScore(float(log_prob[row]), int(tokens[row]))
    seconds = max(time.perf_counter() - start, 1e-9)
    stats = {"pairs_per_s": len(sources) / seconds,
             "tokens_per_s": sum(s.tokens for s in scores) / seconds, "seconds": seconds}
    return scores, stats
