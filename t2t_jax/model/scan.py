"""Layers scanned instead of unrolled (`model.scan_layers`): one layer's code applied N times by
`nn.scan` over params stacked on a "layers" axis, so that compile time does not grow with depth;
and the unstacking that incremental decoding (which runs unrolled layers) needs."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import linen as nn

from t2t_jax.model.model_config import ModelConfig


def scanned(body: type[nn.Module], length: int, broadcast: int) -> type[nn.Module]:
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
