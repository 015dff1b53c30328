"""The model types (MODEL_TYPES) and `build_model`, the one place that maps a type name to its
module: the Transformer, the decoder-only language model or the LSTM baseline."""

from __future__ import annotations

import dataclasses
import logging

from flax import linen as nn

from t2t_jax.model import attention as attn
from t2t_jax.model.lstm import LSTMSeq2Seq
from t2t_jax.model.transformer import DecoderOnlyLM, ModelConfig, Transformer


def build_model(config: ModelConfig, platform: str | None = None) -> nn.Module:
    """The module that `config.type` names, with `attention="auto"` resolved (logged) for
    `platform`: the devices it will run on, by default the current mesh's or JAX's default
    backend's (`attention.current_platform`)."""
    if config.attention == "auto":
        platform = platform or attn.current_platform()
        chosen, why = attn.select_attention("auto", platform, config.dtype)
        logging.info("model.attention=auto -> %s (%s)", chosen, why)
        config = dataclasses.replace(config, attention=chosen)
    if config.type == "decoder_only":
        return DecoderOnlyLM(config)
    if config.type == "lstm_seq2seq":
        return LSTMSeq2Seq(config)
    return Transformer(config)
