"""What a config builds, before anything runs: parameters per module, mesh, batch, memory.

Memory is an estimate per device. Parameters, gradients and Adam's two moments are exact byte
counts of their shards. Activations saved for the backward pass follow Korthikanti et al. (2022),
"Reducing Activation Recomputation in Large Transformer Models", eq. 1 without parallelism:
a layer keeps s*b*h*(34 + 5*a*s/h) bytes at 16 bits (s length, b batch per device, h d_model,
a heads), doubled for float32; a decoder layer adds its cross-attention to m source positions,
s*b*(11*h + 5*a*m);
the logits and their softmax add 2*s*b*V values.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import jax
import ml_collections
from flax import linen as nn

from t2t_jax import sharding
from t2t_jax.data import tasks
from t2t_jax.model import ModelConfig, build_model
from t2t_jax.model.models import NotSupported, model_type
from t2t_jax.optimizer import make_optimizer
from t2t_jax.train_step import init_boxed_params


def parameter_counts(boxed_params: Any) -> dict[str, int]:
    """Parameter count per module path prefix: top-level modules and their direct children."""
    counts: dict[str, int] = collections.OrderedDict()
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed_params))[0]
    for path, leaf in flat:
        names = [str(getattr(k, "key", k)) for k in path]
        size = math.prod(leaf.shape)
        for depth in (1, 2):
            if len(names) > depth:
                key = "/".join(names[:depth])
                counts[key] = counts.get(key, 0) + size
    return counts


def activation_bytes(config: ModelConfig, batch_per_device: int,
                     lengths: dict[str, int]) -> int | None:
    """Estimated activation bytes kept for the backward pass on one device (see module doc);
    None for a model type without an estimate."""
    try:
        layers = model_type(config).activation_bytes(lengths, batch_per_device)
    except NotSupported:
        return None
    per_value = 2 if config.dtype == "bfloat16" else 4
    total = layers * per_value / 2  # the formula counts bytes at 16 bits
    total += 2 * lengths["targets"] * batch_per_device * config.vocab_size * 4  # f32 logits
    return int(total)


def describe(config: ml_collections.ConfigDict) -> list[str]:
    """Lines of the `t2t-jax info` report; the last is `total parameters: N`."""
    model_config = ModelConfig.from_config(config.model, tasks.expected_vocab_size(config))
    model = build_model(model_config)
    lengths = model_type(model_config).feature_lengths(config.data.max_source_length,
                                                       config.data.max_target_length)
    boxed = jax.eval_shape(lambda: init_boxed_params(model, jax.random.key(0), lengths))
    mesh = sharding.make_mesh(config.mesh)
    shardings = sharding.logical_to_sharding(boxed, mesh)
    params = nn.meta.unbox(boxed)
    total = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    param_bytes = sum(
        math.prod(s.shard_shape(p.shape)) * p.dtype.itemsize
        for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True)
    )
    opt_state = jax.eval_shape(make_optimizer(config.train, model_config.d_model).init, params)
    moments = sum(math.prod(x.shape) for x in jax.tree.leaves(opt_state)) / max(total, 1)
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    per_device = config.data.batch_size / batch_ways
    activations = activation_bytes(model_config, math.ceil(per_device), lengths)

    lines = [f"model: {model_config.type}, vocab {model_config.vocab_size}", "parameters:"]
    lines += [f"  {name:<40s}{count:>14,d}" for name, count in parameter_counts(boxed).items()]
    lines += [
        "mesh: " + ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
        + f" ({mesh.devices.size} {jax.devices()[0].platform} devices)",
        f"batch: {config.data.batch_size} global, {per_device:g} per device "
        f"(sequences of {', '.join(f'{k} {v}' for k, v in lengths.items())})",
        "estimated memory per device:",
        f"  params            {_gib(param_bytes)}",
        f"  gradients         {_gib(param_bytes)}",
        f"  optimizer state   {_gib(param_bytes * moments)}",
        "  activations       " + (_gib(activations) if activations is not None
                                  else f"(no estimate for {model_config.type})"),
        f"  total             {_gib(param_bytes * (2 + moments) + (activations or 0))}",
        f"total parameters: {total}",
    ]
    return lines


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:9.3f} GiB"
