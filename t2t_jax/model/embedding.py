"""Token embeddings times sqrt(d_model) plus sinusoidal positional encoding (3.4, 3.5), the
pre-softmax projection that shares their weights, and the decoder's input tokens (the targets
shifted right)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array


def sinusoidal_encoding(positions: Array, d_model: int, max_timescale: float = 10_000.0) -> Array:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    Args:
      positions: integer positions, any shape (e.g. [batch, length]; restart at 0 in each
        packed example).
      d_model: model width; must be even.
    Returns:
      float32 array of shape positions.shape + (d_model,), sin and cos interleaved as in the paper.
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal encoding needs an even model.d_model, got {d_model}")
    inv_freq = 1.0 / max_timescale ** (np.arange(0, d_model, 2, dtype=np.float32) / d_model)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
        *positions.shape, d_model
    )


def embedding_init(d_model: int) -> nn.initializers.Initializer:
    """N(0, d_model^-0.5): with the sqrt(d_model) scale, embedded tokens have unit variance."""
    return nn.with_logical_partitioning(
        nn.initializers.normal(stddev=d_model**-0.5), ("vocab", "embed")
    )


POSITIONAL_ENCODINGS = ("sinusoidal", "learned", "none")


class Embedder(nn.Module):
    """Embedding lookup times sqrt(d_model), plus positional encoding, then residual dropout.

    positional: "sinusoidal" (the paper's), "learned" (a trained [max_positions, d_model]
    table, the paper's Table 3 row (E); positions past the table reuse its last row) or "none"
    (no order information at all, for the guide's experiment).
    """

    embedding: nn.Module
    d_model: int
    dropout_rate: float
    dtype: jnp.dtype = jnp.float32
    positional: str = "sinusoidal"
    max_positions: int = 1024

    @nn.compact
    def __call__(self, tokens: Array, positions: Array | None, deterministic: bool) -> Array:
        """tokens: [batch, length] ids -> [batch, length, d_model]."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embedding(tokens) * jnp.sqrt(self.d_model).astype(self.dtype)
        if self.positional == "sinusoidal":
            x = x + sinusoidal_encoding(positions, self.d_model).astype(self.dtype)
        elif self.positional == "learned":
            table = self.param(
                "position_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (self.max_positions, self.d_model),
            )
            x = x + jnp.take(table, positions, axis=0, mode="clip").astype(self.dtype)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


def _vocab_logits(y: Array, table: Array, dtype: Any) -> Array:
    return jnp.einsum(
        "bld,vd->blv", y.astype(dtype), table.astype(dtype), preferred_element_type=jnp.float32
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def vocab_logits(y: Array, table: Array, dtype: Any) -> Array:
    """The pre-softmax projection y @ table^T: [batch, length, d] x [vocab, d] -> float32
    logits [batch, length, vocab].

    The matmuls take `dtype` inputs (bf16 runs them at the matrix units' bf16 rate) and
    accumulate in float32, so the logits and the softmax over them are float32 as the paper's.
    The backward pass casts the logits' gradient to `dtype` too: left in float32, both of its
    matmuls (for y and for the table) would run at float32 rate, and this layer is about a
    quarter of the base model's FLOPs. Gradients come out accumulated in float32.
    """
    return _vocab_logits(y, table, dtype)


def _vocab_logits_forward(y, table, dtype):
    # The inputs themselves are kept: y is in `dtype` already, the table is a param kept anyway.
    return _vocab_logits(y, table, dtype), (y, table)


def _vocab_logits_backward(dtype, residuals, grad):
    y, table = residuals
    grad = grad.astype(dtype)
    grad_y = jnp.einsum(
        "blv,vd->bld", grad, table.astype(dtype), preferred_element_type=jnp.float32
    )
    grad_table = jnp.einsum(
        "blv,bld->vd", grad, y.astype(dtype), preferred_element_type=jnp.float32
    )
    return grad_y.astype(y.dtype), grad_table.astype(table.dtype)


vocab_logits.defvjp(_vocab_logits_forward, _vocab_logits_backward)


def shift_right(targets: Array, segmentation: Array | None = None) -> Array:
    """Decoder inputs: targets moved one step right with 0 (the start symbol) in front.

    In packed rows each example starts again with 0 rather than the previous example's last token.
    """
    shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    if segmentation is not None:
        shifted = shifted * (segmentation == jnp.pad(segmentation, ((0, 0), (1, 0)))[:, :-1])
    return shifted
