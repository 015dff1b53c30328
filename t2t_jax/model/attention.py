"""Multi-head attention (paper section 3.2.2) over the kernels of `kernels.py`, with its key/value
cache for incremental decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from t2t_jax.model.kernels import Mask, attention_fn, attention_weights, cached_attention

Array = jax.Array


def heads_first(x: Array) -> Array:
    """[batch, length, heads, d_k] -> [batch, heads, length, d_k]: the decoding cache's layout."""
    return jnp.swapaxes(x, 1, 2)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O with head_i = Attention(Q W_i^Q, ...).

    Projections carry logical axes ('embed', 'heads', 'kv') so that a rules table can shard
    them (heads over the tensor axis, embed over fsdp) with no change here.

    Incremental decoding (`cache_mode`): "init" runs as usual on a full-length dummy query and
    creates the 'cache' collection: zeros for self-attention keys/values, and for cross-attention
    the encoder output's keys/values, computed once per sentence. "step" then takes one query
    position: self-attention writes its key/value at the cache index and attends to positions up
    to it (`mask` is then each row's position [batch], or None where every row is at the cache
    index: rows may start at different steps, as a server's continuous batching starts them);
    cross-attention reads its cached keys/values without projecting again. The cache is
    [batch, heads, length, d_k] (`kernels.cached_attention` says why), and a step's attention is
    the einsum path whatever `attention` names: one query position has nothing to tile.
    """

    num_heads: int
    d_model: int
    attention: str = "xla"
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    kind: str = "self"  # "self" or "cross": what the cache keeps
    scale: bool = True  # False: unscaled dot products (the guide's experiment on 1/sqrt(d_k))
    use_bias: bool = False  # the paper's projections are matrices; True adds a bias to each

    def _projection(self, name: str) -> nn.Einsum:
        """[batch, length, d_model] -> [batch, length, heads, d_k]."""
        return nn.Einsum(
            shape=(self.d_model, self.num_heads, self.d_model // self.num_heads),
            einsum_str="bld,dhk->blhk",
            dtype=self.dtype,
            # Glorot over the full d_model x d_model matrix, as for an unsplit Dense layer.
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.variance_scaling(
                    1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2)
                ),
                ("embed", "heads", "kv"),
            ),
            use_bias=self.use_bias,
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
            name=name,
        )

    def _cached_keys_values(
        self, inputs_kv: Array, mask: Mask, cache_mode: str
    ) -> tuple[Array, Array, Mask]:
        """Keys, values and mask under incremental decoding (see the class docstring): in
        "init", [batch, length, heads, d_k] as without a cache; in "step", the cache's
        [batch, heads, length, d_k]."""
        if self.kind == "cross" and cache_mode == "step":
            cached = [self.get_variable("cache", f"cached_{n}") for n in ("key", "value")]
            return cached[0], cached[1], mask
        key = self._projection("key")(inputs_kv)
        value = self._projection("value")(inputs_kv)
        if self.kind == "cross":  # init: keep the encoder output's keys and values
            self.put_variable("cache", "cached_key", heads_first(key))
            self.put_variable("cache", "cached_value", heads_first(value))
            return key, value, mask
        shape = heads_first(key).shape  # in "init", the cache's: the query is full-length
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if cache_mode == "init":
            return key, value, mask
        i = index.value
        length = cached_key.value.shape[2]
        # A ring: step i writes slot i % length, and a row sees the slots of its own steps (its
        # position + 1 of them), so rows that started at different steps share one cache.
        slot = i % length
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, heads_first(key), (0, 0, slot, 0))
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, heads_first(value), (0, 0, slot, 0))
        index.value = i + 1
        positions = jnp.full(key.shape[:1], i) if mask is None else mask
        age = (slot - jnp.arange(length)) % length  # steps since each slot was written
        visible = age[None, :] <= positions[:, None]
        return cached_key.value, cached_value.value, visible[:, None, None, :]

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        mask: Mask,
        deterministic: bool,
        cache_mode: str | None = None,
    ) -> Array:
        """inputs_q: [batch, q_len, d_model]; inputs_kv: [batch, k_len, d_model] -> [b, q, d]."""
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads="
                f"{self.num_heads}; pick num_heads that divides d_model"
            )
        query = self._projection("query")(inputs_q)
        if cache_mode is None:
            key = self._projection("key")(inputs_kv)
            value = self._projection("value")(inputs_kv)
        else:
            key, value, mask = self._cached_keys_values(inputs_kv, mask, cache_mode)
        if not self.scale:  # the kernels divide by sqrt(d_k): undo it
            query = query * jnp.sqrt(query.shape[-1]).astype(query.dtype)
        stepping = cache_mode == "step"
        kv_axes = (("act_batch", "act_heads", "act_length", None) if stepping
                   else ("act_batch", "act_length", "act_heads", None))
        query = nn.with_logical_constraint(query, ("act_batch", "act_length", "act_heads", None))
        key = nn.with_logical_constraint(key, kv_axes)
        value = nn.with_logical_constraint(value, kv_axes)
        capture = self.is_mutable_collection("intermediates")
        # The scope names attention's own work (scores, softmax, weighted sum) in profiles.
        with jax.named_scope("attention_core"):
            if stepping:
                weights = attention_weights(query, key, mask, heads_first=True)
                if capture:
                    self.sow("intermediates", "attention_weights", weights)
                out = cached_attention(weights, value)
            elif capture or (self.dropout_rate > 0.0 and not deterministic):
                # Dropout on the attention weights, or capturing them (attention maps), needs
                # the weights, so it takes the einsum path.
                weights = attention_weights(query, key, mask)
                if capture:
                    self.sow("intermediates", "attention_weights", weights)
                weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
                out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
            else:
                out = attention_fn(self.attention)(query, key, value, mask)
        out = nn.Einsum(
            shape=(self.num_heads, self.d_model // self.num_heads, self.d_model),
            einsum_str="blhk,hkd->bld",
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.variance_scaling(
                    1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2
                ),
                ("heads", "kv", "embed"),
            ),
            use_bias=self.use_bias,
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="out",
        )(out)
        return nn.with_logical_constraint(out, ("act_batch", "act_length", "act_embed"))
