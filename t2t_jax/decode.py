"""Greedy decoding, batched and jitted as one `lax.fori_loop`.

The encoder-decoder decodes incrementally with a key/value cache (cross-attention keys and
values computed once per sentence); the decoder-only model still recomputes its prefix at each
step. `load_translator` and `translate` decode any checkpoint on whatever devices this machine
has.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from t2t_jax import checkpoint, sharding
from t2t_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from t2t_jax.model import ModelConfig, build_model, unrolled_for_decoding

Array = jax.Array


def _argmax(logits: Array, rng: Array) -> Array:
    del rng
    return jnp.argmax(logits, axis=-1)


def sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Callable:
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


def greedy_search(
    logits_fn: Callable[[Array], Array],
    tokens: Array,
    start: Array,
    choose: Callable[[Array, Array], Array] = _argmax,
    rng: Array | None = None,
) -> Array:
    """Fills tokens[b, i] for every i >= start[b] with choose(logits_fn(tokens)[b, i]): the
    argmax by default, or a draw from a `sampler` (which needs `rng`).

    tokens: [batch, length] with the given prefix in place (right of it anything non-zero);
    start: [batch] prefix lengths. logits_fn maps tokens to next-token logits [b, length, vocab]
    where position i sees tokens[:, :i] only (causal, shifted right).
    """
    rng = jax.random.key(0) if rng is None else rng
    batch, length = tokens.shape
    # Positions not yet decoded hold a non-zero id: the decoder's padding mask must not hide
    # position i from itself; the causal mask keeps later positions from mattering.
    tokens = jnp.where(jnp.arange(length)[None] >= start[:, None], EOS_ID, tokens)

    def step(i, tokens):
        logits = logits_fn(tokens)[:, i]
        logits = logits.at[:, PAD_ID].set(-jnp.inf)  # never emit padding mid-sequence
        choice = choose(logits, jax.random.fold_in(rng, i)).astype(tokens.dtype)
        return tokens.at[:, i].set(jnp.where(i >= start, choice, tokens[:, i]))

    return jax.lax.fori_loop(jnp.min(start), length, step, tokens)


def init_cache(
    model: nn.Module, params: Any, encoded: Array, inputs: Array, max_length: int
) -> Any:
    """The decoder's key/value cache for up to `max_length` output tokens, with the encoder
    output's cross-attention keys and values computed once, here."""
    dummy = jnp.ones((inputs.shape[0], max_length), jnp.int32)
    _, variables = model.apply(
        {"params": params}, encoded, inputs, dummy, cache_mode="init", mutable=["cache"],
        method=model.decode,
    )
    return variables["cache"]


def decode_step(
    model: nn.Module, params: Any, cache: Any, encoded: Array, inputs: Array, last: Array
) -> tuple[Array, Any]:
    """One incremental step: last tokens [batch] (0 at the start) -> next-token logits
    [batch, vocab] and the updated cache."""
    logits, variables = model.apply(
        {"params": params, "cache": cache}, encoded, inputs, last[:, None], cache_mode="step",
        mutable=["cache"], method=model.decode,
    )
    return logits[:, 0], variables["cache"]


@partial(jax.jit, static_argnames=("model", "max_length"))
def greedy_translate(model: nn.Module, params: Any, inputs: Array, max_length: int) -> Array:
    """Encoder-decoder, with the key/value cache: source ids [batch, src_len] -> output ids
    [batch, max_length]."""
    encoded = model.apply({"params": params}, inputs, method=model.encode)
    cache = init_cache(model, params, encoded, inputs, max_length)
    tokens = jnp.zeros((inputs.shape[0], max_length), jnp.int32)

    def step(i, carry):
        tokens, cache, last = carry
        logits, cache = decode_step(model, params, cache, encoded, inputs, last)
        choice = jnp.argmax(logits.at[:, PAD_ID].set(-jnp.inf), axis=-1).astype(jnp.int32)
        return tokens.at[:, i].set(choice), cache, choice

    carry = (tokens, cache, jnp.zeros((inputs.shape[0],), jnp.int32))
    return jax.lax.fori_loop(0, max_length, step, carry)[0]


