"""Where a compiled program's device time goes: `t2t-jax bench --profile DIR`.

The program runs a few times under `jax.profiler.trace` (a trace TensorBoard and Perfetto
read). Each op the devices ran is then matched, by the `hlo_op` name the runtime records, to
its instruction in the compiled HLO, and put in a category by what the instruction computes
(its opcode, the library call it makes, the ops fused into it) and by the JAX name scope it
came from (`metadata op_name`: the model's `attention_core`, `loss` and `optimizer` scopes,
Flax's `Dropout` modules). Time the devices spent waiting between ops is "idle". On GPU, XLA
replays most of a step as CUDA graphs ("command buffers"); their kernels are matched by the
kernel names XLA derives from instruction names, and library kernels (cuBLAS, cuDNN) by theirs.

Only JAX and the standard library are used, so that this module also reads traces of other
code. On CPU the "device" is the host threads that run XLA's compiled ops; they may run ops
side by side, so op time can add up to more than the step.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax

from t2t_jax.perf.hlo import (
    CATEGORIES,
    CONTROL_FLOW_OPCODES,
    Instruction,
    classify,
    module_name,
    parse_hlo,
)


@dataclasses.dataclass
class Breakdown:
    """Device time of one profiled program, per step."""

    steps: int
    step_ms: float  # from the first op's start to the last op's end, over `steps`
    busy_ms: float  # time at least one op ran
    categories: dict[str, float]  # ms per step, "idle" = step_ms - busy_ms
    top_ops: list[tuple[str, str, float]]  # (instruction, category, ms per step), largest first
    unmatched_ms: float  # op time whose hlo_op is not in the module (other programs)

    def shares(self) -> dict[str, float]:
        """Each category's fraction of the op time plus idle (sums to 1)."""
        total = sum(self.categories.values()) or 1.0
        return {k: v / total for k, v in self.categories.items()}


@dataclasses.dataclass(frozen=True)
class OpEvent:
    """One op the devices ran: the HLO instruction the runtime names (`hlo_op`), the kernel's
    own name, and its interval."""

    op: str
    start_ns: float
    duration_ns: float
    kernel: str = ""


def _is_device_line(plane_name: str, line_name: str) -> bool:
    if plane_name.startswith("/device:GPU"):
        return line_name.startswith("Stream")
    if plane_name.startswith("/device:TPU"):
        return line_name == "XLA Ops"
    return plane_name == "/host:CPU"


def op_events(xplane_path: str, module: str) -> list[OpEvent]:
    """The ops of programs named `module` in a trace file: GPU kernels and TPU ops from the
    device planes, XLA's CPU ops from the host threads that ran them."""
    from jax.profiler import ProfileData

    events = []
    for plane in ProfileData.from_file(xplane_path).planes:
        for line in plane.lines:
            if not _is_device_line(plane.name, line.name):
                continue
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get("hlo_op")
                if plane.name == "/host:CPU" and op is None:
                    continue  # host work that is not an XLA op
                if stats.get("hlo_module", module) != module:
                    continue
                events.append(
                    OpEvent(op or event.name, event.start_ns, event.duration_ns, event.name)
                )
    return events


