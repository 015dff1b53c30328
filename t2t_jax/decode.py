"""Decoding: one path from text lines to n-best hypotheses, for every model and every caller.

`translate` (text) and `decode_ids` (token ids) are the only way anything decodes: training's
samples and BLEU, the `decode`, `evaluate` and `attention` commands, and `bench --mode decode`
(which times `search_batch`, the jitted search inside it). The path sorts inputs by length into
batches, pads each batch's length up to a bucket (few compilations), splits batches over this
machine's devices, searches (greedy, sampling or beam, from `search.py`), and returns the
results in input order.

Every model decodes incrementally over a key/value cache: the encoder-decoder (cross-attention
keys and values computed once per sentence) and the decoder-only model (its prompt is fed
through the cache token by token, forced, before the search chooses). A `Decoder` may hold
several models, an ensemble: at each step the search sees the mean of their log-probs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import numpy as np
import tqdm
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from t2t_jax import checkpoint, search, sharding
from t2t_jax.data.batching import bucket_length
from t2t_jax.data.tokenizer import EOS_ID, Tokenizer, UnknownSymbol
from t2t_jax.model import ModelConfig, build_model, unrolled_for_decoding
from t2t_jax.model.models import ModelType, model_type

Array = jax.Array


# --- models as step functions over a cache ------------------------------------------------


def start_ensemble(
    models: Sequence[nn.Module], params: Sequence[Any], inputs: Array, copies: int, length: int
) -> tuple[search.StepFn, Any]:
    """One step function for several models: the mean of their log-probs (one model: its own,
    unchanged); the cache is the tuple of theirs."""
    started = [model_type(m.config).start_search(m, p, inputs, copies, length)
               for m, p in zip(models, params, strict=True)]

    def step(caches, last):
        outs = [model_step(cache, last) for (model_step, _), cache in zip(started, caches,
                                                                         strict=True)]
        log_probs = sum(out[0] for out in outs) / len(outs)
        return log_probs, tuple(out[1] for out in outs)

    return step, tuple(cache for _, cache in started)


# --- the jitted search of one batch ---------------------------------------------------------


@partial(jax.tree_util.register_dataclass, data_fields=["alpha"],
         meta_fields=["beam_size", "nbest", "temperature", "top_k", "top_p"])
@dataclasses.dataclass(frozen=True)
class Search:
    """How to choose tokens: beam search (`beam_size` > 1, GNMT length penalty `alpha`),
    greedy (beam 1), or sampling (`temperature` > 0, with `top_k`/`top_p`); `nbest` results.

    A pytree whose one leaf is `alpha`: the search compiles once per beam size, n-best and
    sampling setting, and any alpha runs in that program (a server takes alpha per request)."""

    beam_size: int = 4
    alpha: float = 0.6
    nbest: int = 1
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError(f"--beam_size must be at least 1, got {self.beam_size}")
        if not 1 <= self.nbest <= self.beam_size:
            raise ValueError(f"--nbest {self.nbest} needs at least that many beams: pass "
                             f"--beam_size {max(self.nbest, 1)} or more")
        if self.temperature > 0 and self.beam_size > 1:
            raise ValueError("sampling (--temperature > 0) draws one output per input: pass "
                             "--beam_size 1 with it")


@partial(jax.jit, static_argnames=("models", "output_length"))
def search_batch(
    models: tuple[nn.Module, ...],
    params: tuple[Any, ...],
    inputs: Array,
    rng: Array,
    settings: Search,
    output_length: int,
    prefixes: Array | None = None,
) -> search.Hypotheses:
    """Searches one batch. inputs: [batch, src_len] ids (0-padded, each ending with EOS): the
    encoder-decoder's sources, or the decoder-only model's prompts. Returns `settings.nbest`
    hypotheses per row over a buffer of `output_length` tokens (decoder-only: src_len +
    output_length, the prompt in front). `prefixes` [batch, output_length] (0-padded): target
    tokens each row's output is forced to start with; all 0 decodes as if none were given."""
    prompt, start = model_type(models[0].config).search_buffer(inputs, output_length, prefixes)
    step, cache = start_ensemble(models, params, inputs, settings.beam_size, prompt.shape[1])
    if settings.beam_size > 1:
        return search.beam_search(
            step, cache, prompt, start, settings.beam_size, settings.alpha, settings.nbest
        )
    if settings.temperature > 0:
        choose = search.sampler(settings.temperature, settings.top_k, settings.top_p)
        return search.greedy_search(step, cache, prompt, start, choose, rng)
    return search.greedy_search(step, cache, prompt, start)


# --- the host side: sorting, bucketing, batching over devices, input order -----------------


class Hypothesis(NamedTuple):
    """One output: its token ids (up to EOS, prompt excluded, target prefix included), its total
    log-probability (EOS included; a target prefix's tokens are given, not chosen, so they are
    not in it), its length-normalised score (over the chosen tokens), and its text (filled in by
    `translate`)."""

    ids: list[int]
    log_prob: float
    score: float
    text: str = ""


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The host side of decoding. Outputs may be up to the batch's source length bucket +
    `extra_length` tokens (50 in the paper), and at most `max_output_length` when given.
    `fixed_length`: every batch has the full source length (one compilation, for line-by-line
    use)."""

    search: Search = Search()
    seed: int = 0
    batch_size: int = 64
    extra_length: int = 50
    max_output_length: int | None = None
    fixed_length: bool = False
    # Search with the target-prefix program even where no input has a prefix: a server, whose
    # batches mix both, then compiles one program per shape. Without prefixes the search skips
    # the forcing (a vocabulary-wide select each step, about 8% of a small model's beam search).
    always_prefix_program: bool = False


@dataclasses.dataclass
class Decoder:
    """Models restored for decoding (one, or several as an ensemble), on this machine's devices:
    params replicated, batches split over a data axis. `config` is the first model's."""

    config: Any
    models: tuple[nn.Module, ...]
    params: tuple[Any, ...]
    tokenizer: Tokenizer
    steps: tuple[int, ...]
    mesh: Mesh
    max_source_length: int

    @property
    def step(self) -> int:
        return self.steps[0]

    @property
    def model(self) -> nn.Module:
        return self.models[0]

    @property
    def model_type(self) -> ModelType:
        return model_type(self.models[0].config)

    def place_batch(self, rows: np.ndarray) -> Array:
        """Rows split over the local devices (the data axis) when they divide evenly."""
        spec = P("data") if rows.shape[0] % self.mesh.size == 0 else P()
        return jax.device_put(rows, NamedSharding(self.mesh, spec))


def decoder_for_params(
    model_config: ModelConfig, params: Any, tokenizer: Tokenizer, config: Any,
    max_source_length: int, step: int = 0,
) -> Decoder:
    """A Decoder for in-memory params (training's samples and BLEU), on this process's devices
    alone; scanned layers are unrolled for the cache."""
    model_config, params = unrolled_for_decoding(model_config, params)
    mesh = sharding.local_mesh()
    params = jax.device_put(params, NamedSharding(mesh, P()))
    return Decoder(config, (build_model(model_config),), (params,), tokenizer, (step,), mesh,
                   max_source_length)


def load_decoder(
    workdirs: str | Sequence[str], step: int | None = None, average: int = 1
) -> Decoder:
    """Restores checkpoint `step` (default: each one's latest) of each workdir, whatever mesh or
    device count wrote it, onto this machine's devices; several workdirs decode as an ensemble
    and must share a tokenizer and a model type. With `average` N > 1, each workdir's params are
    the mean of its newest N checkpoints (up to `step`), averaged in memory (nothing written).
    Reads no optimizer state."""
    workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
    models, params, steps, first = [], [], [], None
    mesh = sharding.local_mesh()
    for workdir in workdirs:
        if average > 1:
            averaged = checkpoint.newest_steps(workdir, average, step)
            host = {"params": checkpoint.mean_params(workdir, averaged)}
            restored_step = averaged[-1]
            logging.info("%s: the mean of the params of steps %s", workdir, averaged)
        else:
            host, restored_step = checkpoint.restore_host_state(workdir, step, params_only=True)
        config, tokenizer = checkpoint.restore_config_and_tokenizer(workdir, restored_step)
        if first is None:
            first = (workdir, config, tokenizer)
        elif tokenizer.to_json() != first[2].to_json():
            raise ValueError(f"{workdir} and {first[0]} have different tokenizers; an ensemble "
                             f"needs models trained with the same vocabulary")
        elif config.model.type != first[1].model.type:
            raise ValueError(f"{workdir} is a {config.model.type} model and {first[0]} a "
                             f"{first[1].model.type}; ensemble models of one type")
        model_config, model_params = unrolled_for_decoding(
            ModelConfig.from_config(config.model, tokenizer.vocab_size), host["params"]
        )
        models.append(build_model(model_config))
        params.append(jax.device_put(model_params, NamedSharding(mesh, P())))
        steps.append(restored_step)
    _, config, tokenizer = first
    return Decoder(config, tuple(models), tuple(params), tokenizer, tuple(steps), mesh,
                   config.data.test_max_source_length)


def strip_eos(ids: Sequence[int]) -> list[int]:
    """A searched row's ids up to its EOS (all of them where it ran to its length limit)."""
    ids = [int(i) for i in ids]
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


