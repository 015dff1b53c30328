"""Search over a model's next-token log-probabilities: greedy, sampling and beam search.

Every search runs as one jitted `while_loop` over a step function

    step(cache, last_tokens [rows]) -> (log_probs [rows, vocab] float32, cache)

that decodes incrementally over a key/value cache (see `decode.py`, which builds it for the
encoder-decoder, the decoder-only model and ensembles of either). A search fills a token buffer
[batch, length]; positions before `start[b]` hold a prompt that is forced, not chosen (the
decoder-only model's source; the encoder-decoder's start is 0), so both kinds of model share
one loop. Results are `Hypotheses`: tokens, total log-probability and length-normalised score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from t2t_jax.data.tokenizer import EOS_ID, PAD_ID

Array = jax.Array
StepFn = Callable[[Any, Array], tuple[Array, Any]]
ChooseFn = Callable[[Array, Array], Array]

NEG_INF = -1.0e7  # "impossible", finite so that sums of it stay ordered


class Hypotheses(NamedTuple):
    """`n` hypotheses per input, best first.

    tokens: [batch, n, length] with the prompt (if any) in front, 0 after the first EOS;
    log_prob: [batch, n] total log-probability of the generated tokens, EOS included;
    score: [batch, n] log_prob / length_penalty(generated length, alpha) (beam search's
    ranking; for greedy search and sampling alpha is 0 and score equals log_prob).
    """

    tokens: Array
    log_prob: Array
    score: Array


def length_penalty(length: Array | int, alpha: float) -> Array:
    """GNMT's ((5 + length) / 6) ^ alpha, by which beam scores are divided (Wu et al., 2016)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def argmax(log_probs: Array, rng: Array) -> Array:
    """The greedy choice."""
    del rng
    return jnp.argmax(log_probs, axis=-1)


def sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> ChooseFn:
    """A token chooser drawing from softmax(logits / temperature), restricted to the `top_k`
    most likely tokens (0: all) and to the smallest set whose probability reaches `top_p`."""

    def choose(logits: Array, rng: Array) -> Array:
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if top_p < 1.0:
            ordered = jnp.sort(logits, axis=-1)[:, ::-1]
            mass = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
            # The smallest logit still needed to reach top_p; keep everything at or above it.
            cutoff_index = jnp.sum(mass < top_p, axis=-1, keepdims=True)
            cutoff = jnp.take_along_axis(ordered, cutoff_index, axis=-1)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return jax.random.categorical(rng, logits, axis=-1)

    return choose


def no_padding(log_probs: Array) -> Array:
    """Log-probs with padding made impossible: it is never emitted mid-sequence."""
    return log_probs.at[..., PAD_ID].set(NEG_INF)


def greedy_search(
    step: StepFn,
    cache: Any,
    prompt: Array,
    start: Array,
    choose: ChooseFn = argmax,
    rng: Array | None = None,
) -> Hypotheses:
    """One hypothesis per row: at each position from start[b] on, `choose`(log-probs) (argmax
    by default, or a `sampler` with `rng`), until every row has emitted EOS or the buffer is
    full. prompt: [batch, length] (forced before start[b]); start: [batch]."""
    rng = jax.random.key(0) if rng is None else rng
    batch, length = prompt.shape

    def searching(state):
        return (state["i"] < length) & ~state["done"].all()

    def body(state):
        i = state["i"]
        last = jnp.where(i == 0, 0, state["tokens"][:, jnp.maximum(i - 1, 0)])
        log_probs, cache = step(state["cache"], last)
        log_probs = no_padding(log_probs)
        choice = choose(log_probs, jax.random.fold_in(rng, i)).astype(jnp.int32)
        generating = (i >= start) & ~state["done"]
        token = jnp.where(i < start, prompt[:, i], jnp.where(generating, choice, PAD_ID))
        picked = jnp.take_along_axis(log_probs, choice[:, None], axis=-1)[:, 0]
        return {
            "i": i + 1,
            "tokens": state["tokens"].at[:, i].set(token),
            "log_prob": state["log_prob"] + jnp.where(generating, picked, 0.0),
            "done": state["done"] | (generating & (choice == EOS_ID)),
            "cache": cache,
        }

    state = {
        "i": jnp.zeros((), jnp.int32),
        "tokens": jnp.zeros((batch, length), jnp.int32),
        "log_prob": jnp.zeros((batch,), jnp.float32),
        "done": jnp.zeros((batch,), bool),
        "cache": cache,
    }
    state = jax.lax.while_loop(searching, body, state)
    log_prob = state["log_prob"][:, None]
    return Hypotheses(state["tokens"][:, None], log_prob, log_prob)


def _take(x: Array, indices: Array) -> Array:
    """x[b, indices[b, j], ...] for x [batch, beams, ...] and indices [batch, n]."""
    expanded = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, expanded, axis=1)


def _take_cache(cache: Any, indices: Array) -> Any:
    """The cache rows of the chosen beams; cache arrays are [batch * beams, ...]."""
    batch, beams = indices.shape

    def take(x):
        if x.ndim == 0:  # cache index and position: shared by all rows
            return x
        return _take(x.reshape(batch, beams, *x.shape[1:]), indices).reshape(x.shape)

    return jax.tree.map(take, cache)


