"""`t2t-jax export --format ctranslate2`: a checkpoint as a CTranslate2 Transformer, exactly.

CTranslate2 holds the paper's model as it is here: post-LN (`pre_norm=False`) or pre-LN with
final norms, biases or none on the attention projections, our layer norm epsilon, tied or
separate embeddings, and our positional encodings exported as its `position_encodings` table
(its built-in sinusoids differ in timescale and layout; a learned table is exported as it is,
and "none" as zeros). The decoder starts from our padding id, as `shift_right` feeds it, and
the source gets EOS. The vocabulary is the tokenizer's pieces in id order, padded to
`model.vocab_size`. The export directory also holds `t2t_jax_export.json`: the tokenizer, the
source length and the step, which the CTranslate2 engine reads.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from t2t_jax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer
from t2t_jax.model.embedding import sinusoidal_encoding
from t2t_jax.model.model_config import ModelConfig
from t2t_jax.model.models import NotSupported

SETTINGS_FILE = "t2t_jax_export.json"
QUANTIZATIONS = ("float32", "int8", "int8_float32", "int16", "float16", "bfloat16")


def check_exportable(config: ModelConfig) -> None:
    """A one-line NotSupported for what CTranslate2's Transformer cannot hold."""
    if config.type == "lstm_seq2seq":
        raise NotSupported("export to CTranslate2 is not supported for lstm_seq2seq (the "
                           "recurrent baseline has no Transformer layers)")
    if config.type != "encoder_decoder":
        raise NotSupported(f"export to CTranslate2 covers the encoder-decoder; {config.type} "
                           f"is not supported yet")
    if not config.residual:
        raise NotSupported("CTranslate2's layers always add the residual: a model trained with "
                           "model.residual=False cannot be exported")


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> list[str]:
    """The tokens by id, padded to the model's (rounded-up) vocabulary with unused names."""
    pieces = tokenizer.pieces()
    return pieces + [f"<unused_{i}>" for i in range(len(pieces), vocab_size)]


def _position_table(config: ModelConfig, params: dict, side: str, rows: int) -> np.ndarray:
    if config.positional == "learned":
        return np.asarray(params[side]["embedder"]["position_embedding"], np.float32)
    if config.positional == "none":
        return np.zeros((rows, config.d_model), np.float32)
    return np.asarray(sinusoidal_encoding(np.arange(rows), config.d_model), np.float32)


def _matrix(kernel: Any) -> np.ndarray:
    """An input-major kernel ([d_in, ...] or [..., d_out]) as CTranslate2's [d_out, d_in]."""
    kernel = np.asarray(kernel, np.float32)
    return kernel.reshape(kernel.shape[0], -1).T


def _linear(spec, weights: list[np.ndarray], biases: list[np.ndarray | None]) -> None:
    spec.weight = np.concatenate(weights, axis=0)
    if biases[0] is not None:
        spec.bias = np.concatenate([np.asarray(b, np.float32).reshape(-1) for b in biases])


def _projections(attention: dict, names: tuple[str, ...]) -> tuple[list, list]:
    weights = [_matrix(attention[n]["kernel"]) for n in names]
    biases = [attention[n].get("bias") for n in names]
    return weights, biases


def _out_matrix(attention: dict) -> np.ndarray:
    kernel = np.asarray(attention["out"]["kernel"], np.float32)  # [heads, head_dim, d_model]
    return kernel.reshape(-1, kernel.shape[-1]).T


def _attention(spec, attention: dict, norm: dict, self_attention: bool, scaled: bool) -> None:
    if self_attention:
        _linear(spec.linear[0], *_projections(attention, ("query", "key", "value")))
    else:
        _linear(spec.linear[0], *_projections(attention, ("query",)))
        _linear(spec.linear[1], *_projections(attention, ("key", "value")))
    _linear(spec.linear[-1], [_out_matrix(attention)], [attention["out"].get("bias")])
    _norm(spec.layer_norm, norm)
    if not scaled:
        spec.queries_scale = np.float32(1.0)


def _norm(spec, norm: dict) -> None:
    spec.gamma = np.asarray(norm["scale"], np.float32)
    spec.beta = np.asarray(norm["bias"], np.float32)


