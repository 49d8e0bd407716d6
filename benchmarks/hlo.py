"""Reading a compiled (partitioned, per-device) XLA program: collectives, flops, memory.

Everything here is independent of autoshard's own cost model: it reads what XLA
actually produced for one device of the SPMD program.
"""
from __future__ import annotations

import re
from typing import Any

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                    "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}

# `%name = <result shape> <opcode>(` — the result shape may be a (nested) tuple.
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?P<suffix>-start|-done)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+\w*)?)\[([0-9,]*)\]")


def _array_bytes(dtype: str, dims: str) -> int:
    if dtype.startswith("f8") or dtype.startswith("f4"):
        size = 1
    else:
        size = _DTYPE_BYTES.get(dtype)
        if size is None:  # token[] and friends carry no data
            return 0
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return size * n


def _top_level_elements(shape: str) -> list[str]:
    """Split a tuple shape ``(a, (b, c), d)`` into its top-level elements."""
    shape = shape.strip()
    if not shape.startswith("("):
        return [shape]
    inner = shape[1:shape.rfind(")")]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return [p.strip() for p in parts if p.strip()]


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (tuples summed)."""
    return sum(_array_bytes(m.group(1), m.group(2)) for m in _ARRAY.finditer(shape))


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
    """Count and result bytes of each collective kind in a compiled HLO module.

    Bytes are the size of each collective's result (dtype size × elements, summed
    over tuple elements). Asynchronous pairs are counted once, at ``-start``; the
    result of a ``-start`` is ``(operands, outputs[, scratch])``, so only its
    outputs are counted (all-reduce-start returns the outputs directly). Static
    occurrences are counted: a collective inside a loop body counts once.
    """
    stats = {k: {"count": 0, "bytes": 0} for k in COLLECTIVE_KINDS}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m is None or m.group("suffix") == "-done":
            continue
        shape = m.group("shape")
        if m.group("suffix") == "-start" and m.group("op") != "all-reduce":
            elems = _top_level_elements(shape)
            if len(elems) >= 2:
                shape = elems[1]
        stats[m.group("op")]["count"] += 1
        stats[m.group("op")]["bytes"] += shape_bytes(shape)
    return stats


def flops(compiled) -> float | None:
    """Per-device flops from ``compiled.cost_analysis()`` (a dict, or a list of dicts)."""
    try:
        ca: Any = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends don't implement it
        return None
    if ca is None:
        return None
    if isinstance(ca, (list, tuple)):
        values = [d.get("flops") for d in ca if isinstance(d, dict) and "flops" in d]
        return float(sum(values)) if values else None
    if isinstance(ca, dict):
        return float(ca["flops"]) if "flops" in ca else None
    return None


def memory(compiled) -> dict[str, int] | None:
    """Per-device bytes from ``compiled.memory_analysis()``: argument + output + temp − alias."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if ma is None:
        return None
    fields = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
              for k in ("argument", "output", "temp", "alias", "generated_code")}
    fields["total"] = fields["argument"] + fields["output"] + fields["temp"] - fields["alias"]
    return fields