def _beam_step(step: StepFn, prompt: Array, start: Array, alpha: float, state: dict) -> dict:
    """One step of beam search over `state` (see beam_search)."""
    i = state["i"]
    batch, beams, _ = state["alive"].shape
    last = jnp.where(i == 0, 0, state["alive"][:, :, jnp.maximum(i - 1, 0)])
    log_probs, cache = step(state["cache"], last.reshape(-1))
    vocab = log_probs.shape[-1]
    log_probs = no_padding(log_probs).reshape(batch, beams, vocab)
    # Inside the prompt the next token is given: probability 1, so beam 0 carries on alone.
    in_prompt = (i < start)[:, None, None]
    forced = jnp.where(jnp.arange(vocab) == prompt[:, i, None, None], 0.0, NEG_INF)
    log_probs = jnp.where(in_prompt, forced, log_probs)
    candidates = state["alive_logp"][:, :, None] + log_probs
    top_logp, top_index = jax.lax.top_k(candidates.reshape(batch, beams * vocab), 2 * beams)
    source_beam, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    sequences = _take(state["alive"], source_beam).at[:, :, i].set(token)
    ended = (token == EOS_ID) & (i >= start)[:, None]
    # The best `beams` candidates that did not end stay alive ...
    alive_logp, keep = jax.lax.top_k(jnp.where(ended, NEG_INF, top_logp), beams)
    # ... and those that ended compete with the finished ones on length-penalised score.
    generated = (i + 1 - start)[:, None]
    ended_scores = jnp.where(ended, top_logp / length_penalty(generated, alpha), NEG_INF)
    scores = jnp.concatenate([state["finished_scores"], ended_scores], axis=1)
    finished_scores, best = jax.lax.top_k(scores, beams)
    finished = jnp.concatenate([state["finished"], sequences], axis=1)
    finished_logp = jnp.concatenate([state["finished_logp"], top_logp], axis=1)
    flags = jnp.concatenate([state["finished_flags"], ended], axis=1)
    return {
        "i": i + 1,
        "alive": _take(sequences, keep),
        "alive_logp": alive_logp,
        "cache": _take_cache(cache, _take(source_beam, keep)),
        "finished": _take(finished, best),
        "finished_scores": finished_scores,
        "finished_logp": _take(finished_logp, best),
        "finished_flags": _take(flags, best),
    }


def beam_search(
    step: StepFn,
    cache: Any,
    prompt: Array,
    start: Array,
    beam_size: int,
    alpha: float,
    nbest: int = 1,
) -> Hypotheses:
    """Beam search as in the paper (beam 4, length penalty alpha 0.6), as one `while_loop`.

    The cache holds batch * beam_size rows (row b * beam_size + k is beam k of input b).
    Returns the `nbest` (<= beam_size) best hypotheses per input by length-penalised score.
    Stops early when no live beam can beat the worst of `beam_size` finished ones, even at the
    buffer's end; an input with fewer than `nbest` finished hypotheses by then is filled up
    with its best live ones, ranked after the finished.
    """
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest={nbest} must be between 1 and beam_size={beam_size}; "
                         f"raise --beam_size to at least {nbest}")
    batch, length = prompt.shape
    start_logp = jnp.array([0.0] + [NEG_INF] * (beam_size - 1))
    state = {
        "i": jnp.zeros((), jnp.int32),
        "alive": jnp.zeros((batch, beam_size, length), jnp.int32),
        "alive_logp": jnp.tile(start_logp, (batch, 1)),
        "cache": cache,
        "finished": jnp.zeros((batch, beam_size, length), jnp.int32),
        "finished_scores": jnp.full((batch, beam_size), NEG_INF),
        "finished_logp": jnp.full((batch, beam_size), NEG_INF),
        "finished_flags": jnp.zeros((batch, beam_size), bool),
    }
    most_generated = length - start

    def searching(state):
        best_alive = state["alive_logp"][:, 0] / length_penalty(most_generated, alpha)
        worst_finished = jnp.min(state["finished_scores"], axis=1)
        settled = state["finished_flags"].all(axis=1) & (worst_finished >= best_alive)
        return (state["i"] < length) & ~settled.all()

    def body(state):
        return _beam_step(step, prompt, start, alpha, state)

    state = jax.lax.while_loop(searching, body, state)
    return _nbest(state, nbest, alpha, most_generated)


def _nbest(state: dict, nbest: int, alpha: float, most_generated: Array) -> Hypotheses:
    """The `nbest` best hypotheses of each input when the search ends: finished ones first
    (sorted by score), then live ones (sorted by log-prob, all of one length, hence by score
    too)."""
    batch, beam_size = state["alive_logp"].shape
    n_finished = state["finished_flags"].sum(axis=1, keepdims=True)
    rank = jnp.arange(nbest)[None, :]
    from_finished = rank < n_finished
    finished_rank = jnp.broadcast_to(rank, (batch, nbest))
    alive_rank = jnp.clip(rank - n_finished, 0, beam_size - 1)
    alive_scores = state["alive_logp"] / length_penalty(most_generated, alpha)[:, None]
    tokens = jnp.where(
        from_finished[..., None],
        _take(state["finished"], finished_rank),
        _take(state["alive"], alive_rank),
    )
    log_prob = jnp.where(
        from_finished,
        _take(state["finished_logp"], finished_rank),
        _take(state["alive_logp"], alive_rank),
    )
    score = jnp.where(
        from_finished,
        _take(state["finished_scores"], finished_rank),
        _take(alive_scores, alive_rank),
    )
    return Hypotheses(tokens, log_prob, score)
