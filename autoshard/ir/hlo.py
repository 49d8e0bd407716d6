"""Reading a compiled (partitioned, per-device) XLA program: collectives, flops, memory.

Everything here is independent of autoshard's own cost model: it reads what XLA
actually produced for one device of the SPMD program.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

import numpy as np

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


# --------------------------------------------------------------------------- per-collective
# One record per collective instruction, with its replica groups, for the yardstick
# (benchmarks/yardstick.py). Device ids in replica groups are the SPMD program's logical
# ids (partition ids), which jax assigns row-major over the mesh's devices array, so id i
# sits at mesh coordinate np.unravel_index(i, mesh_shape).

# `%name = <shape> <opcode>(operands), attributes` for every instruction: the shapes of
# operands are looked up by name (compiled HLO text prints operands as bare `%name`).
#: any instruction line: ``%name = <result shape> <opcode>(``
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
                        r"(?P<op>[a-z][\w\-]*)\(")
_IOTA_GROUPS = re.compile(r"^\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_MESH_GROUPS = re.compile(r"^mesh\[(?P<axes>[^\]]*)\]"
                          r"(?:,\s*device_ids=\((?P<ids>[^{}]*?)\))?\s*\{(?P<group>[^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled HLO module (an async ``-start``/``-done`` pair once).

    kind:          one of ``COLLECTIVE_KINDS``.
    name:          the instruction's name.
    result_bytes:  bytes of its outputs (tuple elements summed; a ``-start``'s operand
                   aliases and scratch left out).
    operand_bytes: bytes of its operands (looked up by name; ``None`` if not found).
    groups:        replica groups as tuples of device ids (``()`` when the text gives
                   none: one group of every device), or, for collective-permute, the
                   ``(source, target)`` pairs.
    operands:      how many arrays it moves (more than one: a combined collective).
    """

    kind: str
    name: str
    result_bytes: int
    operand_bytes: int | None
    groups: tuple[tuple[int, ...], ...]
    operands: int = 1

    def group_size(self, num_devices: int) -> int:
        """Devices per replica group (2 for a collective-permute)."""
        if self.kind == "collective-permute":
            return 2
        return len(self.groups[0]) if self.groups else num_devices

    def axes(self, mesh_shape) -> tuple[int, ...]:
        """Indices of the mesh axes this collective spans (coordinates that vary)."""
        return group_axes(self.groups, mesh_shape)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _iota(dims, reshape, perm) -> np.ndarray:
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    if perm:
        ids = ids.transpose(perm)
    return ids.reshape(dims)


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in {text[start:start + 80]!r}")


def parse_replica_groups(text: str, num_devices: int | None = None) -> tuple[tuple[int, ...], ...]:
    """Replica groups from the text after ``replica_groups=`` (rest of the line is fine).

    Three forms (XLA prints whichever is shortest):

    * explicit ``{{0,1},{2,3}}`` (``{}``: one group of all devices, returned as ``()``);
    * iota ``[G,S]<=[d0,d1,...]T(p...)``: ``iota(prod d).reshape(d).transpose(p)
      .reshape(G, S)``, one group per row;
    * mesh axes (jax 0.10 / Shardy) ``mesh['a'=2,'b'=4] {'a'}`` or with a device order
      ``mesh['a'=4,'b'=2], device_ids=([2,2,2]T(0,2,1)) {'a':(2)2}``: the devices laid
      out on XLA's own mesh (iota unless ``device_ids`` is given, as an iota
      ``[reshape]T(perm)`` or an explicit list), one group per combination of the axes
      *not* listed; ``'a':(p)s`` is the sub-axis of size ``s`` of axis ``a`` whose major
      sub-axes multiply to ``p``.
    """
    text = text.strip()
    if text.startswith("{"):
        body = text[:_balanced(text, 0)]
        groups = tuple(tuple(_ints(g)) for g in re.findall(r"\{([0-9,\s]*)\}", body[1:-1]))
        return tuple(g for g in groups if g)
    m = _IOTA_GROUPS.match(text)
    if m:
        dims = _ints(m.group(1))
        ids = _iota(dims, _ints(m.group(2)), _ints(m.group(3) or ""))
        return tuple(tuple(int(i) for i in row) for row in ids.reshape(dims[0], -1))
    m = _MESH_GROUPS.match(text)
    if m:
        return _mesh_axes_groups(m.group("axes"), m.group("ids"), m.group("group"))
    raise ValueError(f"unrecognised replica_groups: {text[:120]!r}")


