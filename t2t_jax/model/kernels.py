"""Scaled dot-product attention kernels (paper section 3.2.1) and the choice among them: the
einsum path, `jax.nn.dot_product_attention`, cuDNN's fused kernel (dense masks or packed spans),
the Pallas splash kernel on TPU and blockwise flash attention in plain JAX; `select_attention`
picks one per platform and dtype, and each forced kernel falls back to einsum, logged, where it
cannot run. `MultiHeadAttention` (attention.py) calls them by name."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from t2t_jax.model.flash import flash_attention
from t2t_jax.model.masks import AttentionMask, as_dense, segment_spans
from t2t_jax.model.splash import splash_attention
from t2t_jax.runtime import chips

Array = jax.Array


# "auto" picks per platform (`select_attention`); the others name one implementation.
ATTENTION_IMPLEMENTATIONS = (
    "auto", "xla", "dot_product_attention", "cudnn", "splash", "blockwise", "xla_or_blockwise",
)


# Below this many keys the einsum path is as fast as the blockwise kernel on CPU, and the model
# trains faster with it (docs/benchmarks.md); from here on blockwise wins and keeps memory flat.
BLOCKWISE_FROM_KEYS = 256


# Masks travel through the model as `AttentionMask` (segment ids and a causal flag, linear in
# length); incremental decoding passes small dense arrays. Kernels take either.
Mask = AttentionMask | Array | None


def attention_weights(query: Array, key: Array, mask: Mask, heads_first: bool = False
                      ) -> Array:
    """softmax(Q K^T / sqrt(d_k)) in float32: [batch, heads, q_len, k_len].

    query: [batch, q_len, heads, d_k]; key: [batch, k_len, heads, d_k] ([batch, heads, k_len,
    d_k] with `heads_first`, the decoding cache's layout); mask: an `AttentionMask`, or boolean
    broadcastable to [batch, heads, q_len, k_len], False where attention is blocked.
    """
    mask = as_dense(mask)
    depth = query.shape[-1]
    query = query / jnp.sqrt(depth).astype(query.dtype)
    # The softmax runs in float32 even under bf16 compute: exp of bf16 logits loses too much.
    keys = "bhkd" if heads_first else "bkhd"
    logits = jnp.einsum(f"bqhd,{keys}->bhqk", query, key).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def xla_attention(query: Array, key: Array, value: Array, mask: Mask) -> Array:
    """Attention(Q, K, V) as einsums for XLA: [batch, q_len, heads, d_k] in query's dtype."""
    weights = attention_weights(query, key, mask).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def cached_attention(weights: Array, value: Array) -> Array:
    """The weighted sum of one decoding step: weights [batch, heads, q_len, k_len] over the
    cache's values [batch, heads, k_len, d_k] -> [batch, q_len, heads, d_k] in value's dtype.

    The cache keeps heads before positions because a dot over [batch, length, heads, d_k]
    batches over (batch, heads) only after transposing its operand: a copy of the whole cache
    at every step, which was most of a CPU decoding step at 32 rows."""
    return jnp.einsum("bhqk,bhkd->bqhd", weights.astype(value.dtype), value)


def _jax_dot_product_attention(
    query: Array, key: Array, value: Array, mask: Mask, implementation: str | None
) -> Array:
    """`jax.nn.dot_product_attention` given the mask as a causal flag and sequence lengths where
    it can be (unpacked rows), which the cuDNN kernel applies without a [q_len, k_len] array."""
    if isinstance(mask, AttentionMask) and not mask.packed:
        query_lengths, key_lengths = mask.lengths()
        return jax.nn.dot_product_attention(
            query, key, value, is_causal=mask.causal, query_seq_lengths=query_lengths,
            key_value_seq_lengths=key_lengths, implementation=implementation,
        )
    if isinstance(mask, AttentionMask) and implementation == "cudnn":
        reason = cudnn_spans_unsupported() if mask.max_segments else (
            "model.max_segments_per_row is 0 (set it to the most examples a row holds)"
        )
        if reason is None:
            return cudnn_packed_attention(query, key, value, mask)
        _log_dense_mask_once(reason)
    mask = as_dense(mask)
    if mask is not None:
        mask = jnp.broadcast_to(
            mask, (query.shape[0], mask.shape[1], query.shape[1], key.shape[1])
        )
    return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                        implementation=implementation)


# cuDNN's packed layout arrived in cuDNN 9.6 (JAX's own tests skip it below) for Hopper GPUs.
CUDNN_SPANS_MIN_VERSION = 90600


def cudnn_version() -> int | None:
    """The version of the cuDNN library JAX loads (e.g. 91000 for 9.10), or None without one."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha

        return cudnn_fmha.check_cudnn_version()
    except (ImportError, AttributeError, RuntimeError):
        return None


def _compute_capability() -> tuple[int, int] | None:
    """The compute capability of the GPU being compiled for: a known GPU of the current mesh's
    kind (which may be only described, for ahead-of-time compilation), else the local GPU's.
    Read while tracing, where only the abstract mesh is at hand."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    chip = chips.chip_of(device.device_kind) if device is not None else None
    if chip is not None and chip.gpu is not None:
        return chip.gpu.compute_capability
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return None if capability is None else tuple(int(x) for x in capability.split(".")[:2])


