"""The Pallas splash (sparse flash) attention kernel for TPU, from `jax.experimental.pallas.ops`.

Splash takes one example at a time ([heads, length, d_k]), a static block mask (causal or full)
that lets it skip blocks above the diagonal, and segment ids for padding and packed examples, so
no [q_len, k_len] array exists anywhere. Mosaic kernels cannot be partitioned by XLA, so under a
mesh the call runs inside `shard_map`, split over batch and heads as the logical axis rules say.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as block_masks
from jax.sharding import PartitionSpec as P

from t2t_jax.model.masks import AttentionMask

Array = jax.Array

LANES = 128  # TPU vector lanes: block sizes, and so lengths, are multiples of this.
MAX_BLOCK = 512


def splash_attention(
    query: Array, key: Array, value: Array, mask: AttentionMask, interpret: bool = False
) -> Array:
    """Splash attention for query [batch, q_len, heads, d_k], key and value [batch, k_len, heads,
    d_k] -> [batch, q_len, heads, d_k]. Lengths are padded to a multiple of 128 (the padding is a
    segment of its own). `interpret` runs the kernel in the Pallas interpreter (any backend)."""
    q_len, k_len = query.shape[1], key.shape[1]
    pad_q, pad_k = -q_len % LANES, -k_len % LANES
    if pad_q or pad_k:
        pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        query, key, value = pad(query, pad_q), pad(key, pad_k), pad(value, pad_k)
        mask = mask.replace(
            query_segments=pad(mask.query_segments, pad_q),
            key_segments=pad(mask.key_segments, pad_k),
        )
    # Splash does not scale the scores.
    query = query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    run = functools.partial(_splash_batch, causal=mask.causal, interpret=interpret)
    spec, segment_spec = _sharded_specs(query.shape[0], query.shape[2])
    if spec is not None:
        run = jax.shard_map(
            run,
            in_specs=(spec, spec, spec, segment_spec, segment_spec),
            out_specs=spec,
            check_vma=False,
        )
    out = run(
        heads_first(query), heads_first(key), heads_first(value),
        mask.query_segments, mask.key_segments,
    )
    return heads_first(out)[:, :q_len]


def _splash_batch(query, key, value, query_segments, key_segments, *, causal, interpret):
    """The kernel over a batch of [batch, heads, length, d_k] (the local shard under a mesh)."""
    heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
    shape = (q_len, k_len)
    head_mask = block_masks.CausalMask(shape) if causal else block_masks.FullMask(shape)
    block_q, block_k = _block(q_len), _block(k_len)
    kernel = splash.make_splash_mha(
        block_masks.MultiHeadMask([head_mask] * heads),
        block_sizes=splash.BlockSizes(
            block_q=block_q, block_kv=block_k,
            block_q_dkv=block_q, block_kv_dkv=block_k,
            block_q_dq=block_q, block_kv_dq=block_k,
        ),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    segments = splash.SegmentIds(q=query_segments, kv=key_segments)
    return jax.vmap(kernel)(query, key, value, segment_ids=segments)


def _block(length: int) -> int:
    """The largest multiple of 128 up to 512 that divides `length` (itself a multiple of 128)."""
    return max(b for b in range(LANES, MAX_BLOCK + 1, LANES) if length % b == 0)


def _sharded_specs(batch: int, heads: int) -> tuple[P | None, P | None]:
    """(spec of [batch, heads, length, d_k], spec of [batch, length]) on the current mesh, from
    the logical axis rules, leaving unsplit a dimension the mesh does not divide (a one-row
    batch that only traces shapes); (None, None) outside a mesh (one device, or under pmap)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return None, None

    def divisible(axes, size):
        group = (axes,) if isinstance(axes, str) else (axes or ())
        return axes if size % math.prod(mesh.shape[a] for a in group) == 0 else None

    batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(
        ("act_batch", "act_length", "act_heads", None)
    )
    batch_axes, head_axes = divisible(batch_axes, batch), divisible(head_axes, heads)
    return P(batch_axes, head_axes, None, None), P(batch_axes, None)
