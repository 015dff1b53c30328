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
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax

CATEGORIES = (
    "matmul",
    "attention",
    "softmax and loss",
    "dropout RNG and masks",
    "normalization and elementwise",
    "copies and transposes",
    "optimizer",
    "collectives",
    "idle",
)
COLLECTIVE_OPCODES = (
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
    "collective-broadcast", "send", "recv",
)
# Instructions whose events would count their body's ops a second time.
CONTROL_FLOW_OPCODES = ("while", "conditional", "call", "async-start", "async-done")
LAYOUT_OPCODES = ("copy", "transpose", "copy-start", "copy-done")
MATMUL_CALL_TARGETS = ("gemm", "matmul", "cublas", "triton")
ATTENTION_CALL_TARGETS = ("fmha", "flash", "splash", "attention")
RNG_SCOPES = ("_bernoulli", "_uniform", "random_bits", "threefry", "rbg", "rng_bit_generator")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """What the classifier needs of one HLO instruction."""

    name: str
    opcode: str
    op_name: str
    calls: tuple[str, ...]
    call_target: str
    root: bool
    shape: str = ""  # the result's, as printed: "bf16[32,512]{1,0}" or a tuple of them
    operands: tuple[str, ...] = ()  # instruction names
    parameter_number: int = -1  # a parameter's position in its computation's arguments


_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
# The computations an instruction runs: fused, applied, a loop's condition and body, or a
# conditional's branches.
_CALLS = re.compile(r"\b(?:calls|to_apply|condition|body|branch_computations|true_computation|"
                    r"false_computation)=\{?%([\w.\-]+(?:, %[\w.\-]+)*)")


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[Instruction]]]:
    """(instructions by name, instructions of each computation) of a compiled module's text
    (`compiled.as_text()`)."""
    instructions: dict[str, Instruction] = {}
    computations: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for line in text.splitlines():
        if line.startswith(("%", "ENTRY")):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            current = computations.setdefault(name, [])
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        root, name, shape, opcode, rest = match.groups()
        calls = [c.strip().lstrip("%") for group in _CALLS.findall(rest) for c in group.split(",")]
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        instruction = Instruction(
            name=name,
            opcode=opcode,
            op_name=op_name.group(1) if op_name else "",
            calls=tuple(calls),
            call_target=target.group(1) if target else "",
            root=bool(root),
            shape=shape,
            # Compiled HLO names operands without their shapes, and no operand holds a ")".
            operands=tuple(re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])),
            parameter_number=int(rest.split(")", 1)[0]) if opcode == "parameter" else -1,
        )
        instructions[name] = instruction
        current.append(instruction)
    return instructions, computations


def _scopes(op_name: str) -> set[str]:
    """The name-scope parts of an op_name: "jit(f)/transpose(jvp(loss))/exp" -> {f, loss, exp}."""
    return {re.sub(r"^(?:\w+\()+|\)+$", "", part) for part in op_name.split("/")}


def _fused(instruction: Instruction, computations: dict) -> list[Instruction]:
    """The instruction and, for fusions and library calls, every instruction inside."""
    out, stack = [instruction], list(instruction.calls)
    while stack:
        for inner in computations.get(stack.pop(), []):
            out.append(inner)
            stack.extend(inner.calls)
    return out


def classify(instruction: Instruction, computations: dict) -> str:
    """The category (one of CATEGORIES but idle) of one top-level instruction."""
    parts = _fused(instruction, computations)
    opcodes = {p.opcode for p in parts}
    targets = " ".join(p.call_target for p in parts).lower()
    scopes = set().union(*(_scopes(p.op_name) for p in parts))
    if opcodes & {f"{c}{s}" for c in COLLECTIVE_OPCODES for s in ("", "-start", "-done")}:
        return "collectives"
    if "optimizer" in scopes:
        return "optimizer"
    if "attention_core" in scopes or any(t in targets for t in ATTENTION_CALL_TARGETS):
        return "attention"
    if opcodes & {"dot", "convolution"} or any(t in targets for t in MATMUL_CALL_TARGETS):
        return "matmul"
    if "rng-bit-generator" in opcodes or any(
        s.startswith("Dropout") or any(r in s for r in RNG_SCOPES) for s in scopes
    ):
        return "dropout RNG and masks"
    if "loss" in scopes:
        return "softmax and loss"
    root = next((p for p in parts[1:] if p.root), instruction)
    if instruction.opcode in LAYOUT_OPCODES or root.opcode in LAYOUT_OPCODES:
        return "copies and transposes"
    return "normalization and elementwise"


# Instructions that launch nothing: they name, regroup or reinterpret buffers.
_NOT_LAUNCHED = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier", "after-all",
    "add-dependency", "partition-id", "replica-id", "domain",
}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128}


