"""The paper's model: attention, embeddings and positions, encoder, decoder, the Transformer."""

from t2t_jax.model.embedding import shift_right
from t2t_jax.model.model_config import ModelConfig
from t2t_jax.model.models import build_model, model_type
from t2t_jax.model.scan import unrolled_for_decoding
from t2t_jax.model.transformer import DecoderOnlyLM, Transformer

__all__ = [
    "DecoderOnlyLM",
    "ModelConfig",
    "Transformer",
    "build_model",
    "model_type",
    "shift_right",
    "unrolled_for_decoding",
]
