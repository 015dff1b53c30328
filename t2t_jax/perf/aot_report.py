"""`t2t-jax compile`'s rows as text: the terminal table, the Markdown table of docs/tpu.md,
and the files written beside them (compile.json, compile.md)."""

from __future__ import annotations

import dataclasses
import json
import os

from t2t_jax import sharding
from t2t_jax.perf import hlo, topology
from t2t_jax.perf.aot import Row


def write_outputs(rows: list[Row], output: str) -> list[str]:
    """OUTPUT/compile.json (the rows as a list of objects) and OUTPUT/compile.md (the Markdown
    table, with the model and the estimate's method above it)."""
    os.makedirs(output, exist_ok=True)
    paths = [os.path.join(output, name) for name in ("compile.json", "compile.md")]
    with open(paths[0], "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    with open(paths[1], "w") as f:
        notes = sorted({f"{r.model}, {r.mode}; estimate: {r.estimate_method}"
                        for r in rows if r.estimate_method})
        f.write("\n".join([*notes, "", *markdown_table(rows)]) + "\n")
    return paths


def _gib(num_bytes: float | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**30:.2f}"


def _kernels(row: Row) -> str:
    return "-" if not row.kernels else str(row.kernels["total"])


def _tflops(row: Row) -> str:
    """XLA's TFLOP per chip; "-" where XLA counts none (a GPU compiled for without one)."""
    return "-" if row.flops_per_chip is None else f"{row.flops_per_chip / 1e12:.2f}"


def _memory(row: Row) -> str:
    """"arguments/temporaries/total" GiB per chip (the compiler's total alone for a program
    it refused)."""
    parts = row.memory_breakdown or {}
    total = _gib(row.memory_per_chip_bytes)
    if "arguments" not in parts and "temporaries" in parts:  # refused: temporaries alone known
        total = ">" + total
    return "/".join([_gib(parts.get("arguments")), _gib(parts.get("temporaries")), total])


def format_table(rows: list[Row]) -> list[str]:
    """The terminal table: one line per row (the header alone for no rows)."""
    lines = [
        f"{'topology':>12} {'mesh d,f,t':>11} {'attention':>9} {'remat':>5} {'rows':>5} "
        f"{'len':>5} {'GiB/chip args/temp/total':>24} {'HBM':>4} {'fits':>4} {'TFLOP/chip':>10} "
        f"{'est s':>8} "
        f"{'est tok/s/chip':>14} {'est MFU (compute)':>17} {'AG/RS/AR/A2A GiB':>22} "
        f"{'kernels':>7} {'compile s':>9}"
    ]
    for r in rows:
        mesh = ",".join(str(r.mesh.get(a, "?")) for a in sharding.MESH_AXES)
        head = (f"{r.topology + ('x' + str(r.num_slices) if r.num_slices > 1 else ''):>12} "
                f"{mesh:>11} {r.attention:>9} {r.remat:>5} {r.batch_rows:>5} "
                f"{max(r.lengths.values(), default=0):>5} {_memory(r):>24} "
                f"{r.hbm_per_chip_bytes / 2**30:>4.0f} {'yes' if r.fits else 'no':>4}")
        if r.estimated_step_time_s is None:
            lines.append(f"{head}  {r.error or ''}")
            continue
        collective = "/".join(
            f"{r.collectives.get(k, {}).get('bytes', 0) / 2**30:.2f}"
            for k in hlo.SHARDING_COLLECTIVES)
        lines.append(
            f"{head} {_tflops(r):>10} {r.estimated_step_time_s:>8.4f} "
            f"{r.estimated_tokens_per_s_per_chip:>14,.0f} "
            f"{f'{r.estimated_mfu:.1%} ({r.estimated_mfu_compute_bound:.0%})':>17} "
            f"{collective:>22} {_kernels(r):>7} {r.compile_time_s:>9.1f}"
        )
    return lines


def markdown_table(rows: list[Row]) -> list[str]:
    """The rows as a Markdown table (what docs/tpu.md shows), written beside compile.json."""
    lines = [
        "| topology | chips | mesh (data, fsdp, tensor) | attention | remat | rows x tokens "
        "| GiB per chip: arguments / temporaries / total (HBM) | fits | est. tokens/s per chip "
        "| est. MFU (compute-bound) | estimate from | collectives per step, GiB per chip: "
        "all-gather / reduce-scatter / all-reduce / all-to-all (over DCN) | kernels | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        slices = (f" x {r.num_slices} {topology.parse(r.topology).slices_name}"
                  if r.num_slices > 1 else "")
        mesh = ", ".join(str(r.mesh.get(a, "?")) for a in sharding.MESH_AXES)
        tokens = max(r.lengths.values(), default=0)
        memory = f"{_memory(r).replace('/', ' / ')} ({r.hbm_per_chip_bytes / 2**30:.0f})"
        collective = " / ".join(f"{r.collectives.get(k, {}).get('bytes', 0) / 2**30:.2f}"
                                for k in hlo.SHARDING_COLLECTIVES)
        dcn = sum(c.get("dcn_bytes", 0) for c in r.collectives.values())
        if dcn:
            collective += f" ({dcn / 2**20:.1f} MiB over DCN)"
        source = "-" if not r.estimate_method else (
            "XLA" if r.estimate_method.startswith("XLA") else "roofline")
        speed = ("-" if r.estimated_tokens_per_s_per_chip is None
                 else f"{r.estimated_tokens_per_s_per_chip:,.0f}")
        mfu = "-" if r.estimated_mfu is None else (
            f"{r.estimated_mfu:.1%} ({r.estimated_mfu_compute_bound:.0%})")
        if r.error and r.estimated_step_time_s is None:
            collective = "does not fit" if r.fits is False else r.error[:80]
        lines.append(
            f"| {r.topology}{slices} | {r.chips} | {mesh} | {r.attention} | {r.remat} | "
            f"{r.batch_rows} x "
            f"{tokens} | {memory} | {'yes' if r.fits else 'no'} | {speed} | {mfu} | {source} | "
            f"{collective} | {_kernels(r)} | {r.compile_time_s or 0:.0f} |"
        )
    return lines
