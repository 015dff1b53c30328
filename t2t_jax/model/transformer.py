"""The Transformer (paper Figure 1) read bottom to top: sub-layers, encoder, decoder, the model.

Also the decoder-only language model built from the same decoder blocks without
cross-attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from t2t_jax.model import attention as attn
from t2t_jax.model.attention import Mask
from t2t_jax.model.embedding import (
    POSITIONAL_ENCODINGS,
    Embedder,
    embedding_init,
    shift_right,
    vocab_logits,
)
from t2t_jax.model.masks import AttentionMask

Array = jax.Array

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
    attention: str = "xla"  # one of attention.ATTENTION_IMPLEMENTATIONS
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
                self.attention in attn.ATTENTION_IMPLEMENTATIONS,
                f"model.attention must be one of {attn.ATTENTION_IMPLEMENTATIONS}",
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


def layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        dtype=config.compute_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (section 3.3)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        init = nn.initializers.xavier_uniform()
        h = nn.Dense(
            cfg.d_ff,
            dtype=cfg.compute_dtype,
            kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            name="wi",
        )(x)
        h = nn.with_logical_constraint(nn.relu(h), ("act_batch", "act_length", "act_mlp"))
        h = nn.Dropout(cfg.relu_dropout_rate)(h, deterministic=deterministic)
        return nn.Dense(
            cfg.d_model,
            dtype=cfg.compute_dtype,
            kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="wo",
        )(h)


class Residual(nn.Module):
    """One sub-layer with its residual connection, dropout and layer norm.

    post-LN (paper): LayerNorm(x + Dropout(Sublayer(x))); pre-LN: x + Dropout(Sublayer(LN(x))).
    Without `config.residual` (the guide's experiment) the "x +" is dropped.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, sublayer, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        if not cfg.residual:
            if cfg.norm == "pre":
                return dropout(sublayer(layer_norm(cfg, "norm")(x)), deterministic=deterministic)
            return layer_norm(cfg, "norm")(dropout(sublayer(x), deterministic=deterministic))
        if cfg.norm == "pre":
            return x + dropout(sublayer(layer_norm(cfg, "norm")(x)), deterministic=deterministic)
        return layer_norm(cfg, "norm")(x + dropout(sublayer(x), deterministic=deterministic))


def _rematerialised(layer: type[nn.Module], config: ModelConfig, static_argnums: tuple):
    """`layer`, recomputed in the backward pass as `model.remat` says (trading compute for
    activation memory); parameter names do not change."""
    if config.remat == "none":
        return layer
    return nn.remat(layer, policy=REMAT_POLICIES[config.remat], static_argnums=static_argnums)


def _embedder(config: ModelConfig, embedding: nn.Module) -> Embedder:
    return Embedder(
        embedding, config.d_model, config.dropout_rate, config.compute_dtype,
        config.positional, config.max_positions, name="embedder",
    )


def _attention(config: ModelConfig, name: str, kind: str = "self") -> attn.MultiHeadAttention:
    return attn.MultiHeadAttention(
        num_heads=config.num_heads,
        d_model=config.d_model,
        attention=config.attention,
        dropout_rate=config.attention_dropout_rate,
        dtype=config.compute_dtype,
        kind=kind,
        scale=config.scale_attention,
        use_bias=config.attention_bias,
        name=name,
    )


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each wrapped in `Residual`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, mask: Mask, deterministic: bool) -> Array:
        self_attention = _attention(self.config, "self_attention")
        x = Residual(self.config, name="attention_block")(
            lambda y: self_attention(y, y, mask, deterministic), x, deterministic
        )
        ffn = FeedForward(self.config, name="ffn")
        return Residual(self.config, name="ffn_block")(
            lambda y: ffn(y, deterministic), x, deterministic
        )


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention (skipped when `encoded` is None), FFN."""

    config: ModelConfig
    cross_attention: bool = True

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array | None,
        self_mask: Mask,
        cross_mask: Mask,
        deterministic: bool,
        cache_mode: str | None = None,
    ) -> Array:
        cfg = self.config
        self_attention = _attention(cfg, "self_attention")
        x = Residual(cfg, name="self_attention_block")(
            lambda y: self_attention(y, y, self_mask, deterministic, cache_mode), x, deterministic
        )
        if self.cross_attention:
            cross_attention = _attention(cfg, "cross_attention", kind="cross")
            x = Residual(cfg, name="cross_attention_block")(
                lambda y: cross_attention(y, encoded, cross_mask, deterministic, cache_mode),
                x,
                deterministic,
            )
        ffn = FeedForward(cfg, name="ffn")
        return Residual(cfg, name="ffn_block")(lambda y: ffn(y, deterministic), x, deterministic)


class OutputKernel(nn.Module):
    """The pre-softmax weights [d_model, vocab] when they are not shared with the embeddings
    (named as the `nn.Dense` kernel they replace, so checkpoints keep their layout)."""

    config: ModelConfig

    @nn.compact
    def __call__(self) -> Array:
        cfg = self.config
        return self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.d_model**-0.5), ("embed", "vocab")
            ),
            (cfg.d_model, cfg.vocab_size),
        )


class _EncoderBody(nn.Module):
    """One encoder layer as a scan body: (x, mask) -> (x, None)."""

    config: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x: Array, mask: Mask) -> tuple[Array, None]:
        layer = _rematerialised(EncoderLayer, self.config, static_argnums=(3,))
        return layer(self.config, name="layer")(x, mask, self.deterministic), None


class _DecoderBody(nn.Module):
    """One decoder layer as a scan body: (y, encoded, self_mask, cross_mask) -> (y, None)."""

    config: ModelConfig
    cross_attention: bool
    deterministic: bool

    @nn.compact
    def __call__(self, y, encoded, self_mask, cross_mask) -> tuple[Array, None]:
        layer = _rematerialised(DecoderLayer, self.config, (5, 6))
        y = layer(self.config, self.cross_attention, name="layer")(
            y, encoded, self_mask, cross_mask, self.deterministic, None
        )
        return y, None


def _scanned(body: type[nn.Module], length: int, broadcast: int) -> type[nn.Module]:
    """`body` applied `length` times by `nn.scan`, its params stacked on a leading "layers"
    axis (replicated by the sharding rules), each layer with its own params and dropout rng;
    the `broadcast` arguments after the carry are the same for every layer."""
    return nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * broadcast,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def unstack_layers(params: Any) -> Any:
    """Params of a `scan_layers` model -> the same params as the unrolled model names them
    (`layers/layer/...` with a leading layer axis -> `layer_0/...`, `layer_1/...`)."""
    if not isinstance(params, dict):
        return params
    out = {}
    for name, child in params.items():
        if name == "layers" and isinstance(child, dict) and set(child) == {"layer"}:
            stacked = child["layer"]
            count = jax.tree.leaves(stacked)[0].shape[0]
            for i in range(count):
                out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
        else:
            out[name] = unstack_layers(child)
    return out


def unrolled_for_decoding(config: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """(config, params) for incremental decoding, which runs the unrolled layers: unchanged
    unless the model was trained with `scan_layers`."""
    if not config.scan_layers:
        return config, params
    return dataclasses.replace(config, scan_layers=False), unstack_layers(params)


class Encoder(nn.Module):
    """Embedding + positions, N encoder layers (and a final LayerNorm under pre-LN)."""

    config: ModelConfig
    embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        positions: Array | None,
        segmentation: Array | None,
        deterministic: bool,
    ) -> Array:
        """inputs: [batch, src_len] ids (0 = padding) -> [batch, src_len, d_model]."""
        cfg = self.config
        mask = AttentionMask.from_tokens(
            inputs, inputs, segmentation, segmentation, max_segments=cfg.max_segments_per_row
        )
        x = _embedder(cfg, self.embedding)(inputs, positions, deterministic)
        if cfg.scan_layers:
            x, _ = _scanned(_EncoderBody, cfg.num_encoder_layers, broadcast=1)(
                cfg, deterministic, name="layers"
            )(x, mask)
        else:
            layer = _rematerialised(EncoderLayer, cfg, static_argnums=(3,))  # 3: deterministic
            for i in range(cfg.num_encoder_layers):
                x = layer(cfg, name=f"layer_{i}")(x, mask, deterministic)
        if cfg.norm == "pre":
            x = layer_norm(cfg, "final_norm")(x)
        return x


class Decoder(nn.Module):
    """Embedding + positions, N decoder layers, then the pre-softmax projection to logits."""

    config: ModelConfig
    embedding: nn.Module
    cross_attention: bool = True

    @nn.compact
    def __call__(
        self,
        decoder_inputs: Array,
        targets: Array,
        encoded: Array | None,
        cross_mask: Mask,
        positions: Array | None,
        segmentation: Array | None,
        deterministic: bool,
        cache_mode: str | None = None,
    ) -> Array:
        """decoder_inputs: [batch, tgt_len] (targets shifted right); targets: [batch, tgt_len]
        (0 = padding) -> logits [batch, tgt_len, vocab] in float32.

        cache_mode "step": decoder_inputs is the one previous token [batch, 1]; its position and
        the causal mask come from the cache (see MultiHeadAttention).
        """
        cfg = self.config
        self_mask = AttentionMask.from_tokens(
            targets, targets, segmentation, segmentation, causal=True,
            max_segments=cfg.max_segments_per_row,
        )
        if cache_mode is not None:
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if cache_mode == "step":
                positions = jnp.full(decoder_inputs.shape, position.value)
                position.value = position.value + 1
                self_mask = None
        y = _embedder(cfg, self.embedding)(decoder_inputs, positions, deterministic)
        if cfg.scan_layers and cache_mode is not None:
            raise ValueError(
                "incremental decoding runs the unrolled layers: decode with "
                "unrolled_for_decoding(config, params)"
            )
        if cfg.scan_layers:
            y, _ = _scanned(_DecoderBody, cfg.num_decoder_layers, broadcast=3)(
                cfg, self.cross_attention, deterministic, name="layers"
            )(y, encoded, self_mask, cross_mask)
        else:
            # Incremental decoding has no backward pass: no remat there (nor cache inside it).
            layer = DecoderLayer if cache_mode else _rematerialised(DecoderLayer, cfg, (5, 6))
            for i in range(cfg.num_decoder_layers):
                y = layer(cfg, self.cross_attention, name=f"layer_{i}")(
                    y, encoded, self_mask, cross_mask, deterministic, cache_mode
                )
        if cfg.norm == "pre":
            y = layer_norm(cfg, "final_norm")(y)
        if cfg.share_embeddings:
            table = nn.meta.unbox(self.embedding.variables["params"]["embedding"])
        else:
            table = OutputKernel(cfg, name="logits")().T
        logits = vocab_logits(y, table, cfg.compute_dtype)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
        return logits.astype(jnp.float32)


def _embedding(config: ModelConfig, name: str) -> nn.Embed:
    return nn.Embed(
        num_embeddings=config.vocab_size,
        features=config.d_model,
        dtype=config.compute_dtype,
        embedding_init=embedding_init(config.d_model),
        name=name,
    )


class Transformer(nn.Module):
    """The encoder-decoder model; `encode` and `decode` are exposed for decoding."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        if cfg.share_embeddings:
            source = target = _embedding(cfg, "shared_embedding")
        else:
            source = _embedding(cfg, "source_embedding")
            target = _embedding(cfg, "target_embedding")
        self.encoder = Encoder(cfg, source)
        self.decoder = Decoder(cfg, target)

    def encode(
        self,
        inputs: Array,
        inputs_positions: Array | None = None,
        inputs_segmentation: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """[batch, src_len] ids -> encoder output [batch, src_len, d_model]."""
        return self.encoder(inputs, inputs_positions, inputs_segmentation, deterministic)

    def decode(
        self,
        encoded: Array,
        inputs: Array,
        targets: Array,
        targets_positions: Array | None = None,
        inputs_segmentation: Array | None = None,
        targets_segmentation: Array | None = None,
        deterministic: bool = True,
        cache_mode: str | None = None,
    ) -> Array:
        """Teacher-forced decoder: logits [batch, tgt_len, vocab] for predicting `targets`.

        Incremental decoding: cache_mode "init" with a full-length dummy `targets` creates the
        cache (apply with mutable=["cache"]); then each "step" call takes `targets` = the last
        token [batch, 1] (0 at the start) and returns the next token's logits [batch, 1, vocab].
        """
        if cache_mode == "step":
            cross_mask = (inputs > 0)[:, None, None, :]
            decoder_inputs = targets
        else:
            cross_mask = AttentionMask.from_tokens(
                targets, inputs, targets_segmentation, inputs_segmentation,
                max_segments=self.config.max_segments_per_row,
            )
            decoder_inputs = shift_right(targets, targets_segmentation)
        return self.decoder(
            decoder_inputs,
            targets,
            encoded,
            cross_mask,
            targets_positions,
            targets_segmentation,
            deterministic,
            cache_mode,
        )

    def __call__(
        self,
        inputs: Array,
        targets: Array,
        inputs_positions: Array | None = None,
        targets_positions: Array | None = None,
        inputs_segmentation: Array | None = None,
        targets_segmentation: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """inputs: [batch, src_len], targets: [batch, tgt_len] -> logits [b, tgt_len, vocab]."""
        encoded = self.encode(inputs, inputs_positions, inputs_segmentation, deterministic)
        return self.decode(
            encoded,
            inputs,
            targets,
            targets_positions,
            inputs_segmentation,
            targets_segmentation,
            deterministic,
        )


class DecoderOnlyLM(nn.Module):
    """A language model of the decoder's blocks without cross-attention (tied in/out weights)."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        targets: Array,
        targets_positions: Array | None = None,
        targets_segmentation: Array | None = None,
        deterministic: bool = True,
        cache_mode: str | None = None,
        **unused_encoder_features: Any,
    ) -> Array:
        """targets: [batch, length] ids (0 = padding) -> next-token logits [b, length, vocab].

        Incremental decoding: cache_mode "init" with a full-length dummy `targets` creates the
        cache (apply with mutable=["cache"]); then each "step" call takes `targets` = the last
        token [batch, 1] (0 at the start) and returns the next token's logits [batch, 1, vocab].
        """
        embedding = _embedding(self.config, "shared_embedding")
        decoder = Decoder(self.config, embedding, cross_attention=False, name="decoder")
        step = cache_mode == "step"
        return decoder(
            targets if step else shift_right(targets, targets_segmentation),
            targets,
            None,
            None,
            targets_positions,
            targets_segmentation,
            deterministic,
            cache_mode,
        )


