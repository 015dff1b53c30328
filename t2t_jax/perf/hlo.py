"""Compiled HLO text, read without running it: its instructions and computations, what each
instruction computes (a category: matmul, attention, loss, dropout, collectives...), the bytes of
its arrays, and the kernels a program launches with the bytes each moves.

`compiled.as_text()` is the input everywhere. `bench --profile` (`profiling`) matches a trace's
events to these instructions; `compile` (`aot`) counts kernels and collectives from them.
"""

from __future__ import annotations

import dataclasses
import math
import re

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
# The collectives of SPMD programs that move a sharded buffer across chips, in the order reports
# list them; then the rest that XLA emits.
SHARDING_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
COLLECTIVE_OPCODES = (*SHARDING_COLLECTIVES, "collective-permute", "collective-broadcast",
                      "send", "recv")
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
    computation: str = ""  # the name of the computation that holds it
    text: str = ""  # the whole line, attributes included (replica groups, frontend attributes)


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
    computation = ""
    for line in text.splitlines():
        if line.startswith(("%", "ENTRY")):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            current = computations.setdefault(computation, [])
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
            computation=computation,
            text=line,
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


def module_name(hlo_text: str) -> str:
    """The name the runtime records as `hlo_module` for a compiled program."""
    return hlo_text.split(None, 2)[1].rstrip(",")
