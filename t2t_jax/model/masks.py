"""Attention masks kept as the O(length) data they come from.

A [q_len, k_len] boolean mask costs quadratic memory, which is what flash kernels exist to avoid.
So the model describes its masks by segment ids (which packed example each position belongs to, 0
on padding) and a causal flag; each kernel turns that into what it takes: cuDNN a causal flag and
sequence lengths (for packed rows, each example's span), the Pallas TPU kernel segment ids and a
causal block mask, the blockwise kernel a mask per key block, and the XLA einsum path the dense
array (`AttentionMask.dense`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class AttentionMask:
    """Query i may attend to key j where both lie in the same example (equal, non-zero segment
    ids) and, if `causal`, j <= i.

    `packed` says whether a row may hold several examples; when it does not, each row's real
    tokens come first and its padding last, so lengths describe the mask too (what cuDNN takes).
    """

    query_segments: Array  # [batch, q_len] int32: 1, 2, ... per example in the row, 0 = padding
    key_segments: Array  # [batch, k_len]
    causal: bool = struct.field(pytree_node=False, default=False)
    packed: bool = struct.field(pytree_node=False, default=False)
    # The most examples a packed row holds (the packer keeps to it), 0 if unbounded: cuDNN takes
    # packed rows as spans (`segment_spans`) only with such a static bound.
    max_segments: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def from_tokens(
        cls,
        query_tokens: Array,
        key_tokens: Array,
        query_segmentation: Array | None = None,
        key_segmentation: Array | None = None,
        causal: bool = False,
        max_segments: int = 0,
    ) -> AttentionMask:
        """The mask for token ids (0 = padding) and, for packed rows, their segmentation (at
        most `max_segments` examples a row where that is not 0)."""
        packed = query_segmentation is not None or key_segmentation is not None
        query_segments = jnp.ones_like(query_tokens) if query_segmentation is None else (
            query_segmentation
        )
        key_segments = jnp.ones_like(key_tokens) if key_segmentation is None else (
            key_segmentation
        )
        return cls(
            jnp.where(query_tokens > 0, query_segments, 0).astype(jnp.int32),
            jnp.where(key_tokens > 0, key_segments, 0).astype(jnp.int32),
            causal=causal,
            packed=packed,
            max_segments=max_segments if packed else 0,
        )

    def allowed(self, query_positions: Array, key_positions: Array) -> Array:
        """Boolean [batch, 1, len(query_positions), len(key_positions)] for a block of the mask:
        the positions index this mask's queries and keys."""
        query = jnp.take(self.query_segments, query_positions, axis=1)
        key = jnp.take(self.key_segments, key_positions, axis=1)
        out = (query[:, None, :, None] == key[:, None, None, :]) & (query > 0)[:, None, :, None]
        if self.causal:
            out = out & (query_positions[:, None] >= key_positions[None, :])[None, None]
        return out

    def dense(self) -> Array:
        """The whole mask as a boolean [batch, 1, q_len, k_len] array."""
        return self.allowed(
            jnp.arange(self.query_segments.shape[1]), jnp.arange(self.key_segments.shape[1])
        )

    def lengths(self) -> tuple[Array, Array]:
        """(query lengths, key lengths) [batch] int32: the real tokens of each unpacked row."""
        return (
            jnp.sum(self.query_segments > 0, axis=1, dtype=jnp.int32),
            jnp.sum(self.key_segments > 0, axis=1, dtype=jnp.int32),
        )


def segment_spans(segments: Array, max_segments: int) -> tuple[Array, Array]:
    """Packed rows as spans, the form cuDNN's packed attention takes: (lengths [batch, M],
    offsets [batch, M + 1]) int32, where M = `max_segments`. Example k of a row (segment id k + 1)
    starts at offsets[:, k] and has lengths[:, k] tokens; slots past a row's last example hold
    -1. Segment ids must number a row's examples 1, 2, ... in order, each contiguous, as
    `data.batching.gather` writes them; ids above M are not described.
    """
    ids = jnp.arange(1, max_segments + 1, dtype=segments.dtype)
    member = segments[:, None, :] == ids[None, :, None]  # [batch, M, length]
    lengths = jnp.sum(member, axis=-1, dtype=jnp.int32)
    starts = jnp.argmax(member, axis=-1).astype(jnp.int32)
    present = lengths > 0
    lengths = jnp.where(present, lengths, -1)
    offsets = jnp.pad(jnp.where(present, starts, -1), ((0, 0), (0, 1)), constant_values=-1)
    return lengths, offsets


def as_dense(mask: AttentionMask | Array | None) -> Array | None:
    """A boolean array mask (broadcastable to [batch, heads, q_len, k_len]) for any mask."""
    return mask.dense() if isinstance(mask, AttentionMask) else mask
