"""What `t2t-jax compile` compiles: a config per sequence length and attention kernel asked for,
or with `--search` the candidate meshes of a slice (each with and without rematerialisation),
ranked by estimated tokens/s; `run` is the command's whole job."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator

import ml_collections

from t2t_jax import sharding
from t2t_jax.perf import topology
from t2t_jax.perf.aot import MODES, Row, compile_decode, compile_train
from t2t_jax.perf.aot_args import set_seq_len


def candidate_meshes(ici_chips: int, num_heads: int) -> list[dict[str, int]]:
    """The (data, fsdp, tensor) splits of a slice's chips that `--search` compiles: tensor 1,
    2 or 4 (dividing the heads), and for each, fsdp over none, about the square root, or all of
    the rest (memory falls as fsdp grows, collectives change kind), data taking what is left."""
    meshes = []
    for tensor in (1, 2, 4):
        if ici_chips % tensor or num_heads % tensor:
            continue
        rest = ici_chips // tensor
        middle = 2 ** round(math.log2(rest) / 2)
        for fsdp in sorted({1, middle, rest}):
            if rest % fsdp == 0:
                meshes.append({"data": rest // fsdp, "fsdp": fsdp, "tensor": tensor})
    return meshes


def variants(
    config: ml_collections.ConfigDict, seq_lens: list[int], attentions: list[str]
) -> Iterator[ml_collections.ConfigDict]:
    """Copies of `config` for each sequence length and attention implementation asked for
    (none asked: the config itself)."""
    for seq_len in seq_lens or [None]:
        for attention in attentions or [None]:
            variant = copy.deepcopy(config)
            if seq_len:
                set_seq_len(variant, seq_len)
            if attention:
                variant.model.attention = attention
            yield variant


def search(
    config: ml_collections.ConfigDict,
    topo: topology.Topology,
    devices: list,
    vocab_size: int,
    rows_per_chip: int | None,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Compiles `candidate_meshes` within each slice (`mesh.dcn` as configured), each first
    without rematerialisation and, if that does not fit, with `remat=full`; returns every row,
    those that fit first, by estimated tokens/s (the batch grows with the data-parallel shards
    under --rows_per_chip, so tokens/s rather than step time is what compares)."""
    rows = []
    for mesh in candidate_meshes(topo.chips // topo.num_slices, config.model.num_heads):
        for remat in dict.fromkeys((config.model.remat, "full")):
            candidate = copy.deepcopy(config)
            candidate.mesh.ici.update(mesh)
            candidate.model.remat = remat
            try:
                row = compile_train(candidate, topo, devices, vocab_size, rows_per_chip)
            except ValueError as error:  # e.g. a batch that does not divide over this mesh
                row = Row(topology=topo.name, num_slices=topo.num_slices, chips=topo.chips,
                          mesh=mesh, mode="train", model="", attention=candidate.model.attention,
                          remat=remat, batch_rows=0, lengths={}, tokens_per_step=0,
                          hbm_per_chip_bytes=topology.usable_memory(topo.chip),
                          error=str(error))
            rows.append(row)
            if on_row:
                on_row(row)
            if row.fits:
                break
    return sorted(rows, key=lambda r: (not r.fits, -(r.estimated_tokens_per_s or 0)))


def mesh_flags(row: Row) -> str:
    """The command-line flags that select this row's mesh and remat policy in training."""
    flags = [f"--config.mesh.ici.{axis}={row.mesh[axis] // dcn}"
             for axis, dcn in zip(sharding.MESH_AXES, _dcn_sizes(row), strict=True)]
    return " ".join(flags + [f"--config.model.remat={row.remat}"])


def _dcn_sizes(row: Row) -> tuple[int, int, int]:
    """How much of each mesh axis the slices make (data over slices, as `mesh.dcn` defaults)."""
    return (row.num_slices, 1, 1) if row.mesh["data"] % row.num_slices == 0 else (1, 1, 1)


def run(
    config: ml_collections.ConfigDict,
    topology_name: str,
    vocab_size: int,
    num_slices: int = 1,
    mode: str = "train",
    rows_per_chip: int | None = None,
    seq_lens: list[int] | None = None,
    attentions: list[str] | None = None,
    find_mesh: bool = False,
    decode_rows: int = 64,
    beam_size: int = 4,
    alpha: float = 0.6,
    extra_length: int = 50,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Rows for `config` compiled on `topology_name` (x `num_slices`): one per sequence length
    and attention asked for, or with `find_mesh` the candidates of `search` for each."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if rows_per_chip is not None and rows_per_chip < 1:
        raise ValueError(f"--rows_per_chip must be at least 1, got {rows_per_chip}")
    topo = topology.parse(topology_name, num_slices)
    devices = topology.devices(topo)
    rows = []
    for variant in variants(config, seq_lens or [], attentions or []):
        if find_mesh and mode == "train":
            rows += search(variant, topo, devices, vocab_size, rows_per_chip, on_row)
            continue
        if mode == "train":
            row = compile_train(variant, topo, devices, vocab_size, rows_per_chip)
        else:
            host_chips = sum(d.process_index == devices[0].process_index for d in devices)
            row = compile_decode(variant, topo, devices, vocab_size,
                                 rows_per_chip * host_chips if rows_per_chip else decode_rows,
                                 beam_size, alpha, extra_length)
        logging.info("compiled %s", row)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows
