"""The all-reduces of a compiled HLO module that a GPU backend runs as reduce-scatters.

XLA's SPMD partitioner writes a reduce-scatter as an all-reduce whose result each device
then dynamic-slices to its own part. The GPU pipeline turns that pair into one
reduce-scatter (its ``ReduceScatterCreator`` pass); the CPU pipeline has no such pass, so
a program compiled here for a GPU cluster shows the all-reduce (with the slice fused into
its readers). The yardstick prices those all-reduces as the reduce-scatters the cluster's
backend runs, for every program alike.
"""
from __future__ import annotations

import dataclasses
import re

from autoshard.ir import hlo

__all__ = ["sliced_all_reduces"]

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*->.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shape: str
    op: str
    operands: tuple[str, ...]
    calls: str | None
    parameter: int | None


def _computations(text: str) -> dict[str, list[_Instruction]]:
    found: dict[str, list[_Instruction]] = {}
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and " = " not in line.split("(", 1)[0]:
            current = found.setdefault(header.group("name"), [])
            continue
        m = hlo.INSTRUCTION.match(line)
        if m is None or current is None:
            continue
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        parameter = re.match(r"parameter\((\d+)\)", line[m.start("op"):])
        current.append(_Instruction(m.group("name"), m.group("shape"), m.group("op"),
                                    tuple(hlo.operand_names(line, m.end() - 1)),
                                    calls.group(1) if calls else None,
                                    int(parameter.group(1)) if parameter else None))
    return found


def _slices_only(value: str, readers: list[_Instruction], part_bytes: int) -> bool:
    """Every reader of ``value`` dynamic-slices it (as operand 0 alone) to ``part_bytes``."""
    return bool(readers) and all(
        r.op == "dynamic-slice" and r.operands[0] == value and value not in r.operands[1:]
        and hlo.shape_bytes(r.shape) == part_bytes for r in readers)


def sliced_all_reduces(hlo_text: str, group_size) -> frozenset[str]:
    """Names of the array all-reduces whose every reader keeps one ``group_size(name)``-th of
    the result by a dynamic-slice (directly, or inside the fusions that read it): the
    partitioner's reduce-scatters."""
    computations = _computations(hlo_text)
    found = set()
    for instructions in computations.values():
        for ar in instructions:
            if ar.op != "all-reduce" or ar.shape.startswith("("):
                continue
            part = hlo.shape_bytes(ar.shape) // max(group_size(ar.name), 1)
            readers = [r for r in instructions if ar.name in r.operands]
            if readers and all(_reads_a_slice(r, ar.name, part, computations) for r in readers):
                found.add(ar.name)
    return frozenset(found)


def _reads_a_slice(reader: _Instruction, value: str, part: int, computations) -> bool:
    if reader.op == "dynamic-slice":
        return _slices_only(value, [reader], part)
    if reader.op != "fusion" or reader.calls not in computations:
        return False
    body = computations[reader.calls]
    for k, operand in enumerate(reader.operands):
        if operand != value:
            continue
        parameter = next((i.name for i in body if i.parameter == k), None)
        if parameter is None or not _slices_only(
                parameter, [i for i in body if parameter in i.operands], part):
            return False
    return True