def _ffn(spec, ffn: dict, norm: dict) -> None:
    _linear(spec.linear_0, [_matrix(ffn["wi"]["kernel"])], [ffn["wi"]["bias"]])
    _linear(spec.linear_1, [_matrix(ffn["wo"]["kernel"])], [ffn["wo"]["bias"]])
    _norm(spec.layer_norm, norm)


def transformer_spec(config: ModelConfig, params: dict, tokenizer: Tokenizer,
                     max_positions: int = 1024):
    """The CTranslate2 TransformerSpec of unrolled (not scanned) encoder-decoder params."""
    from ctranslate2.specs import transformer_spec as ct2

    check_exportable(config)
    # Writable float32 copies: CTranslate2 quantizes in place.
    params = jax.tree.map(lambda x: np.array(x, np.float32), params)
    pre_norm = config.norm == "pre"
    spec = ct2.TransformerSpec.from_config(
        (config.num_encoder_layers, config.num_decoder_layers), config.num_heads,
        pre_norm=pre_norm)
    scaled = config.scale_attention
    rows = max(max_positions, config.max_positions)
    encoder, decoder = params["encoder"], params["decoder"]
    for layer_spec, n in zip(spec.encoder.layer, range(config.num_encoder_layers), strict=True):
        layer = encoder[f"layer_{n}"]
        _attention(layer_spec.self_attention, layer["self_attention"],
                   layer["attention_block"]["norm"], True, scaled)
        _ffn(layer_spec.ffn, layer["ffn"], layer["ffn_block"]["norm"])
    for layer_spec, n in zip(spec.decoder.layer, range(config.num_decoder_layers), strict=True):
        layer = decoder[f"layer_{n}"]
        _attention(layer_spec.self_attention, layer["self_attention"],
                   layer["self_attention_block"]["norm"], True, scaled)
        _attention(layer_spec.attention, layer["cross_attention"],
                   layer["cross_attention_block"]["norm"], False, scaled)
        _ffn(layer_spec.ffn, layer["ffn"], layer["ffn_block"]["norm"])
    if pre_norm:
        _norm(spec.encoder.layer_norm, encoder["final_norm"])
        _norm(spec.decoder.layer_norm, decoder["final_norm"])
    if config.share_embeddings:  # one array: CTranslate2 stores it once
        source = target = np.asarray(params["shared_embedding"]["embedding"], np.float32)
        projection = target
    else:
        source = np.asarray(params["source_embedding"]["embedding"], np.float32)
        target = np.asarray(params["target_embedding"]["embedding"], np.float32)
        projection = np.asarray(decoder["logits"]["kernel"], np.float32).T
    spec.encoder.embeddings[0].weight = source
    spec.decoder.embeddings.weight = target
    spec.decoder.projection.weight = projection
    spec.encoder.position_encodings.encodings = _position_table(config, params, "encoder", rows)
    spec.decoder.position_encodings.encodings = _position_table(config, params, "decoder", rows)
    tokens = vocabulary(tokenizer, config.vocab_size)
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    spec.config.layer_norm_epsilon = config.layer_norm_epsilon
    spec.config.unk_token = tokens[UNK_ID]
    spec.config.eos_token = tokens[EOS_ID]
    spec.config.bos_token = spec.config.decoder_start_token = tokens[PAD_ID]
    spec.config.add_source_eos = True
    return spec


def export_ctranslate2(config: ModelConfig, params: dict, tokenizer: Tokenizer, output: str,
                       settings: dict, quantization: str = "float32", force: bool = False
                       ) -> str:
    """Writes the CTranslate2 model, its vocabulary and our settings to `output`, atomically
    (a directory beside it, renamed when complete): a killed export leaves no half model."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got "
                         f"{quantization!r}")
    if os.path.exists(output) and not force:
        raise ValueError(f"{output} exists; pass --force to replace it, or another --output")
    spec = transformer_spec(config, params, tokenizer, settings.get("max_positions", 1024))
    spec.validate()
    spec.optimize(quantization=None if quantization == "float32" else quantization)
    partial = f"{output.rstrip('/')}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    spec.save(partial)
    with open(os.path.join(partial, SETTINGS_FILE), "w") as f:
        json.dump({**settings, "quantization": quantization,
                   "tokenizer": tokenizer.to_json()}, f, indent=1)
    if os.path.exists(output):
        shutil.rmtree(output)
    os.rename(partial, output)
    return output
