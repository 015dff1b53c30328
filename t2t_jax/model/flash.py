"""Flash attention in plain JAX: linear memory on any backend (Dao et al. 2022; Rabe & Staats 2021).

The keys are visited a block at a time with an online softmax (a running maximum and sum per
query), so neither pass ever holds more than [q_len, block] scores. The backward pass is a custom
VJP that recomputes each block's weights from the saved log-sum-exp instead of keeping them, so
training memory is linear in the sequence length too. It is the kernel for backends without a
fused one (CPU, older GPUs) and for masks a fused kernel does not take; on GPU and TPU the vendor
kernels (cuDNN, Pallas splash) are faster.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from t2t_jax.model.masks import AttentionMask

Array = jax.Array

# A finite "minus infinity": a fully masked row (padding queries) then averages its values
# instead of dividing 0 by 0, as the einsum path's softmax over finfo.min does.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
DEFAULT_BLOCK = 512


def flash_attention(
    query: Array, key: Array, value: Array, mask: AttentionMask, block: int = DEFAULT_BLOCK
) -> Array:
    """softmax(Q K^T / sqrt(d_k)) V for query [batch, q_len, heads, d_k], key and value
    [batch, k_len, heads, d_k], without materialising the [q_len, k_len] weights.

    Keys are padded to a multiple of the block (the padding is masked). Returns the query's dtype.
    """
    k_len = key.shape[1]
    block = min(block, k_len)
    padding = -k_len % block
    if padding:
        key, value = (jnp.pad(x, ((0, 0), (0, padding), (0, 0), (0, 0))) for x in (key, value))
        mask = mask.replace(key_segments=jnp.pad(mask.key_segments, ((0, 0), (0, padding))))
    return _flash(query, key, value, mask, block)


def _key_blocks(key: Array, value: Array, block: int) -> tuple[Array, Array, Array]:
    """Keys and values as [blocks, batch, block, heads, d_k], with each block's key positions."""
    batch, k_len, heads, depth = key.shape
    count = k_len // block
    split = lambda x: x.reshape(batch, count, block, heads, depth).swapaxes(0, 1)  # noqa: E731
    return split(key), split(value), jnp.arange(k_len).reshape(count, block)


def _scores(query: Array, key_block: Array, mask: AttentionMask, positions: Array) -> tuple:
    """(masked scores [batch, heads, q_len, block] in float32, the block's mask)."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key_block, preferred_element_type=jnp.float32)
    allowed = mask.allowed(jnp.arange(query.shape[1]), positions)
    return jnp.where(allowed, scores, _MASKED), allowed


def _forward(query, key, value, mask, block):
    """(output [batch, q_len, heads, d_k], log-sum-exp [batch, heads, q_len]); query pre-scaled."""
    batch, q_len, heads, depth = query.shape

    def visit(carry, blocks):
        out, running_max, total = carry
        key_block, value_block, positions = blocks
        scores, _ = _scores(query, key_block, mask, positions)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        weights = jnp.exp(scores - new_max[..., None])
        rescale = jnp.exp(running_max - new_max)
        total = total * rescale + weights.sum(axis=-1)
        out = out * rescale[..., None] + jnp.einsum(
            "bhqk,bkhd->bhqd", weights.astype(value.dtype), value_block,
            preferred_element_type=jnp.float32,
        )
        return (out, new_max, total), None

    init = (
        jnp.zeros((batch, heads, q_len, depth), jnp.float32),
        jnp.full((batch, heads, q_len), _MASKED, jnp.float32),
        jnp.zeros((batch, heads, q_len), jnp.float32),
    )
    (out, running_max, total), _ = jax.lax.scan(visit, init, _key_blocks(key, value, block))
    out = (out / total[..., None]).transpose(0, 2, 1, 3).astype(query.dtype)
    return out, running_max + jnp.log(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(query, key, value, mask, block):
    scale = jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    return _forward(query * scale, key, value, mask, block)[0]


def _flash_forward(query, key, value, mask, block):
    scale = jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    out, log_sum_exp = _forward(query * scale, key, value, mask, block)
    return out, (query, key, value, mask, out, log_sum_exp)


def _flash_backward(block, residuals, d_out):
    """Per key block: recompute the weights from the log-sum-exp, then FlashAttention-2's
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ += dS K, dK = dS^T Q."""
    query, key, value, mask, out, log_sum_exp = residuals
    scale = query.shape[-1] ** -0.5
    scaled_query = query * jnp.asarray(scale, query.dtype)
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    row_dot = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def visit(d_query, blocks):
        key_block, value_block, positions = blocks
        scores, allowed = _scores(scaled_query, key_block, mask, positions)
        weights = jnp.exp(scores - log_sum_exp[..., None])
        d_value = f32("bhqk,bqhd->bkhd", weights.astype(d_out.dtype), d_out)
        d_weights = f32("bqhd,bkhd->bhqk", d_out, value_block)
        # Masked scores are constants: no gradient flows through them.
        d_scores = jnp.where(allowed, weights * (d_weights - row_dot[..., None]), 0.0)
        d_scores = d_scores.astype(query.dtype)
        d_query = d_query + f32("bhqk,bkhd->bqhd", d_scores, key_block)
        d_key = f32("bhqk,bqhd->bkhd", d_scores, scaled_query)
        return d_query, (d_key, d_value)

    d_query, (d_key, d_value) = jax.lax.scan(
        visit, jnp.zeros(query.shape, jnp.float32), _key_blocks(key, value, block)
    )
    unsplit = lambda x: x.swapaxes(0, 1).reshape(key.shape)  # noqa: E731
    # Segment ids are integers: their cotangent is float0.
    d_mask = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)
    return (
        (d_query * scale).astype(query.dtype),
        unsplit(d_key).astype(key.dtype),
        unsplit(d_value).astype(value.dtype),
        d_mask,
    )


_flash.defvjp(_flash_forward, _flash_backward)