def array_bytes(shape_text: str) -> list[int]:
    """The bytes of each array in a shape as HLO prints it ("f32[8,64]", or a tuple)."""
    sizes = []
    for dtype, dims in _ARRAY.findall(shape_text):
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
        sizes.append(math.prod(int(d) for d in dims.split(",") if d) * bits // 8)
    return sizes


@dataclasses.dataclass
class KernelCensus:
    """The launches of a compiled program, read from its HLO without running it: each kernel
    (a fusion, a library call such as cuBLAS or cuDNN, a copy, a collective) by category, and
    the bytes it reads and writes (its operands' and results' sizes, slices and in-place
    updates as such: what it moves through HBM if nothing stays in cache). A loop's body is
    counted once, and every branch of a conditional."""

    kernels: dict[str, int]  # per category, and "total"
    bytes: dict[str, float]  # per category, and "total"


def _fused_body(instruction: Instruction, computations: dict) -> list[Instruction]:
    if instruction.opcode == "fusion" and instruction.calls:
        return computations.get(instruction.calls[0], [])
    return []


def _in_place_update(body: list[Instruction]) -> Instruction | None:
    """The fusion's root if it updates a slice of a buffer in place (XLA aliases the buffer:
    only the slice is written), else None."""
    root = next((i for i in body if i.root), None)
    return root if root is not None and root.opcode == "dynamic-update-slice" else None


def _bytes_read(instruction: Instruction, instructions: dict[str, Instruction],
                computations: dict[str, list[Instruction]]) -> int:
    """The bytes a kernel reads: each operand's size; for an operand a fusion only slices
    (XLA reads the slice in place, e.g. one projection of a batched matmul's output), the
    slices' sizes; nothing for the buffer a fusion updates in place."""
    body = _fused_body(instruction, computations)
    parameters = sorted((i for i in body if i.opcode == "parameter"),
                        key=lambda i: i.parameter_number)
    update = _in_place_update(body)
    total = 0
    for position, operand in enumerate(instruction.operands):
        if operand not in instructions:
            continue
        size = sum(array_bytes(instructions[operand].shape))
        if position < len(parameters):
            name = parameters[position].name
            users = [i for i in body if name in i.operands]
            if users and all(u.opcode in ("slice", "dynamic-slice") for u in users):
                size = min(size, sum(sum(array_bytes(u.shape)) for u in users))
            elif update is not None and update.operands[:1] == (name,):
                size = 0
        total += size
    return total


def _bytes_written(instruction: Instruction, instructions: dict[str, Instruction],
                   computations: dict[str, list[Instruction]]) -> int:
    """The bytes a kernel writes: its results, less a library call's scratch space (cuBLAS's
    trailing s8/u8 workspace), the operands an async start echoes in its tuple, and for an
    in-place update only the slice."""
    body = _fused_body(instruction, computations)
    update = _in_place_update(body)
    if update is not None:
        by_name = {i.name: i for i in body}
        written = by_name.get(update.operands[1]) if len(update.operands) > 1 else None
        return sum(array_bytes(written.shape)) if written else 0
    arrays = _ARRAY.findall(instruction.shape)
    sizes = array_bytes(instruction.shape)
    if instruction.opcode == "custom-call" and len(arrays) > 1 and arrays[-1][0] in ("s8", "u8"):
        sizes = sizes[:-1]
    if instruction.opcode in ("all-gather-start", "collective-permute-start"):
        sizes = sizes[len(instruction.operands):]  # (operands..., results...)
    return sum(sizes)


def kernel_census(hlo_text: str) -> KernelCensus:
    """`KernelCensus` of a compiled module's text (`compiled.as_text()`)."""
    instructions, computations = parse_hlo(hlo_text)
    entry = next((line.split()[1].lstrip("%") for line in hlo_text.splitlines()
                  if line.startswith("ENTRY")), None)
    kernels: dict[str, int] = {}
    moved: dict[str, float] = {}
    stack = [entry] if entry in computations else []
    while stack:
        for instruction in computations[stack.pop()]:
            opcode = instruction.opcode
            if opcode in _NOT_LAUNCHED or opcode.endswith(("-done", "-update")):
                continue
            if opcode in ("while", "conditional", "call"):  # their bodies launch the kernels
                stack.extend(c for c in instruction.calls if c in computations)
                continue
            category = classify(instruction, computations)
            kernels[category] = kernels.get(category, 0) + 1
            moved[category] = (moved.get(category, 0.0)
                               + _bytes_read(instruction, instructions, computations)
                               + _bytes_written(instruction, instructions, computations))
    kernels["total"] = sum(kernels.values())
    moved["total"] = sum(moved.values())
    return KernelCensus(kernels, moved)


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


def module_name(hlo_text: str) -> str:
    """The name the runtime records as `hlo_module` for a compiled program."""
    return hlo_text.split(None, 2)[1].rstrip(",")


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
