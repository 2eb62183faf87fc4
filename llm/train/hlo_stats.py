"""What one device does in a compiled step, read from XLA's optimized HLO text (`compiled.as_text()`).

XLA's own cost analysis (`compiled.cost_analysis()`) counts the body of a while loop once, whatever its trip
count, so a model with scanned layers (`model.scan_layers`) or gradient accumulation would show the FLOPs of one
layer or one microbatch. Here every computation is weighted by how many times it runs per step: the sum over its
call sites of the caller's weight, times the loop's trip count for a while body (XLA records
`known_trip_count` on the loops it can analyse; a loop without one counts once and is reported in
`unknown_trip_counts`). From the weighted instructions come
  * matmul FLOPs: 2 x result elements x contracted size of every `dot`, fused or not;
  * bytes accessed: operands plus result of every unfused instruction (a fusion counts as one), an estimate of
    memory traffic in the manner of XLA's cost analysis;
  * collectives by kind: how many run, their operand and result bytes per device, and the bytes each device
    sends over the interconnect under the ring algorithm (all-reduce 2(n-1)/n of its operand, all-gather
    (n-1)/n of its result, reduce-scatter and all-to-all (n-1)/n of their operand, collective-permute all of
    its operand; n is the size of the replica group).
The HLO is the per-device (SPMD-partitioned) program, so every figure is per device.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Bytes per element of HLO primitive types (XLA's names); sub-byte types count as packed.
_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s+=\s+(.*)$")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
# Instructions that move no data of their own.
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional"}
_NO_TRAFFIC |= {"after-all", "partition-id", "replica-id"}


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # The result's HLO shape text, e.g. "f32[8,64]{1,0}" or a tuple "(s32[], f32[4])".
    opcode: str
    operands: list[str]
    attributes: str  # Everything after the operand list.


@dataclasses.dataclass
class CollectiveStats:
    count: int = 0
    operand_bytes: float = 0.0
    result_bytes: float = 0.0
    sent_bytes: float = 0.0  # Sent by each device over the interconnect, ring algorithm.


@dataclasses.dataclass
class HloStats:
    matmul_flops: float
    bytes_accessed: float
    collectives: dict[str, CollectiveStats]
    unknown_trip_counts: int  # While loops without a known trip count (counted as running once).


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape (a tuple's elements summed): "f32[8,64]{1,0}" -> 2048."""
    arrays = _ARRAY.findall(shape)
    return sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 0) for dtype, dims in arrays)


def _split_instruction(name: str, text: str) -> Instruction:
    """`text` is what follows "%name = ": a shape, the opcode, "(operands)", then attributes."""
    if text.startswith("("):  # A tuple shape: up to its matching parenthesis.
        end = _matching(text, 0)
        shape, rest = text[: end + 1], text[end + 1 :].lstrip()
    else:
        shape, _, rest = text.partition(" ")
    opcode, _, rest = rest.partition("(")
    close = _matching(rest, -1)
    operands = re.findall(r"%([^\s,)]+)", rest[:close])
    return Instruction(name, shape, opcode.strip(), operands, rest[close + 1 :])


def _matching(text: str, open_index: int) -> int:
    """The index of the parenthesis closing the one at `open_index` (-1: one before text[0])."""
    depth = 0 if open_index >= 0 else 1
    for i in range(max(open_index, 0), len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"Unbalanced parentheses in HLO: {text[:200]!r}")


def parse_computations(hlo: str) -> tuple[dict[str, list[Instruction]], str]:
    """The module's computations (name -> instructions, in text order) and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (match := _INSTRUCTION.match(line)):
            current.append(_split_instruction(match.group(1), match.group(2)))
    if entry is None:
        raise ValueError("No ENTRY computation in the HLO text.")
    return computations, entry


def _callees(instruction: Instruction) -> list[str]:
    branches = [re.findall(r"%([\w.\-]+)", group) for group in _BRANCHES.findall(instruction.attributes)]
    return _CALLEE.findall(instruction.attributes) + [name for group in branches for name in group]


def _trip_count(instruction: Instruction) -> int | None:
    match = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instruction.attributes)
    return int(match.group(1)) if match else None


def _weights(computations: dict[str, list[Instruction]], entry: str) -> tuple[dict[str, float], set[str], int]:
    """(how many times each computation runs per step, the fused computations, loops of unknown trip count)."""
    weights: dict[str, float] = collections.defaultdict(float, {entry: 1.0})
    fused, unknown = set(), 0
    # Callers follow their callees in HLO text, so in reverse order every caller's weight is final when read.
    for name in reversed(list(computations)):
        for instruction in computations[name]:
            repeat = 1
            if instruction.opcode == "while":
                trip = _trip_count(instruction)
                unknown += trip is None and weights[name] > 0
                repeat = trip or 1
            for callee in _callees(instruction):
                weights[callee] += weights[name] * repeat
                if instruction.opcode == "fusion":
                    fused.add(callee)
    return weights, fused, unknown


def _group_size(attributes: str, num_devices: int) -> int:
    """The size of a collective's replica groups, in any of XLA's three notations; all devices when empty."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if mesh:
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes[name] for name in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=", attributes)
    if iota:
        return int(iota.group(1).split(",")[-1])
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
    return len(explicit.group(1).split(",")) if explicit else num_devices


def _sent_bytes(kind: str, operand: float, result: float, n: int) -> float:
    share = (n - 1) / n
    return {
        "all-reduce": 2 * share * operand,
        "all-gather": share * result,
        "reduce-scatter": share * operand,
        "all-to-all": share * operand,
        "collective-permute": operand,
    }[kind]


def _dot_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    lhs = [int(d) for d in _ARRAY.search(shapes[instruction.operands[0]]).group(2).split(",") if d]
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes)
    size = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
    elements = math.prod(int(d) for d in _ARRAY.search(instruction.shape).group(2).split(",") if d)
    return 2.0 * elements * size


def analyze(hlo: str, num_devices: int) -> HloStats:
    """Per-device FLOPs, bytes accessed and collectives of one run of the module in `hlo` (see the docstring)."""
    computations, entry = parse_computations(hlo)
    weights, fused, unknown = _weights(computations, entry)
    shapes = {i.name: i.shape for instructions in computations.values() for i in instructions}
    flops, traffic = 0.0, 0.0
    collectives = {kind: CollectiveStats() for kind in COLLECTIVES}
    for name, instructions in computations.items():
        weight = weights[name]
        for instruction in instructions:
            operand_bytes = sum(shape_bytes(shapes[o]) for o in instruction.operands if o in shapes)
            if instruction.opcode == "dot":
                flops += weight * _dot_flops(instruction, shapes)
            if name not in fused and instruction.opcode not in _NO_TRAFFIC:
                traffic += weight * (operand_bytes + shape_bytes(instruction.shape))
            kind = instruction.opcode.removesuffix("-start")
            if kind not in COLLECTIVES:
                continue
            n = _group_size(instruction.attributes, num_devices)
            result = shape_bytes(instruction.shape)
            if instruction.opcode.endswith("-start"):  # Async: the result shape holds operands and results.
                result -= operand_bytes
            stats = collectives[kind]
            stats.count += int(weight)
            stats.operand_bytes += weight * operand_bytes
            stats.result_bytes += weight * result
            stats.sent_bytes += weight * _sent_bytes(kind, operand_bytes, result, n)
    return HloStats(flops, traffic, collectives, unknown)
