"""The collectives of a compiled SPMD program, per kind: how many, the bytes each chip sends,
which cross slices (DCN), and their time over the links by ring algorithms."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from t2t_jax import sharding
from t2t_jax.perf import hlo
from t2t_jax.runtime import chips

COLLECTIVES = (*hlo.SHARDING_COLLECTIVES, "collective-permute")  # the kinds counted
# Collectives between slices: the TPU compiler turns each into a send (and a recv) to the
# multi-slice runtime, `_xla_megascale_transfer_type="ALL_REDUCE"` and so on.
_DCN_TRANSFER = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def collectives(hlo_text: str, devices: list) -> dict[str, dict[str, Any]]:
    """Collectives of a compiled SPMD program, per kind: `count`, `bytes` (the buffers each
    produces on one chip), `dcn_count` and `dcn_bytes` (those between slices), `ici_seconds`
    and `dcn_seconds` (their time by ring algorithms over the links they use). `devices`: the
    program's devices in partition order (the mesh's, flattened)."""
    chip = chips.chip_of(devices[0].device_kind) if devices else None
    slices = np.array([sharding.granule_index(d) for d in devices])
    found: dict[str, dict[str, Any]] = {}

    def add(op: str, out: int, n: int, crosses: bool) -> None:
        moved = {"all-reduce": 2 * (n - 1) / n * out, "all-gather": (n - 1) / n * out,
                 "reduce-scatter": (n - 1) * out, "all-to-all": (n - 1) / n * out,
                 "collective-permute": out}.get(op, out)
        entry = found.setdefault(op, {"count": 0, "bytes": 0, "dcn_count": 0, "dcn_bytes": 0,
                                      "ici_seconds": 0.0, "dcn_seconds": 0.0})
        entry["count"] += 1
        entry["bytes"] += out
        if crosses:
            entry["dcn_count"] += 1
            entry["dcn_bytes"] += out
        if chip is not None:
            bandwidth = chip.dcn_bandwidth if crosses else chip.ici_bandwidth
            entry["dcn_seconds" if crosses else "ici_seconds"] += moved / bandwidth

    instructions, _ = hlo.parse_hlo(hlo_text)
    for instruction in instructions.values():
        line = instruction.text
        if instruction.opcode == "send" and (transfer := _DCN_TRANSFER.search(line)):
            kind = transfer.group(1).lower().replace("_", "-")
            add(kind, sum(hlo.array_bytes(instruction.shape)[:1]),
                max(len(set(slices.tolist())), 2), crosses=True)
            continue
        op = instruction.opcode.removesuffix("-start")
        if op not in COLLECTIVES or instruction.opcode.endswith("-done"):
            continue
        sizes = hlo.array_bytes(instruction.shape)
        if instruction.opcode.endswith("-start") and op in ("all-gather", "collective-permute"):
            sizes = [s for s in sizes if s > 4]  # drop the u32 sync flags
            sizes = sizes[len(sizes) // 2:]  # (operands..., results...): the results
        groups = _groups(line, len(devices))
        crosses = bool(len(slices)) and any(len(set(slices[g])) > 1 for g in groups)
        n = max(len(groups[0]), 2) if groups else 2
        if op == "all-reduce" and instruction.computation.startswith("all-reduce-scatter"):
            # The TPU compiler's reduce-scatter: an all-reduce whose result each chip slices.
            add("reduce-scatter", sum(sizes) // n, n, crosses)
            continue
        add(op, sum(sizes), n, crosses)
    return found


def _groups(line: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective (partition ids), from any of XLA's three spellings:
    explicit `{{0,1},{2,3}}`, iota `[2,2]<=[2,2]T(1,0)`, or `mesh[...] {'axis_1'}`; or the
    source-target pairs of a collective-permute."""
    if match := re.search(r"source_target_pairs=\{([\d,{}]*)\}", line):
        return [[int(x) for x in pair.split(",")] for pair in re.findall(r"\{(\d+,\d+)\}",
                                                                          match.group(1))]
    if match := re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line):
        shape = [int(x) for x in match.group(1).split(",")]
        ids = np.arange(num_devices).reshape([int(x) for x in match.group(2).split(",")])
        if match.group(3):
            ids = ids.transpose([int(x) for x in match.group(3).split(",")])
        return ids.reshape(shape).tolist()
    if match := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
        axes = re.findall(r"'(\w+)'=(\d+)", match.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        grouped = [names.index(a) for a in re.findall(r"'(\w+)'", match.group(2))]
        rest = [i for i in range(len(names)) if i not in grouped]
        ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(rest + grouped)
        return ids.reshape(-1, math.prod(sizes[i] for i in grouped) or 1).tolist()
    if match := re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", line):
        return [[int(x) for x in g.split(",") if x.strip()]
                for g in re.findall(r"\{([\d, ]*)\}", match.group(1))]
    return [list(range(num_devices))]  # no groups: all devices
