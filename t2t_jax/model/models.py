"""The model types behind one interface: what the rest of t2t_jax asks of a model, answered once
per type, as t5x's `EncoderDecoderModel` and `DecoderOnlyModel` do.

`model_type(config)` (a ModelConfig, `config.model` or the type's name) gives the type's object.
It knows its module (`module`), its batch layout (`feature_lengths`, `joins_source_and_target`,
`split_length`), the rows it scores (`scoring_batch`), its key/value cache and step function for
search (`start_search`, `search_buffer`, `output_begin`, `search_length`), the programs compiled
ahead of time (`search_inputs`, `encoder_program`), its FLOPs (`flops_per_step`) and memory
(`activation_bytes`). Nothing outside this package branches on a type's name: a new model type
is one class here. The LSTM baseline implements what it supports (training, teacher-forced
evaluation and scoring); the rest is a one-line NotSupported error.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from t2t_jax.data.batching import Lengths, bucket_length
from t2t_jax.model import kernels
from t2t_jax.model.lstm import LSTMSeq2Seq
from t2t_jax.model.model_config import ModelConfig
from t2t_jax.model.transformer import DecoderOnlyLM, Transformer

Array = jax.Array
# (cache, last tokens [rows]) -> (log-probs [rows, vocab], cache): what the searches step.
StepFn = Callable[[Any, Array], tuple[Array, Any]]


class NotSupported(ValueError):
    """What a model type cannot do: one line naming the type and the missing feature."""


def _attention_flops(d_model: int, attended: int) -> int:
    """Multiply-adds per token: Q, K, V and output projections, then the scores Q K^T and the
    weighted sum over the attended positions."""
    return 4 * d_model * d_model + 2 * d_model * attended


def _layer_activation(s: int, b: int, h: int, a: int, memory: int | None) -> float:
    """Bytes (at 16 bits) of one layer's activations over s positions, with cross-attention to
    `memory` positions if given (Korthikanti et al.'s count)."""
    base = s * b * h * (34 + 5 * a * s / h)
    return base + (s * b * (11 * h + 5 * a * memory) if memory else 0)


# --- the key/value cache and one incremental step, per model -------------------------------


def init_cache(
    model: nn.Module, params: Any, encoded: Array, inputs: Array, max_length: int
) -> Any:
    """The encoder-decoder's key/value cache for up to `max_length` output tokens, with the
    encoder output's cross-attention keys and values computed once, here."""
    dummy = jnp.ones((inputs.shape[0], max_length), jnp.int32)
    _, variables = model.apply(
        {"params": params}, encoded, inputs, dummy, cache_mode="init", mutable=["cache"],
        method=model.decode,
    )
    return variables["cache"]


def decode_step(
    model: nn.Module, params: Any, cache: Any, encoded: Array, inputs: Array, last: Array
) -> tuple[Array, Any]:
    """One incremental encoder-decoder step: last tokens [batch] (0 at the start) ->
    next-token logits [batch, vocab] and the updated cache."""
    logits, variables = model.apply(
        {"params": params, "cache": cache}, encoded, inputs, last[:, None], cache_mode="step",
        mutable=["cache"], method=model.decode,
    )
    return logits[:, 0], variables["cache"]


def init_lm_cache(model: nn.Module, params: Any, rows: int, max_length: int) -> Any:
    """The decoder-only model's key/value cache for sequences of up to `max_length` tokens."""
    dummy = jnp.ones((rows, max_length), jnp.int32)
    _, variables = model.apply({"params": params}, dummy, cache_mode="init", mutable=["cache"])
    return variables["cache"]


def lm_step(model: nn.Module, params: Any, cache: Any, last: Array) -> tuple[Array, Any]:
    """One incremental decoder-only step: last tokens [batch] (0 at the start) -> next-token
    logits [batch, vocab] and the updated cache."""
    logits, variables = model.apply(
        {"params": params, "cache": cache}, last[:, None], cache_mode="step", mutable=["cache"]
    )
    return logits[:, 0], variables["cache"]


class ModelType:
    """One model type, of one ModelConfig (`config`; None where only the type is known). The
    encoder-decoder's behaviour is the default; subclasses change what differs."""

    name: ClassVar[str]
    # Whether a batch is one sequence, source then target, with the loss on the target part
    # (the decoder-only model), rather than separate inputs and targets.
    joins_source_and_target: ClassVar[bool] = False

    def __init__(self, config: ModelConfig | None = None):
        self.config = config

    def module(self, config: ModelConfig) -> nn.Module:
        return Transformer(config)

    # --- the batch layout ---------------------------------------------------------------

    def feature_lengths(self, source: int, target: int) -> dict[str, int]:
        """The features of a batch and their lengths, for `source` and `target` tokens."""
        return Lengths(source, target).feature_lengths(self.joins_source_and_target)

    def token_features(self) -> tuple[str, ...]:
        """The features that hold tokens."""
        return ("inputs", "targets")

    def split_length(self, seq_len: int) -> tuple[int, int]:
        """(source, target) lengths whose rows hold `seq_len` tokens a side."""
        return seq_len, seq_len

    # --- scoring ----------------------------------------------------------------------

    def scoring_batch(self, sources: Sequence[list[int]], targets: Sequence[list[int]],
                      rows: Sequence[int], batch_size: int, source_cap: int
                      ) -> dict[str, np.ndarray]:
        """One padded batch of the pairs `rows` for teacher-forced scoring."""
        source_length = bucket_length(max(len(sources[i]) for i in rows), source_cap)
        target_length = bucket_length(max(len(targets[i]) for i in rows), 1 << 30)
        batch = {"inputs": np.zeros((batch_size, source_length), np.int32),
                 "targets": np.zeros((batch_size, target_length), np.int32)}
        for row, i in enumerate(rows):
            batch["inputs"][row, : len(sources[i])] = sources[i]
            batch["targets"][row, : len(targets[i])] = targets[i]
        return batch

    # --- search over the key/value cache -------------------------------------------------

    def start_search(self, module: nn.Module, params: Any, inputs: Array, copies: int,
                     length: int) -> tuple[StepFn, Any]:
        """(step function giving log-probs, initial cache) for `inputs` [rows, src_len], each
        row repeated `copies` times (beams), over a buffer of `length` tokens."""
        encoded = module.apply({"params": params}, inputs, method=module.encode)
        inputs, encoded = jnp.repeat(inputs, copies, axis=0), jnp.repeat(encoded, copies, axis=0)
        cache = init_cache(module, params, encoded, inputs, length)

        def step(cache, last):
            logits, cache = decode_step(module, params, cache, encoded, inputs, last)
            return jax.nn.log_softmax(logits), cache

        return step, cache

    def search_buffer(self, inputs: Array, output_length: int, prefixes: Array | None = None
                      ) -> tuple[Array, Array]:
        """(the buffer the search fills [rows, length], each row's first position to fill).
        `prefixes` [rows, output_length] (0 after each row's prefix): target tokens forced at the
        front of the output, before the search chooses."""
        rows = inputs.shape[0]
        if prefixes is None:
            return jnp.zeros((rows, output_length), jnp.int32), jnp.zeros((rows,), jnp.int32)
        return prefixes, jnp.sum(prefixes > 0, axis=1).astype(jnp.int32)

    def output_begin(self, source_tokens: int) -> int:
        """Where a row's output starts in the searched buffer."""
        return 0

    def search_length(self, max_length: int, source_len: int) -> int:
        """The output buffer of a search whose sequences may reach `max_length` tokens."""
        return max_length

    def search_inputs(self, batch: dict[str, Any], seq_len: int) -> tuple[Any, int]:
        """(inputs, output length) that generate `seq_len` tokens a row from a batch of
        `feature_lengths(seq_len, seq_len)`: from a seq_len-token source here."""
        return batch["inputs"], seq_len

    def encoder_program(self, module: nn.Module, params: Any, inputs: Any
                        ) -> Callable[[], Any] | None:
        """The encoder lowered alone (compiled ahead of time beside the search), if any."""
        encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
        return lambda: encode.lower(params, inputs)

    # --- cost ---------------------------------------------------------------------------

    def flops_per_step(self, batch: int, seq_len: int, mode: str,
                       source_len: int | None = None) -> float:
        """Model FLOPs of one step on `batch` rows of `seq_len` target tokens and `source_len`
        source tokens (default: seq_len), by Kaplan et al. 2020's and PaLM's conventions: per
        token, 2 FLOPs per weight it multiplies (projections, feed-forward and, on the target
        side, the pre-softmax matrix; not the embedding lookups) plus attention's scores and
        weighted sum, 4 * d_model * (attended length) per layer and attention block (the full
        length: masks are not subtracted). A train step is 3 forward passes' worth."""
        config = self.config
        d, f, v = config.d_model, config.d_ff, config.vocab_size
        source_len = seq_len if source_len is None else source_len
        ffn = 2 * d * f
        decoder_layer = _attention_flops(d, seq_len) + ffn + self._cross_attention(d, source_len)
        per_target_token = 2 * (config.num_decoder_layers * decoder_layer + d * v)
        forward = batch * seq_len * per_target_token + batch * source_len * self._per_source(
            source_len)
        return float(forward * (3 if mode == "train" else 1))

    def _cross_attention(self, d_model: int, source_len: int) -> int:
        return _attention_flops(d_model, source_len)

    def _per_source(self, source_len: int) -> int:
        d, f = self.config.d_model, self.config.d_ff
        return 2 * self.config.num_encoder_layers * (_attention_flops(d, source_len) + 2 * d * f)

    def activation_bytes(self, lengths: dict[str, int], rows_per_device: int) -> float:
        """Bytes (at 16 bits) of the layers' activations kept for the backward pass."""
        config = self.config
        b, h, a = rows_per_device, config.d_model, config.num_heads
        total = config.num_decoder_layers * _layer_activation(lengths["targets"], b, h, a,
                                                              lengths["inputs"])
        return total + config.num_encoder_layers * _layer_activation(lengths["inputs"], b, h, a,
                                                                     None)

    def layers_text(self) -> str:
        return f"{self.config.num_encoder_layers}+{self.config.num_decoder_layers}"


class EncoderDecoder(ModelType):
    """The paper's Transformer: an encoder over the source, a decoder over the target."""

    name = "encoder_decoder"


class DecoderOnly(ModelType):
    """A language model of the decoder's blocks: one sequence, the source as its prompt."""

    name = "decoder_only"
    joins_source_and_target = True

    def module(self, config: ModelConfig) -> nn.Module:
        return DecoderOnlyLM(config)

    def token_features(self) -> tuple[str, ...]:
        return ("targets",)

    def split_length(self, seq_len: int) -> tuple[int, int]:
        return seq_len // 2, seq_len - seq_len // 2

    def scoring_batch(self, sources, targets, rows, batch_size, source_cap):
        length = bucket_length(max(len(sources[i]) + len(targets[i]) for i in rows), 1 << 30)
        batch = {"targets": np.zeros((batch_size, length), np.int32),
                 "loss_mask": np.zeros((batch_size, length), np.int32)}
        for row, i in enumerate(rows):
            source, target = sources[i], targets[i]
            batch["targets"][row, : len(source) + len(target)] = source + target
            batch["loss_mask"][row, len(source) : len(source) + len(target)] = 1
        return batch

    def start_search(self, module, params, inputs, copies, length):
        cache = init_lm_cache(module, params, inputs.shape[0] * copies, length)

        def step(cache, last):
            logits, cache = lm_step(module, params, cache, last)
            return jax.nn.log_softmax(logits), cache

        return step, cache

    def search_buffer(self, inputs, output_length, prefixes=None):
        prompt = jnp.pad(inputs, ((0, 0), (0, output_length)))
        source_tokens = jnp.sum(inputs > 0, axis=1).astype(jnp.int32)
        if prefixes is None:
            return prompt, source_tokens
        # Each row's prefix goes right after its own prompt (sources differ in length); the
        # positions written stay inside the buffer, as no source exceeds inputs' width.
        positions = source_tokens[:, None] + jnp.arange(output_length)[None, :]
        rows = jnp.arange(inputs.shape[0])[:, None]
        prompt = prompt.at[rows, positions].max(prefixes)
        return prompt, source_tokens + jnp.sum(prefixes > 0, axis=1).astype(jnp.int32)

    def output_begin(self, source_tokens: int) -> int:
        return source_tokens

    def search_length(self, max_length: int, source_len: int) -> int:
        return max_length - source_len  # the buffer holds the prompt too

    def search_inputs(self, batch, seq_len):
        return batch["targets"][:, :1], seq_len - 1  # a one-token prompt

    def encoder_program(self, module, params, inputs):
        return None

    def _cross_attention(self, d_model: int, source_len: int) -> int:
        return 0

    def _per_source(self, source_len: int) -> int:
        return 0

    def activation_bytes(self, lengths, rows_per_device):
        config = self.config
        b, h, a = rows_per_device, config.d_model, config.num_heads
        return config.num_decoder_layers * _layer_activation(lengths["targets"], b, h, a, None)

    def layers_text(self) -> str:
        return f"{self.config.num_decoder_layers}"


class LSTMBaseline(ModelType):
    """The paper guide's recurrent baseline (model/lstm.py): trains, evaluates and scores with
    teacher forcing; it has no incremental decoder, FLOPs formula or memory model."""

    name = "lstm_seq2seq"

    def module(self, config: ModelConfig) -> nn.Module:
        return LSTMSeq2Seq(config)

    def _unsupported(self, what: str) -> NotSupported:
        return NotSupported(f"{what} is not supported for {self.name} (the recurrent baseline "
                            "trains, evaluates and scores only)")

    def start_search(self, module, params, inputs, copies, length):
        raise self._unsupported("decoding (search over a key/value cache)")

    def encoder_program(self, module, params, inputs):
        raise self._unsupported("compiling the decode loop")

    def flops_per_step(self, batch, seq_len, mode, source_len=None):
        raise self._unsupported("a FLOPs formula (and so MFU)")

    def activation_bytes(self, lengths, rows_per_device):
        raise self._unsupported("an activation memory estimate")


MODEL_CLASSES: dict[str, type[ModelType]] = {
    cls.name: cls for cls in (EncoderDecoder, DecoderOnly, LSTMBaseline)}


def model_type(config: ModelConfig | Any | str) -> ModelType:
    """The ModelType of a ModelConfig, of a `config.model`, or of a type's name."""
    name = config if isinstance(config, str) else config.type
    if name not in MODEL_CLASSES:
        raise ValueError(f"model.type must be one of {tuple(MODEL_CLASSES)}, got {name!r}")
    return MODEL_CLASSES[name](config if isinstance(config, ModelConfig) else None)


def build_model(config: ModelConfig, platform: str | None = None) -> nn.Module:
    """The module of `config.type`, with `attention="auto"` resolved (logged) for `platform`:
    the devices it will run on, by default the current mesh's or JAX's default backend's
    (`kernels.current_platform`)."""
    if config.attention == "auto":
        platform = platform or kernels.current_platform()
        chosen, why = kernels.select_attention("auto", platform, config.dtype)
        logging.info("model.attention=auto -> %s (%s)", chosen, why)
        config = dataclasses.replace(config, attention=chosen)
    return model_type(config).module(config)
