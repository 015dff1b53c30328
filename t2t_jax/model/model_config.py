"""`ModelConfig`: the hyperparameters of one model (the fields of `config.model` plus the vocab
size), checked when made, and the choices some of them name."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from t2t_jax.model import kernels
from t2t_jax.model.embedding import POSITIONAL_ENCODINGS

# "lstm_seq2seq": the recurrent baseline of t2t_jax/model/lstm.py (no incremental decoder).
MODEL_TYPES = ("encoder_decoder", "decoder_only", "lstm_seq2seq")


# What the backward pass may keep instead of recomputing: everything ("none": no remat),
# nothing ("full"), or the matmul outputs ("dots").
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}


NORM_POSITIONS = ("post", "pre")


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of one Transformer; the fields of `config.model` plus the vocab size."""

    vocab_size: int
    type: str = "encoder_decoder"
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    d_model: int = 512
    d_ff: int = 2048
    num_heads: int = 8
    dropout_rate: float = 0.1  # P_drop: sub-layer outputs and embedding sums
    attention_dropout_rate: float = 0.0  # not in the paper; T2T's attention_dropout
    relu_dropout_rate: float = 0.0  # not in the paper; T2T's relu_dropout
    share_embeddings: bool = True  # source, target and pre-softmax weights tied
    attention_bias: bool = False  # True: biases on W^Q, W^K, W^V, W^O (not in the paper)
    norm: str = "post"  # "post": LayerNorm(x + Sublayer(x)) as in the paper; "pre": x + f(LN(x))
    layer_norm_epsilon: float = 1e-6
    attention: str = "xla"  # one of kernels.ATTENTION_IMPLEMENTATIONS
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: str = "none"  # rematerialisation of each layer: one of REMAT_POLICIES
    # One layer's code scanned over stacked params (nn.scan) instead of N unrolled copies:
    # compile time stops growing with depth. Params gain a leading "layers" axis; decoding
    # unstacks them (`unrolled_for_decoding`).
    scan_layers: bool = False
    # For the paper guide's experiments (docs/paper_guide.md); the defaults are the paper's.
    positional: str = "sinusoidal"  # or "learned" (max_positions rows) or "none"
    max_positions: int = 1024
    scale_attention: bool = True  # False drops the 1/sqrt(d_k) of scaled dot-product attention
    residual: bool = True  # False drops the residual connections around every sub-layer
    # The most examples a packed row holds (the packer keeps to it); 0: as many as fit. Above 0,
    # cuDNN takes packed rows as spans instead of a dense [q_len, k_len] mask.
    max_segments_per_row: int = 0

    def __post_init__(self):
        checks = [
            (self.type in MODEL_TYPES, f"model.type must be one of {MODEL_TYPES}"),
            (self.norm in NORM_POSITIONS, f"model.norm must be one of {NORM_POSITIONS}"),
            (self.dtype in DTYPES, f"model.dtype must be one of {tuple(DTYPES)}"),
            (self.remat in REMAT_POLICIES, f"model.remat must be one of {tuple(REMAT_POLICIES)}"),
            (
                self.positional in POSITIONAL_ENCODINGS,
                f"model.positional must be one of {POSITIONAL_ENCODINGS}",
            ),
            (
                self.attention in kernels.ATTENTION_IMPLEMENTATIONS,
                f"model.attention must be one of {kernels.ATTENTION_IMPLEMENTATIONS}",
            ),
            (
                self.max_segments_per_row == 0 or self.max_segments_per_row >= 2,
                "model.max_segments_per_row must be 0 (as many as fit) or at least 2",
            ),
            (
                self.d_model % self.num_heads == 0,
                f"model.d_model={self.d_model} must be divisible by model.num_heads="
                f"{self.num_heads}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @classmethod
    def from_config(cls, model_config: Any, vocab_size: int) -> ModelConfig:
        """Builds from an ml_collections `config.model` (vocab_size None means the tokenizer's)."""
        fields = dict(model_config)
        configured = fields.pop("vocab_size", None)
        if configured is not None and configured < vocab_size:
            raise ValueError(
                f"model.vocab_size={configured} is smaller than the tokenizer's {vocab_size}; "
                "raise it or set it to None"
            )
        return cls(vocab_size=configured or vocab_size, **fields)
