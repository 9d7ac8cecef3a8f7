"""Collective bytes per device and step, counted in HLO text, for a target platform one cannot compile for.

Collectives reach a program by two roads. The explicit ones (shard_map's `all_to_all`, `psum`, ...) are in
the module `.lower()` gives, and a lowering may pick them per platform (an expert exchange can be a
`ragged_all_to_all` on TPU and a padded `all_to_all` on CPU). The others (FSDP's weight all-gathers, the
gradients' reduce-scatters) are inserted by XLA's SPMD partitioner, the same pass on every platform, so they
exist only in a compiled module. `compile_partitioned` keeps the module as the partitioner leaves it, before
XLA:CPU's own passes rewrite its collectives (widening bf16 ones to fp32, fusing a reduce-scatter's slice
away, combining all-reduces), and `retarget` swaps the explicit collectives of this platform's lowering for
those of the target platform's.

Bytes per device, per execution of the module: an all-gather counts its result (the whole gathered array),
a reduce-scatter, all-reduce and all-to-all their operand (what a device puts in); a ragged-all-to-all, under
all-to-all, the smaller of its operand and its output buffer: what it moves depends on the data, but a device
sends at most its operand and receives at most its output, and all devices together send what they receive,
so this bounds the mean over devices (an expert exchange's buffers are sized for the worst routing). A
collective within groups of one device moves nothing and counts zero. An all-reduce whose result is only ever
sliced down to one group member's share is the partitioner's form of a reduce-scatter (TPU and GPU compilers
make it one) and counts as one. A collective in a while loop (a scan over layers or micro-batches) counts once
per iteration, unless it is loop-invariant, which XLA's loop-invariant code motion hoists out of the loop:
then once. Of a conditional's branches, the costliest counts. What a TPU compiler does beyond that (combining
collectives, overlapping them, perhaps sinking a loop's gradient reduction out of it) is not modelled.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import re
import tempfile
from typing import Any, NamedTuple

import jax

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce")
_KIND = {"all-to-all": "all-to-all", "ragged-all-to-all": "all-to-all", "all-gather": "all-gather",
         "reduce-scatter": "reduce-scatter", "all-reduce": "all-reduce"}
_SAME_VALUES = ("copy", "bitcast", "reshape", "convert")  # ops a reduce-scatter's slice may be found behind
_NEVER_HOISTED = ("parameter", "rng", "rng-bit-generator", "custom-call", "infeed", "outfeed", "send", "recv")
_ARRAY = re.compile(r"\b([a-z]+)(\d*)[a-z0-9]*\[([^\]]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)")
_CALLED = re.compile(r"\b(?:to_apply|calls|true_computation|false_computation)=%?([^\s,}]+)"
                     r"|\b(?:called_computations|branch_computations)=\{([^}]*)\}")


class Instruction(NamedTuple):
    name: str
    shape: str      # the result's shape text: one array, or a tuple of them
    opcode: str
    operands: list[str]
    attributes: str


class Module(NamedTuple):
    computations: dict[str, list[Instruction]]
    roots: dict[str, str]
    entry: str
    by_name: dict[str, Instruction]
    users: dict[str, list[Instruction]]
    partitions: int | None


def _arrays(shape: str):
    """(bits per element, elements) of each array in an HLO shape (`bf16[4,8]{1,0}` or a tuple of such): the
    bits are the dtype name's number (f32, bf16, s4, f8e4m3fn), pred is a byte; a dynamic dimension counts at
    its bound."""
    for name, bits, dims in _ARRAY.findall(shape):
        yield 8 if name == "pred" else int(bits or 0), math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d)


def shape_bytes(shape: str) -> int:
    return sum(-(-bits * elements // 8) for bits, elements in _arrays(shape))


def _elements(shape: str) -> int:
    return sum(elements for _, elements in _arrays(shape))


def _closing(text: str, start: int) -> int:
    """The index just past the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, "{": 1, ")": -1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced brackets in {text[:200]!r}")


def _instruction(line: str) -> tuple[bool, Instruction] | None:
    """(whether it is its computation's root, the instruction) of one line of HLO text; None for others."""
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    root, name, rest = match.groups()
    rest = re.sub(r"/\*.*?\*/", "", rest)
    shape_end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    opcode = re.match(r"\s*([\w-]+)\(", rest[shape_end:])
    if opcode is None:
        return None
    open_at = shape_end + opcode.end() - 1
    close_at = _closing(rest, open_at)
    operands = [o.strip().lstrip("%") for o in rest[open_at + 1:close_at - 1].split(",") if o.strip()]
    return bool(root), Instruction(name, rest[:shape_end], opcode.group(1), operands, rest[close_at:])


