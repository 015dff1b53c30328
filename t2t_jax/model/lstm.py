"""The recurrent baseline the paper replaced: an LSTM encoder-decoder with dot-product attention
(Luong et al. 2015), for the guide's comparison (docs/paper_guide.md, questions 1, 5 and 10).

It takes the same batches and returns logits like the Transformer, so the same train step trains
it; it has no incremental decoder (training and teacher-forced evaluation only).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from t2t_jax.model.embedding import shift_right

Array = jax.Array


class LSTMSeq2Seq(nn.Module):
    """Embeddings, `num_encoder_layers` LSTM layers over the source, `num_decoder_layers` over
    the shifted target starting from the encoder's final states, then attention of each decoder
    state over the encoder outputs and a softmax over [state; context]. Hidden size d_model.

    Each layer's h_t = f(h_{t-1}, x_t): the time steps run one after another (`nn.RNN` scans
    them), which is what the Transformer's attention removes.
    """

    config: Any  # a ModelConfig: vocab_size, d_model, num_encoder_layers, num_decoder_layers

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        targets: Array,
        deterministic: bool = True,
        **unused_features: Any,
    ) -> Array:
        """inputs [batch, src_len], targets [batch, tgt_len] ids (0 = padding) -> logits
        [batch, tgt_len, vocab] in float32."""
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, name="embedding")
        source_lengths = jnp.sum(inputs > 0, axis=1)
        x = embed(inputs)
        carries = []
        for i in range(cfg.num_encoder_layers):
            carry, x = nn.RNN(nn.OptimizedLSTMCell(cfg.d_model), return_carry=True,
                              name=f"encoder_{i}")(x, seq_lengths=source_lengths)
            carries.append(carry)
        encoded = x
        y = embed(shift_right(targets))
        for i in range(cfg.num_decoder_layers):
            start = carries[min(i, len(carries) - 1)]
            y = nn.RNN(nn.OptimizedLSTMCell(cfg.d_model), name=f"decoder_{i}")(
                y, initial_carry=start
            )
        scores = jnp.einsum("btd,bsd->bts", y, encoded) / jnp.sqrt(cfg.d_model)
        scores = jnp.where((inputs > 0)[:, None, :], scores, jnp.finfo(jnp.float32).min)
        context = jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, axis=-1), encoded)
        hidden = jnp.tanh(nn.Dense(cfg.d_model, name="combine")(
            jnp.concatenate([y, context], axis=-1)))
        return nn.Dense(cfg.vocab_size, name="logits")(hidden).astype(jnp.float32)
