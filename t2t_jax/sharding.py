"""The device mesh and the one table that maps logical axis names onto it.

Parameters name their axes (vocab, embed, mlp, heads, kv) and activations theirs (act_*); the
rules below decide which mesh axis each is split over. Parallelism is therefore a config change:
`--config.mesh.ici.fsdp=4 --config.mesh.ici.tensor=2`, never a model edit.
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
    ("layers", None),  # the stacked layer axis of model.scan_layers
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(mesh_config: Any, num_devices: int, name: str = "mesh") -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from a config with those fields, one of them -1 for "the rest"
    of `num_devices`."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    spec = ", ".join(f"{name}.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
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
            f"make data*fsdp*tensor equal {num_devices} or set one axis to -1"
        )
    return tuple(sizes)


def granule_index(device) -> int:
    """Which granule a device is in: its TPU slice, or on GPU and CPU its process (host)."""
    return getattr(device, "slice_index", 0) if device.platform == "tpu" else device.process_index


def granules(devices: list) -> list[list]:
    """Devices grouped into what fast links join: a TPU slice (ICI), or on GPU and CPU one
    process's devices (NVLink, shared memory); between groups is the slower network (DCN)."""
    groups: dict[int, list] = {}
    for device in sorted(devices, key=lambda d: (granule_index(d), d.id)):
        groups.setdefault(granule_index(device), []).append(device)
    sizes = {len(g) for g in groups.values()}
    if len(sizes) > 1:
        raise ValueError(
            f"hosts hold different numbers of devices ({sorted(sizes)}); give every process "
            "the same number of devices"
        )
    return list(groups.values())


def make_mesh(mesh_config: Any, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    `mesh.ici` shapes the devices within a granule (slice or host) and `mesh.dcn` the granules;
    each mesh axis is their product, DCN-major, so the axes the DCN splits (by default data)
    change slowest and the collectives of `tensor` stay on the fast links.
    """
    devices = jax.devices() if devices is None else list(devices)
    groups = granules(devices)
    ici = mesh_shape(mesh_config.ici, len(groups[0]), "mesh.ici")
    dcn = mesh_shape(mesh_config.dcn, len(groups), "mesh.dcn")
    try:
        from jax.experimental import mesh_utils

        if len(groups) == 1:
            grid = mesh_utils.create_device_mesh(ici, groups[0])
        else:
            grid = mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, process_is_granule=devices[0].platform != "tpu"
            )
    except (ValueError, NotImplementedError, AssertionError):
        # (dcn..., ici...) -> interleave each axis's DCN and ICI parts -> (dcn*ici per axis)
        blocks = np.asarray(groups, dtype=object).reshape(*dcn, *ici)
        grid = blocks.transpose(0, 3, 1, 4, 2, 5).reshape(np.multiply(dcn, ici))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def platform(mesh: Mesh) -> str:
    """The platform of the mesh's devices ("tpu" for a topology compiled for ahead of time)."""
    return mesh.devices.flat[0].platform


def local_mesh(devices: list | None = None) -> Mesh:
    """This process's devices (or one host's `devices`) alone, all on `data`: for work each host
    does by itself, such as decoding."""
    grid = np.asarray(jax.local_devices() if devices is None else devices).reshape(-1, 1, 1)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_shard(mesh: Mesh) -> tuple[int, int]:
    """(index, count): every global batch is `count` equal blocks of rows, and this process's
    devices hold block `index` (processes that differ only along `tensor` hold the same one).
    The input pipeline reads that block; `global_batch` puts it in place."""
    fsdp = mesh.shape["fsdp"]
    rows = sorted({
        position[0] * fsdp + position[1]
        for position, device in np.ndenumerate(mesh.devices)
        if device.process_index == jax.process_index()
    })
    width, ways = len(rows), mesh.shape["data"] * fsdp
    if rows != list(range(rows[0], rows[0] + width)) or rows[0] % width or ways % width:
        raise ValueError(
            "this process's devices do not hold one contiguous block of the batch; keep "
            "mesh.dcn on data and fsdp, or give every host whole data/fsdp groups"
        )
    return rows[0] // width, ways // width


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


def spec_table(shardings: Any) -> dict[str, str]:
    """{"encoder/layer_0/ffn/wi/kernel": "P('fsdp', 'tensor')", ...} for a tree of
    NamedShardings (e.g. a Stepper's param shardings): the layout to read, diff or keep as a
    golden file."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): str(s.spec) for path, s in flat
    }


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split on their leading axis over data and fsdp, replicated over tensor."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(
    local_batch: dict[str, np.ndarray], mesh: Mesh, count: int
) -> dict[str, jax.Array]:
    """One global array per feature from each process's block of rows (`local_batch`, one of
    `count`: the block `batch_shard(mesh)` names)."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * count, *v.shape[1:]))
        for k, v in local_batch.items()
    }


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
    """Makes `mesh` and the logical axis rules current, for the activation constraints that
    the model declares while a step is traced."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield mesh