def cudnn_spans_unsupported() -> str | None:
    """Why cuDNN cannot take packed rows as spans here (then it gets the dense mask), or None."""
    version = cudnn_version()
    if version is None:
        return "this JAX offers no cuDNN packed layout, or no cuDNN library was found"
    if version < CUDNN_SPANS_MIN_VERSION:
        return f"cuDNN {version} predates the packed layout (cuDNN 9.6)"
    capability = _compute_capability()
    if capability is None or capability < (9, 0):
        return f"the packed layout needs a Hopper GPU or later (compute capability {capability})"
    return None


def cudnn_packed_attention(
    query: Array, key: Array, value: Array, mask: AttentionMask
) -> Array:
    """cuDNN's fused kernel on packed rows given as spans (each example's offset and length,
    `segment_spans`) rather than a dense [q_len, k_len] mask: cuDNN's packed ("THD") layout.
    Example k of a query row attends to example k of its key row, causally within the example
    if the mask is causal; so every example must have tokens on both sides (the encoder's and
    decoder's rows are packed together, and each side ends with EOS). `jax.nn.dot_product_attention`
    does not expose spans (JAX 0.10), so this calls the cuDNN module behind it."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha

    spans = [segment_spans(s, mask.max_segments) for s in (mask.query_segments, mask.key_segments)]
    # cuDNN pairs row i's spans with row i's tokens on each shard: shard them like the batch.
    (query_lengths, query_offsets), (key_lengths, key_offsets) = (
        tuple(nn.with_logical_constraint(x, ("act_batch", None)) for x in side) for side in spans
    )
    mask_type = cudnn_fmha.MaskType.PADDING_CAUSAL if mask.causal else cudnn_fmha.MaskType.PADDING
    # Positions outside every span (a row's padding, or examples past max_segments, which the
    # packer never makes) are not the kernel's to write: whatever it leaves there, forward or
    # backward, is cut off here before it reaches the loss or the weights.
    def in_spans(segments: Array) -> Array:
        return ((segments > 0) & (segments <= mask.max_segments))[:, :, None, None]

    real_queries, real_keys = in_spans(mask.query_segments), in_spans(mask.key_segments)
    out = cudnn_fmha.dot_product_attention(
        jnp.where(real_queries, query, 0), jnp.where(real_keys, key, 0),
        jnp.where(real_keys, value, 0), q_seqlen=query_lengths, kv_seqlen=key_lengths,
        q_offsets=query_offsets, kv_offsets=key_offsets,
        scale=1.0 / float(query.shape[-1]) ** 0.5, mask_type=mask_type,
    )
    return jnp.where(real_queries, out, 0)


def fused_attention(query: Array, key: Array, value: Array, mask: Mask) -> Array:
    """`jax.nn.dot_product_attention` with JAX's default implementation (XLA in JAX 0.10)."""
    return _jax_dot_product_attention(query, key, value, mask, None)


def current_platform() -> str:
    """The platform the computation being traced is for: that of the mesh made current by
    `jax.set_mesh` (`sharding.activate`), which may be a TPU topology compiled for ahead of time
    on a CPU machine, else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def cudnn_unsupported(query: Array, key: Array, platform: str) -> str | None:
    """Why cuDNN's fused flash attention cannot run these shapes here, or None if it can."""
    if platform != "gpu":
        return f"cuDNN flash attention needs an NVIDIA GPU, this is {platform}"
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bfloat16 or float16, got {query.dtype}"
    depth = query.shape[-1]
    if depth % 8 or depth > 128:
        return f"cuDNN flash attention needs d_k a multiple of 8 up to 128, got {depth}"
    if query.shape[1] == 1:
        return "one query position (incremental decoding) gains nothing from the fused kernel"
    return None


def cudnn_attention(query: Array, key: Array, value: Array, mask: Mask) -> Array:
    """`jax.nn.dot_product_attention` forced onto cuDNN's fused (flash) kernel, which never
    materialises the [q_len, k_len] weights; falls back to `xla_attention`, with the reason
    logged, for shapes, dtypes or platforms the kernel does not take."""
    reason = cudnn_unsupported(query, key, current_platform())
    if reason:
        _log_fallback_once("cudnn", reason)
        return xla_attention(query, key, value, mask)
    return _jax_dot_product_attention(query, key, value, mask, "cudnn")


def splash_unsupported(query: Array, mask: Mask, platform: str) -> str | None:
    """Why the Pallas splash kernel cannot run here, or None if it can."""
    if platform != "tpu":
        return f"the Pallas splash kernel is for TPU, this is {platform}"
    if query.shape[1] == 1:
        return "one query position (incremental decoding) gains nothing from the kernel"
    if not isinstance(mask, AttentionMask):
        return "a dense mask array (incremental decoding) is not a splash mask"
    return None