def parse(text: str) -> Module:
    """An HLO module's text (`Lowered.as_text(dialect="hlo")`, or an XLA dump) as computations of
    instructions."""
    computations, roots, entry, current = {}, {}, None, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{") and not line.startswith("HloModule"):
            current = _HEADER.match(line).group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and (parsed := _instruction(line)) is not None:
            is_root, instruction = parsed
            computations[current].append(instruction)
            roots.update({current: instruction.name} if is_root else {})
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    by_name = {i.name: i for body in computations.values() for i in body}
    users: dict[str, list[Instruction]] = {}
    for instruction in by_name.values():
        for operand in dict.fromkeys(instruction.operands):
            users.setdefault(operand, []).append(instruction)
    partitions = re.search(r"num_partitions=(\d+)", text)
    return Module(computations, roots, entry, by_name, users, int(partitions.group(1)) if partitions else None)


def group_size(instruction: Instruction, partitions: int | None) -> int | None:
    """Devices per replica group: from explicit groups `{{0,1},{2,3}}`, the iota form `[2,4]<=[8]`, or the
    mesh form `mesh['a'=2,'b'=4] {'b'}`; `{}` (one group of all) is the module's partition count."""
    attributes = instruction.attributes
    if (mesh := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)) is not None:
        sizes = {axis: int(size) for axis, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes[axis] for axis in re.findall(r"'([^']+)'", mesh.group(2)))
    if (iota := re.search(r"replica_groups=\[\d+,(\d+)\]<=", attributes)) is not None:
        return int(iota.group(1))
    if (groups := re.search(r"replica_groups=\{\{([^}]*)\}", attributes)) is not None:
        return len(groups.group(1).split(","))
    return partitions


def _only_sliced(module: Module, name: str, elements: int, index: int | None = None) -> bool:
    """Whether every use of value `name` (of its tuple element `index`) is, behind copies, reshapes and
    tuples, a dynamic-slice of `elements` elements."""
    users = [u for u in module.users.get(name, [])
             if index is None or u.opcode != "get-tuple-element" or f"index={index}," in u.attributes + ","]
    if not users:
        return False
    for user in users:
        if user.opcode == "dynamic-slice":
            ok = _elements(user.shape) == elements
        elif user.opcode in _SAME_VALUES or (user.opcode == "get-tuple-element" and index is not None):
            ok = _only_sliced(module, user.name, elements)
        elif user.opcode == "tuple":
            ok = all(_only_sliced(module, user.name, elements, position)
                     for position, operand in enumerate(user.operands) if operand == name)
        else:
            ok = False
        if not ok:
            return False
    return True


