"""The device mesh and the one table that maps logical axis names onto it.

Parameters name their axes (vocab, embed, mlp, heads, kv) and activations theirs (act_*); the
rules below decide which mesh axis each is split over. Parallelism is therefore a config change:
`--config.mesh.fsdp=4 --config.mesh.tensor=2`, never a model edit.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical axis, mesh axes). Parameters: fully sharded data parallel over `fsdp` on the embed
# dimension, Megatron-style tensor parallel over `tensor` on heads, mlp and vocab.
# Activations: batch over data and fsdp, heads/mlp/vocab over tensor.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from `config.mesh`, one of them -1 for "the rest"."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    spec = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"invalid mesh ({spec}): sizes must be positive, at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh ({spec}) does not divide the {num_devices} devices; make the product "
                f"of the fixed axes divide {num_devices}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh ({spec}) needs {math.prod(sizes)} devices but {num_devices} are present; "
            "make data*fsdp*tensor equal the device count or set one axis to -1"
        )
    return tuple(sizes)


def make_mesh(mesh_config: Any, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _divisible_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str) -> P:
    """`spec` with each dimension the mesh cannot split evenly left unsharded (logged)."""
    axes = []
    for dim, mesh_axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)),
                              strict=True):
        group = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
        ways = math.prod(mesh.shape[a] for a in group)
        if ways > 1 and dim % ways:
            logging.warning("%s: dim %d not divisible by %s=%d; replicated", name, dim, group, ways)
            mesh_axes = None
        axes.append(mesh_axes)
    return P(*axes)


def logical_to_sharding(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` (e.g. the abstract
    variables from `jax.eval_shape(model.init, ...)`); leaves without names are replicated."""
    specs = nn.get_partition_spec(boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, LOGICAL_AXIS_RULES)
    shapes = nn.meta.unbox(boxed_tree)
    paths_and_specs = jax.tree_util.tree_flatten_with_path(
        mesh_specs, is_leaf=lambda x: isinstance(x, P)
    )[0]
    shape_leaves = jax.tree.leaves(shapes)
    shardings = [
        NamedSharding(mesh, _divisible_spec(spec, leaf.shape, mesh, jax.tree_util.keystr(path)))
        for (path, spec), leaf in zip(paths_and_specs, shape_leaves, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(shapes), shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split on their leading axis over data and fsdp, replicated over tensor."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """One global array per feature from each process's rows (`local_batch`)."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()
    }


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
    """Makes `mesh` and the logical axis rules current, for the activation constraints that
    the model declares while a step is traced."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield mesh