NEG_INF = -1.0e7


def length_penalty(length: Array | int, alpha: float) -> Array:
    """GNMT's ((5 + length) / 6) ^ alpha, by which beam scores are divided (Wu et al., 2016)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


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


def _beam_step(model, params, encoded, inputs, alpha, state):
    """One step of beam search over `state` (see beam_translate)."""
    i = state["i"]
    batch, beams, _ = state["alive"].shape
    last = jnp.where(i == 0, 0, state["alive"][:, :, jnp.maximum(i - 1, 0)])
    logits, cache = decode_step(model, params, state["cache"], encoded, inputs, last.reshape(-1))
    log_probs = jax.nn.log_softmax(logits).at[:, PAD_ID].set(NEG_INF)
    vocab = log_probs.shape[-1]
    candidates = (state["alive_logp"][:, :, None] + log_probs.reshape(batch, beams, vocab))
    top_logp, top_index = jax.lax.top_k(candidates.reshape(batch, beams * vocab), 2 * beams)
    source_beam, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    sequences = _take(state["alive"], source_beam).at[:, :, i].set(token)
    ended = token == EOS_ID
    # The best `beams` candidates that did not end stay alive ...
    alive_logp, keep = jax.lax.top_k(jnp.where(ended, NEG_INF, top_logp), beams)
    # ... and those that ended compete with the finished ones on length-penalised score.
    ended_scores = jnp.where(ended, top_logp / length_penalty(i + 1, alpha), NEG_INF)
    scores = jnp.concatenate([state["finished_scores"], ended_scores], axis=1)
    finished_scores, best = jax.lax.top_k(scores, beams)
    finished = jnp.concatenate([state["finished"], sequences], axis=1)
    flags = jnp.concatenate([state["finished_flags"], ended], axis=1)
    return {
        "i": i + 1,
        "alive": _take(sequences, keep),
        "alive_logp": alive_logp,
        "cache": _take_cache(cache, _take(source_beam, keep)),
        "finished": _take(finished, best),
        "finished_scores": finished_scores,
        "finished_flags": _take(flags, best),
    }


@partial(jax.jit, static_argnames=("model", "beam_size", "max_length", "alpha"))
def beam_translate(
    model: nn.Module,
    params: Any,
    inputs: Array,
    beam_size: int = 4,
    max_length: int = 64,
    alpha: float = 0.6,
) -> Array:
    """Beam search as in the paper (beam 4, length penalty alpha 0.6), as one `while_loop`.

    inputs: [batch, src_len] -> the best output ids [batch, max_length]. Stops early when no
    live beam can beat the worst of `beam_size` finished ones, even at `max_length`; a sentence
    with no finished beam by then returns its best live one.
    """
    batch = inputs.shape[0]
    encoded = model.apply({"params": params}, inputs, method=model.encode)
    inputs = jnp.repeat(inputs, beam_size, axis=0)
    encoded = jnp.repeat(encoded, beam_size, axis=0)
    start_logp = jnp.array([0.0] + [NEG_INF] * (beam_size - 1))
    state = {
        "i": jnp.zeros((), jnp.int32),
        "alive": jnp.zeros((batch, beam_size, max_length), jnp.int32),
        "alive_logp": jnp.tile(start_logp, (batch, 1)),
        "cache": init_cache(model, params, encoded, inputs, max_length),
        "finished": jnp.zeros((batch, beam_size, max_length), jnp.int32),
        "finished_scores": jnp.full((batch, beam_size), NEG_INF),
        "finished_flags": jnp.zeros((batch, beam_size), bool),
    }

    def searching(state):
        best_alive = state["alive_logp"][:, 0] / length_penalty(max_length, alpha)
        worst_finished = jnp.min(state["finished_scores"], axis=1)
        settled = state["finished_flags"].all(axis=1) & (worst_finished >= best_alive)
        return (state["i"] < max_length) & ~settled.all()

    state = jax.lax.while_loop(
        searching, partial(_beam_step, model, params, encoded, inputs, alpha), state
    )
    any_finished = state["finished_flags"].any(axis=1)[:, None]
    return jnp.where(any_finished, state["finished"][:, 0], state["alive"][:, 0])


@partial(jax.jit, static_argnames=("model",))
def greedy_continue(model: nn.Module, params: Any, tokens: Array, start: Array) -> Array:
    """Decoder-only: prompts tokens[b, :start[b]] continued to the full length of `tokens`."""
    return greedy_search(lambda t: model.apply({"params": params}, t), tokens, start)


@partial(jax.jit, static_argnames=("model", "temperature", "top_k", "top_p"))
def sample_continue(
    model: nn.Module,
    params: Any,
    tokens: Array,
    start: Array,
    rng: Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Array:
    """Decoder-only: prompts continued by sampling (temperature, top-k, top-p)."""
    return greedy_search(
        lambda t: model.apply({"params": params}, t),
        tokens,
        start,
        sampler(temperature, top_k, top_p),
        rng,
    )


def _strip(ids: np.ndarray) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings for the decoder-only model."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def _decode_batch(
    model: nn.Module,
    params: Any,
    encoded: list[list[int]],
    model_type: str,
    max_source_length: int,
    max_target_length: int,
    beam_size: int = 1,
    alpha: float = 0.6,
    sampling: Sampling | None = None,
    place: Callable[[np.ndarray], Any] = np.asarray,
) -> list[list[int]]:
    """Output ids (up to EOS) for one batch of encoded sources; `place` puts the batch on the
    devices (e.g. split over a data axis)."""
    if model_type == "decoder_only":
        if beam_size > 1:
            raise ValueError("beam search is not implemented for model.type='decoder_only'; "
                             "decode it with --beam_size 1, or sample with --temperature")
        tokens = np.zeros((len(encoded), max_source_length + max_target_length), np.int32)
        for row, ids in enumerate(encoded):
            tokens[row, : len(ids)] = ids
        starts = np.array([max(len(ids), 1) for ids in encoded], np.int32)
        tokens, starts = place(tokens), place(starts)
        if sampling is None:
            out = np.asarray(greedy_continue(model, params, tokens, starts))
        else:
            out = np.asarray(sample_continue(
                model, params, tokens, starts, jax.random.key(sampling.seed),
                sampling.temperature, sampling.top_k, sampling.top_p,
            ))
        return [_strip(out[r, s:]) for r, s in enumerate(starts)]
    inputs = np.zeros((len(encoded), max_source_length), np.int32)
    for row, ids in enumerate(encoded):
        inputs[row, : len(ids)] = ids
    inputs = place(inputs)
    if beam_size > 1:
        out = beam_translate(model, params, inputs, beam_size, max_target_length, alpha)
    else:
        out = greedy_translate(model, params, inputs, max_target_length)
    out = np.asarray(out)
    return [_strip(row) for row in out]


def decode_texts(
    model: nn.Module,
    params: Any,
    tokenizer: Tokenizer,
    sources: Sequence[str],
    model_type: str,
    max_source_length: int,
    max_target_length: int,
    batch_size: int = 64,
    beam_size: int = 1,
    alpha: float = 0.6,
) -> list[str]:
    """Greedy (or with `beam_size` > 1, beam search) outputs for source texts, in their order;
    sources longer than the model's max_source_length are cut. Batches are padded to
    `batch_size` rows (one compilation)."""
    encoded = [tokenizer.encode(s)[: max_source_length - 1] + [EOS_ID] for s in sources]
    outputs = []
    for begin in range(0, len(encoded), batch_size):
        chunk = encoded[begin : begin + batch_size]
        padded = chunk + [[EOS_ID]] * (batch_size - len(chunk))
        ids = _decode_batch(
            model, params, padded, model_type, max_source_length, max_target_length,
            beam_size, alpha,
        )
        outputs += [tokenizer.decode(row) for row in ids[: len(chunk)]]
    return outputs


@dataclasses.dataclass
class Translator:
    """A model restored for decoding: config and tokenizer from the checkpoint, params only."""

    config: Any
    model: nn.Module
    params: Any
    tokenizer: Tokenizer
    step: int
    mesh: Mesh

    def place_batch(self, rows: np.ndarray) -> Array:
        """Rows split over the local devices (the data axis) when they divide evenly."""
        spec = P("data") if rows.shape[0] % self.mesh.size == 0 else P()
        return jax.device_put(rows, NamedSharding(self.mesh, spec))


def load_translator(workdir: str, step: int | None = None) -> Translator:
    """Restores checkpoint `step` (default: latest) of `workdir` onto this machine's devices,
    whatever mesh or device count wrote it: params replicated, batches split over a data axis.
    Reads no optimizer state."""
    host, step = checkpoint.restore_host_state(workdir, step, params_only=True)
    config, tokenizer = checkpoint.restore_config_and_tokenizer(workdir, step)
    model_config, params = unrolled_for_decoding(
        ModelConfig.from_config(config.model, tokenizer.vocab_size), host["params"]
    )
    model = build_model(model_config)
    mesh = sharding.local_mesh()
    params = jax.device_put(params, NamedSharding(mesh, P()))
    return Translator(config, model, params, tokenizer, step, mesh)


def _bucket(length: int, cap: int) -> int:
    """Lengths rounded up to a multiple of 16 (few compilations), at most `cap`."""
    return min(cap, max(16, -(-length // 16) * 16))


def translate(
    translator: Translator,
    lines: Sequence[str],
    batch_size: int = 64,
    progress: bool = True,
    beam_size: int = 4,
    alpha: float = 0.6,
    sampling: Sampling | None = None,
    extra_length: int = 50,
) -> tuple[list[str], dict[str, float]]:
    """Outputs for `lines` in their order (beam search, greedy for beam_size 1; for the
    decoder-only model greedy or `sampling`), and throughput figures.

    Lines are sorted by length into batches, so padding is small; outputs may be up to the
    source length (of the batch's length bucket) + `extra_length` tokens, 50 in the paper.
    A source over the model's maximum length
    (`data.test_max_source_length`) is cut, with a warning.
    """
    data = translator.config.data
    cap = data.test_max_source_length
    encoded = [translator.tokenizer.encode(line) + [EOS_ID] for line in lines]
    too_long = sum(len(ids) > cap for ids in encoded)
    if too_long:
        logging.warning("%d input lines are over %d tokens and were cut", too_long, cap)
    encoded = [ids[: cap - 1] + [EOS_ID] if len(ids) > cap else ids for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[list[int]] = [[] for _ in encoded]
    start = time.perf_counter()
    # Under this host's mesh, as training's decoding runs: kernels such as splash shard over it.
    with sharding.activate(translator.mesh):
        for begin in tqdm.trange(0, len(order), batch_size, disable=not progress, unit="batch"):
            rows = order[begin : begin + batch_size]
            source_length = _bucket(max(len(encoded[i]) for i in rows), cap)
            batch = [encoded[i] for i in rows] + [[EOS_ID]] * (batch_size - len(rows))
            ids = _decode_batch(
                translator.model,
                translator.params,
                batch,
                translator.config.model.type,
                source_length,
                source_length + extra_length,
                beam_size,
                alpha,
                None if sampling is None
                else dataclasses.replace(sampling, seed=sampling.seed + begin),
                translator.place_batch,
            )
            for i, row in zip(rows, ids, strict=False):
                outputs[i] = row
    seconds = max(time.perf_counter() - start, 1e-9)
    stats = {
        "sentences_per_s": len(lines) / seconds,
        "tokens_per_s": sum(len(o) + 1 for o in outputs) / seconds,
        "seconds": seconds,
    }
    return [translator.tokenizer.decode(o) for o in outputs], stats