def splash_tpu_attention(query: Array, key: Array, value: Array, mask: Mask) -> Array:
    """The Pallas splash kernel (`model.splash`) on TPU; elsewhere, or for incremental decoding,
    the XLA einsum path with the reason logged."""
    reason = splash_unsupported(query, mask, current_platform())
    if reason:
        _log_fallback_once("splash", reason)
        return xla_attention(query, key, value, mask)
    return splash_attention(query, key, value, mask)


def blockwise_attention(query: Array, key: Array, value: Array, mask: Mask) -> Array:
    """Flash attention in plain JAX (`model.flash`): linear memory on every backend. Dense mask
    arrays (incremental decoding, one query position) take the einsum path."""
    if mask is None:
        ones = jnp.ones(query.shape[:2], jnp.int32), jnp.ones(key.shape[:2], jnp.int32)
        mask = AttentionMask.from_tokens(*ones)
    if not isinstance(mask, AttentionMask):
        return xla_attention(query, key, value, mask)
    return flash_attention(query, key, value, mask)


@functools.cache
def _log_fallback_once(kernel: str, reason: str) -> None:
    logging.warning("model.attention=%s: %s; using the XLA einsum path", kernel, reason)


@functools.cache
def _log_dense_mask_once(reason: str) -> None:
    logging.warning("model.attention=cudnn: packed rows go to cuDNN as a dense [q_len, k_len] "
                    "mask (quadratic memory), not as spans: %s", reason)


def fallback_reason(
    implementation: str, query: Array, key: Array, mask: Mask, platform: str
) -> str | None:
    """Why `implementation` would hand these inputs to the einsum path on `platform`, or None
    when its own kernel runs (the question `t2t-jax check-attention` reports on)."""
    if implementation == "cudnn":
        return cudnn_unsupported(query, key, platform)
    if implementation == "splash":
        return splash_unsupported(query, mask, platform)
    if implementation == "xla_or_blockwise" and key.shape[1] < BLOCKWISE_FROM_KEYS:
        return f"fewer than {BLOCKWISE_FROM_KEYS} keys"
    dense = mask is not None and not isinstance(mask, AttentionMask)
    if implementation in ("blockwise", "xla_or_blockwise") and dense:
        return "a dense mask array (incremental decoding) is not a blockwise mask"
    return None


def xla_or_blockwise_attention(query: Array, key: Array, value: Array, mask: Mask) -> Array:
    """CPU's `auto`: the einsum path for fewer than `BLOCKWISE_FROM_KEYS` keys, the blockwise
    kernel from there on (shapes are static: the choice costs nothing per step)."""
    if key.shape[1] < BLOCKWISE_FROM_KEYS:
        return xla_attention(query, key, value, mask)
    return blockwise_attention(query, key, value, mask)


def select_attention(requested: str, platform: str, dtype: str) -> tuple[str, str]:
    """(implementation, why) for `model.attention` on `platform` with compute `dtype`.

    "auto": on GPU with bfloat16/float16 the cuDNN flash kernel, on TPU the Pallas splash
    kernel (both fall back per call for shapes they do not take), on GPU with float32 the XLA
    einsum path, and on CPU einsum below 256 keys and the blockwise kernel from there on, which
    measured 1.2-2.4x faster than einsum from 256 to 4096 with linear memory but makes short
    sequences' training slower (docs/benchmarks.md). An explicit choice is kept.
    """
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown model.attention {requested!r}; set --config.model.attention to one of "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if requested != "auto":
        return requested, "as configured"
    if platform == "gpu" and dtype in ("bfloat16", "float16"):
        return "cudnn", f"auto: {dtype} on GPU"
    if platform == "gpu":
        return "xla", f"auto: cuDNN flash attention needs bfloat16 or float16, not {dtype}"
    if platform == "tpu":
        return "splash", "auto: TPU"
    if platform == "cpu":
        return "xla_or_blockwise", f"auto: CPU, blockwise from {BLOCKWISE_FROM_KEYS} keys"
    return "xla", f"auto: {platform}"


# The kernel behind each implementation name (tests swap in the interpreted splash kernel).
KERNELS: dict[str, Callable[[Array, Array, Array, Mask], Array]] = {
    "xla": xla_attention,
    "dot_product_attention": fused_attention,
    "cudnn": cudnn_attention,
    "splash": splash_tpu_attention,
    "blockwise": blockwise_attention,
    "xla_or_blockwise": xla_or_blockwise_attention,
}


def attention_fn(name: str) -> Callable[[Array, Array, Array, Mask], Array]:
    """The attention kernel called `name` ("auto" resolved to this platform's choice)."""
    if name == "auto":
        name = select_attention(name, current_platform(), "float32")[0]
    if name not in KERNELS:
        select_attention(name, "", "")  # raises naming the choices
    return KERNELS[name]