def _mesh_axes_groups(axes_text: str, ids_text: str | None, group_text: str):
    names, sizes = [], []
    for item in filter(None, (t.strip() for t in axes_text.split(","))):
        name, size = item.rsplit("=", 1)
        names.append(name.strip().strip("'\""))
        sizes.append(int(size))
    n = math.prod(sizes)
    if ids_text is None or not ids_text.strip():
        devices = np.arange(n).reshape(sizes)
    else:
        ids_text = ids_text.strip()
        m = re.match(r"^\[([0-9,]+)\](?:T\(([0-9,]+)\))?$", ids_text)
        if m:
            devices = _iota(sizes, _ints(m.group(1)), _ints(m.group(2) or ""))
        else:
            devices = np.array(_ints(ids_text.replace("[", ",").replace("]", ","))).reshape(sizes)
    # Each listed axis (or sub-axis) is a run of factors of its mesh axis; split every axis
    # at the sub-axis boundaries (pre-sizes counted from the major end).
    refs = []
    for item in filter(None, (t.strip() for t in group_text.split(","))):
        m = re.match(r"^['\"]?([^'\":]+)['\"]?(?::\((\d+)\)(\d+))?$", item)
        if m is None:
            raise ValueError(f"unrecognised mesh axis {item!r} in replica groups")
        axis = names.index(m.group(1))
        pre, size = (int(m.group(2)), int(m.group(3))) if m.group(2) else (1, sizes[axis])
        refs.append((axis, pre, size))
    fine_sizes, grouped = [], []
    for axis, full in enumerate(sizes):
        cuts = {1, full}
        for a, pre, size in refs:
            if a == axis:
                cuts.update((pre, pre * size))
        cuts = sorted(cuts)
        for lo, hi in zip(cuts, cuts[1:]):
            if any(a == axis and pre <= lo and hi <= pre * size for a, pre, size in refs):
                grouped.append(len(fine_sizes))
            fine_sizes.append(hi // lo)
    fine = devices.reshape(fine_sizes)
    rest = [i for i in range(len(fine_sizes)) if i not in grouped]
    group_size = math.prod(fine_sizes[i] for i in grouped)
    rows = fine.transpose(rest + grouped).reshape(-1, group_size)
    return tuple(tuple(int(i) for i in row) for row in rows)


def group_axes(groups, mesh_shape) -> tuple[int, ...]:
    """Mesh axes (indices) along which the devices of any group differ.

    ``groups`` are replica groups (device-id tuples, ``()`` for all devices) or
    collective-permute ``(source, target)`` pairs; device id ``i`` is at coordinate
    ``np.unravel_index(i, mesh_shape)`` (row-major).
    """
    mesh_shape = tuple(int(s) for s in mesh_shape)
    if not groups:
        return tuple(i for i, s in enumerate(mesh_shape) if s > 1)
    varying: set[int] = set()
    for group in groups:
        coords = np.array(np.unravel_index(np.asarray(group), mesh_shape)).T   # [len, rank]
        varying.update(int(i) for i in np.flatnonzero((coords != coords[0]).any(axis=0)))
    return tuple(sorted(varying))


def operand_names(line: str, open_paren: int) -> list[str]:
    """The ``%names`` inside the parenthesised operand list opening at ``line[open_paren]``."""
    inner = line[open_paren + 1:_balanced(line, open_paren) - 1]
    return re.findall(r"%([\w.\-]+)", inner)


def parse_collectives(hlo_text: str) -> list[Collective]:
    """Every collective in a compiled HLO module, in text order.

    Async pairs count once (at ``-start``; a ``-start`` returns ``(operands, outputs[,
    scratch])`` except all-reduce-start, which returns the outputs). Tuple-shaped
    (combined) collectives count once with their elements' bytes summed. A collective
    inside a loop body counts once (static occurrences).
    """
    shapes: dict[str, str] = {}
    found = []
    for line in hlo_text.splitlines():
        m = INSTRUCTION.match(line)
        if m is None:
            continue
        shapes[m.group("name")] = m.group("shape")
        c = _INSTR.match(line)
        if c is None or c.group("suffix") == "-done":
            continue
        found.append((line, m, c))
    out = []
    for line, m, c in found:
        kind, shape = c.group("op"), c.group("shape")
        if c.group("suffix") == "-start" and kind != "all-reduce":
            elems = _top_level_elements(shape)
            if len(elems) >= 2:
                shape = elems[1]
        names = operand_names(line, c.end() - 1)
        try:
            operand_bytes = sum(shape_bytes(shapes[n]) for n in names) if names else None
        except KeyError:
            operand_bytes = None
        if kind == "collective-permute":
            pm = re.search(r"source_target_pairs=", line)
            groups = parse_replica_groups(line[pm.end():]) if pm else ()
        else:
            gm = re.search(r"replica_groups=", line)
            groups = parse_replica_groups(line[gm.end():]) if gm else ()
        out.append(Collective(kind=kind, name=m.group("name"), result_bytes=shape_bytes(shape),
                              operand_bytes=operand_bytes, groups=groups,
                              operands=max(1, len(names))))
    return out


def cost_analysis(compiled) -> dict[str, float]:
    """``compiled.cost_analysis()`` as one dict (some versions return a list of dicts, one
    per program: their numeric entries are summed); ``{}`` when unavailable."""
    try:
        ca: Any = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if ca is None:
        return {}
    if isinstance(ca, dict):
        ca = [ca]
    merged: dict[str, float] = {}
    for d in ca:
        if isinstance(d, dict):
            for k, v in d.items():
                if isinstance(v, (int, float)):
                    merged[k] = merged.get(k, 0.0) + float(v)
    return merged


class CompilerLog:
    """Text the compiler printed to the process's standard error (``.text``)."""

    text: str = ""


@contextlib.contextmanager
def compiler_log():
    """Capture what is written to file descriptor 2 (XLA's C++ warnings, such as
    "Involuntary full rematerialization") while the block runs; it is echoed to
    standard error afterwards, so nothing is hidden."""
    log = CompilerLog()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            log.text = sink.read().decode("utf-8", errors="replace")
            if log.text:
                sys.stderr.write(log.text)


def fresh_compile(lowered):
    """``(lowered.compile(), what XLA printed while compiling it)``, compiled afresh: jax
    hands back a program it compiled before (by a call, or an earlier ``compile()``)
    without compiling it again, so without XLA's warnings. The compile options differ per
    call in a limit no compile reads unless dumping (``xla_dump_max_hlo_modules``, over a
    billion), which makes jax's in-memory cache miss; the compiled program is the same.
    (jax's persistent compilation cache, where a user turns it on, leaves dump options out
    of its key: a program found there is loaded, not compiled, and its log is empty.)"""
    options = {"xla_dump_max_hlo_modules": 2**30 + time.monotonic_ns() % 2**30}
    with compiler_log() as log:
        compiled = lowered.compile(compiler_options=options)
    return compiled, log.text


def platform(compiled) -> str:
    """The platform (``"cpu"``, ``"gpu"``, ``"tpu"``) a ``jax.stages.Compiled`` runs on."""
    import jax
    for sharding in jax.tree_util.tree_leaves(compiled.input_shardings):
        return next(iter(sharding.device_set)).platform
    return jax.default_backend()