def _own_bytes(module: Module, instruction: Instruction) -> tuple[str, int] | None:
    """(kind, bytes per device) of a collective instruction; None for any other."""
    kind = _KIND.get(instruction.opcode)
    if kind is None:
        return None
    group = group_size(instruction, module.partitions)
    if group == 1:
        return kind, 0
    if kind == "all-reduce" and group and _only_sliced(module, instruction.name, _elements(instruction.shape) // group):
        kind = "reduce-scatter"
    if instruction.opcode == "ragged-all-to-all":
        return kind, min(shape_bytes(module.by_name[instruction.operands[0]].shape), shape_bytes(instruction.shape))
    if instruction.opcode == "reduce-scatter":
        return kind, sum(shape_bytes(module.by_name[o].shape) for o in instruction.operands)
    return kind, shape_bytes(instruction.shape)  # an all-gather's result; the others' result is their operand


def _called(instruction: Instruction) -> list[str]:
    names = []
    for single, listed in _CALLED.findall(instruction.attributes):
        names += [single] if single else [n.strip().lstrip("%") for n in listed.split(",") if n.strip()]
    return names


def _attribute(instruction: Instruction, key: str) -> str:
    return re.search(rf"\b{key}=%?([^\s,]+)", instruction.attributes).group(1)


def trip_count(module: Module, loop: Instruction) -> int | None:
    """Iterations of a while loop whose condition is `counter < N` (or `N > counter`) on a counter that
    starts at a constant, as scans are; None when they depend on data."""
    root = module.by_name[module.roots[_attribute(loop, "condition")]]
    direction = re.search(r"direction=(\w+)", root.attributes)
    if root.opcode != "compare" or direction is None or direction.group(1) not in ("LT", "GT"):
        return None
    counter, limit = (module.by_name[o] for o in root.operands[::1 if direction.group(1) == "LT" else -1])
    if counter.opcode != "get-tuple-element" or limit.opcode != "constant":
        return None
    init = module.by_name[loop.operands[0]]
    if init.opcode != "tuple":
        return None
    start = module.by_name[init.operands[int(re.search(r"index=(\d+)", counter.attributes).group(1))]]
    return max(int(limit.operands[0]) - int(start.operands[0]), 0) if start.opcode == "constant" else None


def loop_invariant(module: Module, body: str) -> set[str]:
    """The instructions of a while body that compute the same value in every iteration: from the loop state
    elements the body passes on unchanged, and constants, through anything but side effects."""
    parameter = next(i for i in module.computations[body] if i.opcode == "parameter")
    root = module.by_name[module.roots[body]]
    passed_on = root.operands if root.opcode == "tuple" else []
    invariant = set()
    for instruction in module.computations[body]:  # HLO text lists operands before their users
        if instruction.opcode == "get-tuple-element" and instruction.operands == [parameter.name]:
            index = int(re.search(r"index=(\d+)", instruction.attributes).group(1))
            if index < len(passed_on) and passed_on[index] == instruction.name:
                invariant.add(instruction.name)
        elif instruction.opcode not in _NEVER_HOISTED and all(o in invariant for o in instruction.operands
                                                              if o in module.by_name):
            invariant.add(instruction.name)
    return invariant


def collective_bytes(text: str) -> dict[str, int]:
    """Bytes per device that one execution of the HLO module `text` moves, by kind (KINDS; the conventions
    are the module docstring's)."""
    module = parse(text)
    zero = (0,) * len(KINDS)

    def add(*counts):
        return tuple(map(sum, zip(zero, *counts)))

    @functools.cache
    def of(computation: str) -> tuple[int, ...]:
        return add(*(cost(instruction) for instruction in module.computations[computation]))

    def cost(instruction: Instruction) -> tuple[int, ...]:
        own = _own_bytes(module, instruction)
        counts = [tuple(own[1] if kind == own[0] else 0 for kind in KINDS)] if own else []
        called = [of(name) for name in _called(instruction) if name in module.computations]
        if instruction.opcode == "conditional" and called:
            called = [tuple(map(max, zip(*called)))]
        if instruction.opcode == "while":
            called.append(loop(instruction))
        return add(*counts, *called)

    def loop(instruction: Instruction) -> tuple[int, ...]:
        body = _attribute(instruction, "body")
        invariant = loop_invariant(module, body)
        every = add(*(cost(i) for i in module.computations[body] if i.name not in invariant))
        once = add(*(cost(i) for i in module.computations[body] if i.name in invariant))
        if not any(every):
            return once
        trips = trip_count(module, instruction)
        if trips is None:
            raise ValueError(f"collectives in the while loop {instruction.name}, whose trip count depends on data")
        return add(tuple(trips * count for count in every), once if trips else zero)

    return dict(zip(KINDS, of(module.entry)))


def retarget(partitioned: str, lowered_here: str, lowered_there: str) -> dict[str, int]:
    """Collective bytes of a program on the platform `lowered_there` was lowered for: those of `partitioned`
    (compiled here), with the explicit collectives of this platform's lowering (`lowered_here`) exchanged for
    the target's. All three are HLO text; the lowered ones hold only the explicit collectives."""
    partitioned, here, there = (collective_bytes(text) for text in (partitioned, lowered_here, lowered_there))
    return {kind: partitioned[kind] - here[kind] + there[kind] for kind in KINDS}


def compile_partitioned(lowered) -> tuple[Any, str]:
    """(`lowered.compile()`, the HLO text of its module as XLA's SPMD partitioner leaves it), from the
    compiler's dump of that pipeline's last pass: nothing else shows a module between partitioning and the
    platform's own passes. A program on one device is not partitioned: its module is the lowered one."""
    with tempfile.TemporaryDirectory() as directory:
        compiled = lowered.compile(compiler_options={
            "xla_dump_to": directory, "xla_dump_hlo_pipeline_re": "spmd-partitioner",
            "xla_dump_hlo_pass_re": "call-inliner", "xla_dump_disable_metadata": True})
        dumps = glob.glob(os.path.join(directory, "*.spmd-partitioner.after_call-inliner.*.txt"))
        if dumps:
            with open(max(dumps, key=lambda path: int(re.search(r"\.(\d+)\.spmd-partitioner\.", path).group(1)))) as f:
                return compiled, f.read()
    if max((len(s.device_set) for s in jax.tree.leaves(compiled.input_shardings)), default=1) > 1:
        raise RuntimeError("XLA dumped no module after SPMD partitioning")
    return compiled, lowered.as_text(dialect="hlo")