def needs_search(ids: Sequence[int], prefix: Sequence[int]) -> bool:
    """Whether an input is searched: an empty line (EOS alone) without a prefix is not, and
    gives `EMPTY`."""
    return len(ids) > 1 or bool(prefix)


EMPTY = [Hypothesis([], 0.0, 0.0, "")]


def with_texts(decoder: Decoder, hypotheses: Sequence[Hypothesis]) -> list[Hypothesis]:
    """`hypotheses` with their texts."""
    return [h._replace(text=decoder.tokenizer.decode(h.ids)) for h in hypotheses]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted, so padding is small)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


def batch_lengths(decoder: Decoder, options: DecodeOptions, longest_source: int
                  ) -> tuple[int, int]:
    """(source, output) buffer lengths of a batch whose longest source has `longest_source`
    tokens: its length bucket (the cap, with `fixed_length`), and that + `extra_length`, at most
    `max_output_length`. These are the shapes decoding compiles for."""
    cap = decoder.max_source_length
    source_length = cap if options.fixed_length else bucket_length(longest_source, cap)
    length = source_length + options.extra_length
    if options.max_output_length:
        length = min(length, options.max_output_length)
    return source_length, length


def check_prefixes(decoder: Decoder, options: DecodeOptions, encoded: Sequence[Sequence[int]],
                   prefixes: Sequence[Sequence[int]]) -> None:
    """That there is one prefix per input, each with room in its output (a one-line error)."""
    if len(prefixes) != len(encoded):
        raise ValueError(f"{len(prefixes)} target prefixes for {len(encoded)} inputs: give one "
                         f"per input (an empty one for none)")
    for number, (ids, prefix) in enumerate(zip(encoded, prefixes, strict=True), 1):
        room = batch_lengths(decoder, options, len(ids))[1] - 1
        if len(prefix) > room:
            raise ValueError(f"target prefix {number} has {len(prefix)} tokens, over the {room} "
                             f"its output may hold; shorten it or raise --extra_length")


def decode_ids(
    decoder: Decoder,
    encoded: Sequence[Sequence[int]],
    options: DecodeOptions = DecodeOptions(),
    progress: bool = False,
    prefixes: Sequence[Sequence[int]] | None = None,
) -> tuple[list[list[Hypothesis]], dict[str, float]]:
    """The n-best hypotheses (`options.search.nbest`, best first) for each input of token ids
    (each ending with EOS, at most `decoder.max_source_length`), in input order, and throughput
    figures (sentences/s, tokens/s of output, seconds). `prefixes`: token ids (no EOS) each
    input's outputs are forced to start with (forced decoding), one per input."""
    cap = decoder.max_source_length
    if any(len(ids) > cap for ids in encoded):
        raise ValueError(f"inputs must be at most {cap} tokens; cut them first (translate does)")
    prefixes = [[] for _ in encoded] if prefixes is None else prefixes
    check_prefixes(decoder, options, encoded, prefixes)
    forcing = options.always_prefix_program or any(prefixes)
    results: list[list[Hypothesis]] = [[] for _ in encoded]
    batch_size = options.batch_size
    start_time = time.perf_counter()
    # Under this host's mesh, as training's decoding runs: kernels such as splash shard over it.
    with sharding.activate(decoder.mesh):
        batches = length_sorted_batches([len(ids) for ids in encoded], batch_size)
        for number, rows in enumerate(tqdm.tqdm(batches, disable=not progress, unit="batch")):
            source_length, length = batch_lengths(decoder, options,
                                                  max(len(encoded[i]) for i in rows))
            inputs = np.zeros((batch_size, source_length), np.int32)
            inputs[len(rows):, 0] = EOS_ID  # padding rows: empty sources
            forced = np.zeros((batch_size, length), np.int32)
            for row, i in enumerate(rows):
                inputs[row, : len(encoded[i])] = encoded[i]
                forced[row, : len(prefixes[i])] = prefixes[i]
            found = search_batch(
                decoder.models, decoder.params, decoder.place_batch(inputs),
                jax.random.key(options.seed + number), options.search, length,
                decoder.place_batch(forced) if forcing else None,
            )
            tokens, log_prob, score = (np.asarray(x) for x in found)
            for row, i in enumerate(rows):
                begin = decoder.model_type.output_begin(len(encoded[i]))
                results[i] = [
                    Hypothesis(strip_eos(tokens[row, n, begin:]), float(log_prob[row, n]),
                               float(score[row, n]))
                    for n in range(tokens.shape[1])
                ]
    seconds = max(time.perf_counter() - start_time, 1e-9)
    stats = {
        "sentences_per_s": len(encoded) / seconds,
        "tokens_per_s": sum(len(r[0].ids) + 1 for r in results if r) / seconds,
        "seconds": seconds,
    }
    return results, stats