def _union_ns(intervals: Iterable[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _lookup(event: OpEvent, instructions: dict[str, Instruction],
            kernels: dict[str, Instruction]) -> Instruction | None:
    """The instruction an event ran. On GPU, kernels replayed from a CUDA graph (XLA's command
    buffers) carry the command buffer's name as `hlo_op`: their own kernel name, which XLA
    makes from the instruction's ("loop_add_fusion.2" -> "loop_add_fusion_2"), says which."""
    instruction = instructions.get(event.op)
    if instruction is None or instruction.opcode in CONTROL_FLOW_OPCODES or (
        event.op.startswith("command_buffer")
    ):
        return kernels.get(event.kernel) or instructions.get(event.kernel)
    return instruction


def _kernel_names(instructions: dict[str, Instruction]) -> dict[str, Instruction]:
    return {re.sub(r"[.\-]", "_", name): i for name, i in instructions.items()}


def breakdown(events: list[OpEvent], hlo_text: str, steps: int, top: int = 12) -> Breakdown:
    """Per-step device time by category of the ops in `events`, which ran `steps` steps of the
    program compiled as `hlo_text`."""
    instructions, computations = parse_hlo(hlo_text)
    kernels = _kernel_names(instructions)
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    by_op: dict[str, tuple[str, float]] = {}
    unmatched, intervals = 0.0, []
    categories: dict[str, str] = {}
    for event in events:
        instruction = _lookup(event, instructions, kernels)
        if instruction is not None and instruction.opcode in CONTROL_FLOW_OPCODES:
            continue
        intervals.append((event.start_ns, event.start_ns + event.duration_ns))
        if instruction is None:
            category = _kernel_category(event.kernel or event.op)
            if category is None:
                unmatched += event.duration_ns
                continue
        else:
            if instruction.name not in categories:
                categories[instruction.name] = classify(instruction, computations)
            category = categories[instruction.name]
        by_category[category] += event.duration_ns
        name = instruction.name if instruction else (event.kernel or event.op)
        by_op[name] = (category, by_op.get(name, (category, 0.0))[1] + event.duration_ns)
    window = (max(b for _, b in intervals) - min(a for a, _ in intervals)) if intervals else 0.0
    busy = _union_ns(intervals)
    by_category["idle"] = max(window - busy, 0.0)
    per_step = 1e-6 / steps  # ns over all steps -> ms per step
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]
    return Breakdown(
        steps=steps,
        step_ms=window * per_step,
        busy_ms=busy * per_step,
        categories={k: v * per_step for k, v in by_category.items()},
        top_ops=[(name, cat, ns * per_step) for name, (cat, ns) in ranked],
        unmatched_ms=unmatched * per_step,
    )


def _kernel_category(kernel: str) -> str | None:
    """A category from a GPU kernel's name alone (library kernels have no HLO name)."""
    name = kernel.lower()
    if any(t in name for t in ("fmha", "flash", "sdpa", "attn", "cudnn")):
        return "attention"  # JAX calls cuDNN for fused attention alone
    if any(t in name for t in ("gemm", "xmma", "cutlass", "cublas", "matmul", "gmma", "nvjet")):
        return "matmul"
    if any(t in name for t in ("nccl", "allreduce", "allgather", "reducescatter")):
        return "collectives"
    if "memcpy" in name or "memset" in name:
        return "copies and transposes"
    return None


def latest_trace(log_dir: str) -> str:
    """The newest trace file `jax.profiler.trace(log_dir)` wrote."""
    paths = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb"))
    if not paths:
        raise FileNotFoundError(f"no trace under {log_dir}: did jax.profiler.trace run there?")
    return max(paths, key=os.path.getmtime)


def profile(
    run_step: Callable[[], Any], hlo_text: str, log_dir: str, steps: int = 3
) -> Breakdown:
    """Runs `run_step` (which dispatches one step of the program compiled as `hlo_text` and
    returns its outputs without waiting) `steps` times back to back under the profiler, as
    training runs steps, so that "idle" is time the devices wait within that stream (for the
    host, or between kernels), not the profiler's own pauses. Writes the trace into `log_dir`
    with the program beside it (`program.hlo.txt`, to read the trace's op names by) and breaks
    its device time down."""
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "program.hlo.txt"), "w") as f:
        f.write(hlo_text)
    with jax.profiler.trace(log_dir):
        for _ in range(steps):
            outputs = run_step()  # earlier outputs may be donated to later steps
        jax.block_until_ready(outputs)
    events = op_events(latest_trace(log_dir), module_name(hlo_text))
    return breakdown(events, hlo_text, steps)


def format_breakdown(result: Breakdown, title: str = "") -> list[str]:
    """The terminal table: time per step by category, then the largest ops."""
    lines = [title] if title else []
    lines.append(
        f"device time per step: {result.step_ms:.2f} ms, busy {result.busy_ms:.2f} ms "
        f"({result.steps} steps profiled)"
    )
    shares = result.shares()
    for category in CATEGORIES:
        ms = result.categories[category]
        lines.append(f"  {category:<32} {ms:>10.3f} ms {shares[category]:>7.1%}")
    if result.unmatched_ms:
        lines.append(f"  {'(ops of other programs)':<32} {result.unmatched_ms:>10.3f} ms")
    lines.append("  largest ops:")
    for name, category, ms in result.top_ops:
        lines.append(f"    {name[:48]:<48} {category:<30} {ms:>9.3f} ms")
    return lines
