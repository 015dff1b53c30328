"""The abstract arguments `t2t-jax compile` lowers the train step with: shapes and shardings
of the state and of a global batch, sized from the config and the mesh, with no array made."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding

from t2t_jax import sharding
from t2t_jax.model.models import model_type
from t2t_jax.train_step import Stepper


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: what `.lower()` takes instead of arrays."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def batch_shapes(
    lengths: dict[str, int], rows: int, packed: bool, batch_sharding: NamedSharding
) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract global batch the train step takes: the pipeline's features, [rows, len]
    int32, with segment ids and positions when rows are packed."""
    features = dict(lengths)
    if packed:
        for key in (k for k in lengths if k != "loss_mask"):
            features[f"{key}_segmentation"] = features[f"{key}_position"] = lengths[key]
    return {
        name: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch_sharding)
        for name, length in features.items()
    }


def train_step_args(
    stepper: Stepper, lengths: dict[str, int], rows: int, packed: bool
) -> tuple[Any, dict[str, jax.ShapeDtypeStruct], jax.ShapeDtypeStruct]:
    """Abstract (state, batch, rng) for the stepper's train step, laid out as training lays
    them out."""
    mesh = stepper.mesh
    state = abstract(stepper.abstract_state, stepper.state_shardings)
    batch = batch_shapes(lengths, rows, packed, sharding.batch_sharding(mesh))
    rng = jax.eval_shape(lambda: jax.random.key(0))
    return state, batch, jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                                              sharding=sharding.replicated(mesh))


def global_rows(config: ml_collections.ConfigDict, mesh, rows_per_chip: int | None) -> int:
    """Rows per step: `rows_per_chip` times the data-parallel shards (data x fsdp), else the
    config's `data.batch_size`, which must divide over them."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows_per_chip:
        return rows_per_chip * shards
    rows = config.data.batch_size
    if rows % shards:
        raise ValueError(
            f"data.batch_size={rows} does not divide over the mesh's {shards} data-parallel "
            f"shards (data x fsdp); pass --rows_per_chip N for N rows per shard, or set "
            f"--config.data.batch_size to a multiple of {shards}"
        )
    return rows


def set_seq_len(config: ml_collections.ConfigDict, seq_len: int) -> None:
    """Makes `seq_len` the tokens a row holds: source and target each for the encoder-decoder,
    the two together for the decoder-only model."""
    data = config.data
    data.max_source_length, data.max_target_length = model_type(config.model).split_length(
        seq_len)
    config.model.max_positions = max(config.model.max_positions, seq_len)