def encode_numbered(tokenizer: Tokenizer, lines: Sequence[str], what: str) -> list[list[int]]:
    """Each line's token ids; an unknown symbol is an error that names its line (1-based)."""
    encoded = []
    for number, line in enumerate(lines, 1):
        try:
            encoded.append(tokenizer.encode(line))
        except UnknownSymbol as error:
            raise UnknownSymbol(f"{what} line {number}: {error}") from None
    return encoded


def encode_lines(
    decoder: Decoder, lines: Sequence[str], what: str = "input"
) -> tuple[list[list[int]], list[int]]:
    """Token ids (EOS appended) of each line, cut to the model's source length, and the 1-based
    numbers of the lines that were cut. An unknown symbol's error names `what` line it was."""
    cap = decoder.max_source_length
    encoded = [ids + [EOS_ID] for ids in encode_numbered(decoder.tokenizer, lines, what)]
    cut = [n + 1 for n, ids in enumerate(encoded) if len(ids) > cap]
    return [ids[: cap - 1] + [EOS_ID] if len(ids) > cap else ids for ids in encoded], cut


def encode_prefixes(decoder: Decoder, prefixes: Sequence[str] | None, count: int
                    ) -> list[list[int]] | None:
    """Token ids (no EOS) of each target prefix, one per input (`count` of them); None: none."""
    if prefixes is None:
        return None
    if len(prefixes) != count:
        raise ValueError(f"{len(prefixes)} target prefixes for {count} inputs: give one per "
                         f"input (an empty one for none)")
    return encode_numbered(decoder.tokenizer, prefixes, "target prefix")


def translate_encoded(
    decoder: Decoder,
    encoded: Sequence[Sequence[int]],
    options: DecodeOptions = DecodeOptions(),
    progress: bool = False,
    prefixes: Sequence[Sequence[int]] | None = None,
) -> tuple[list[list[Hypothesis]], dict[str, float]]:
    """`decode_ids` with the texts of the hypotheses. An input of EOS alone (an empty line)
    without a prefix gives one empty hypothesis (score 0) without decoding."""
    prefixes = [[] for _ in encoded] if prefixes is None else prefixes
    check_prefixes(decoder, options, encoded, prefixes)
    wanted = [n for n, (ids, prefix) in enumerate(zip(encoded, prefixes, strict=True))
              if needs_search(ids, prefix)]
    found, stats = decode_ids(decoder, [encoded[n] for n in wanted], options, progress,
                              [prefixes[n] for n in wanted])
    results = [list(EMPTY) for _ in encoded]
    for n, hypotheses in zip(wanted, found, strict=True):
        results[n] = with_texts(decoder, hypotheses)
    return results, stats


def translate(
    decoder: Decoder,
    lines: Sequence[str],
    options: DecodeOptions = DecodeOptions(),
    progress: bool = False,
    prefixes: Sequence[str] | None = None,
) -> tuple[list[list[Hypothesis]], dict[str, float]]:
    """`decode_ids` for text: the n-best hypotheses of each line with their texts, in line
    order. An empty line gives one empty hypothesis (score 0) without decoding; a line over the
    model's source length (`data.test_max_source_length`) is cut, with a warning naming it.
    `prefixes`: one target prefix per line ("" for none) that its hypotheses start with."""
    encoded, cut = encode_lines(decoder, lines)
    if cut:
        shown = ", ".join(map(str, cut[:10])) + (" ..." if len(cut) > 10 else "")
        logging.warning(
            "%d input lines are over %d tokens and were cut (lines %s); every line still gets "
            "its output", len(cut), decoder.max_source_length, shown,
        )
    return translate_encoded(decoder, encoded, options, progress,
                             encode_prefixes(decoder, prefixes, len(lines)))


def best_texts(results: Sequence[Sequence[Hypothesis]]) -> list[str]:
    """The best hypothesis's text of each input."""
    return [hypotheses[0].text for hypotheses in results]


def translate_stream(
    decoder: Decoder,
    lines: Iterable[str],
    write: Callable[[list[Hypothesis]], None],
    options: DecodeOptions = DecodeOptions(),
    on_error: Callable[[str], None] | None = None,
) -> None:
    """Line-by-line use: decodes each line as it arrives and hands its hypotheses to `write`
    before reading the next. Every line has the full source length, so this compiles once. A
    line with a symbol outside the vocabulary goes to `on_error` (its number and the symbol)
    and the next is read; without `on_error` it raises."""
    options = dataclasses.replace(options, batch_size=1, fixed_length=True)
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        try:
            decoder.tokenizer.encode(line)
        except UnknownSymbol as error:
            if on_error is None:
                raise UnknownSymbol(f"input line {number}: {error}") from None
            on_error(f"line {number}: {error}")
            continue
        results, _ = translate(decoder, [line], options)
        write(results[0])
