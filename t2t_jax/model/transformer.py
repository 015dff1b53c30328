"""The Transformer (paper Figure 1) read bottom to top: sub-layers, encoder, decoder, the model.

Also the decoder-only language model built from the same decoder blocks without
cross-attention.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from t2t_jax.model import attention as attn
from t2t_jax.model.embedding import (
    Embedder,
    embedding_init,
    shift_right,
    vocab_logits,
)
from t2t_jax.model.kernels import Mask
from t2t_jax.model.masks import AttentionMask
from t2t_jax.model.model_config import REMAT_POLICIES, ModelConfig
from t2t_jax.model.scan import scanned

Array = jax.Array


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
            x, _ = scanned(_EncoderBody, cfg.num_encoder_layers, broadcast=1)(
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
        the causal mask come from the cache (see MultiHeadAttention). The cache's `row_start`
        [batch] is the step at which each row's output began (0 unless a row was started later
        in a running cache): a row's position is the step count less its start.
        """
        cfg = self.config
        self_mask = AttentionMask.from_tokens(
            targets, targets, segmentation, segmentation, causal=True,
            max_segments=cfg.max_segments_per_row,
        )
        if cache_mode is not None:
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            row_start = self.variable("cache", "row_start",
                                      lambda: jnp.zeros(decoder_inputs.shape[:1], jnp.int32))
            if cache_mode == "step":
                own = position.value - row_start.value
                positions = own[:, None]
                position.value = position.value + 1
                self_mask = own  # self-attention's mask in a step: each row's position
        y = _embedder(cfg, self.embedding)(decoder_inputs, positions, deterministic)
        if cfg.scan_layers and cache_mode is not None:
            raise ValueError(
                "incremental decoding runs the unrolled layers: decode with "
                "unrolled_for_decoding(config, params)"
            )
        if cfg.scan_layers:
            y, _ = scanned(_DecoderBody, cfg.num_decoder_layers, broadcast=3)(
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


