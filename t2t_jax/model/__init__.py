"""The paper's model: attention, embeddings and positions, encoder, decoder, the Transformer."""

from t2t_jax.model.transformer import (
    DecoderOnlyLM,
    ModelConfig,
    Transformer,
    build_model,
    shift_right,
    unrolled_for_decoding,
)

__all__ = [
    "DecoderOnlyLM",
    "ModelConfig",
    "Transformer",
    "build_model",
    "shift_right",
    "unrolled_for_decoding",
]
