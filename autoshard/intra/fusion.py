"""XLA's fusion as the cost and memory models see it: which values never reach memory,
which are written once for the large reductions that read them, and into how many fusions
an op is duplicated."""
from __future__ import annotations

import math

from autoshard.ir.program import Literal, per_program

from .op_rules import FUSIBLE, FUSING_CONSUMERS, fusible, fusing_consumer

#: reductions XLA fuses elementwise producers into
REDUCTIONS = FUSING_CONSUMERS - FUSIBLE
#: elements from which XLA's CPU backend runs a reduction as a library fusion (YNNPACK),
#: which takes an elementwise producer only when nothing else reads it (measured on jax
#: 0.10: beside ``(x - m) * s``, ``sum((x - m) ** 2)`` over 64×64 reads a difference
#: written once; over 32×32 it recomputes it, as the product's loop fusion does)
REDUCTION_LIBRARY_ELEMENTS = 4096

#: elementwise ops XLA's fusion does not duplicate into several consumers (its
#: ``IsExpensive``): their value is written to memory once and read by each
EXPENSIVE = frozenset("""
acos acosh asin asinh atan atan2 atanh cbrt cos cosh digamma div erf erf_inv erfc exp exp2
expm1 igamma igammac lgamma log log1p logistic polygamma pow rem rsqrt sin sinh sqrt tan
tanh zeta
""".split())


def fused_values(program) -> tuple[frozenset[int], frozenset[int]]:
    """Values XLA's fusion keeps out of memory traffic, as (fused, read_in_fusion).

    ``fused``: made by a fusible equation (``op_rules.fusible``), read only by fusing
    consumers (``op_rules.fusing_consumer``; at least one; exactly one where the equation
    is ``EXPENSIVE``), and not a program output: no
    memory traffic for the equations that make or read them. ``read_in_fusion``: the same
    but a program output (an optimizer's new moments): XLA's multi-output fusion writes it
    once and its readers in the fusion take it from there, so only the write is traffic."""
    fused, read_in_fusion, _, _ = fusion(program)
    return fused, read_in_fusion


def fusion_fanout(program) -> dict[int, int]:
    """Per fused value: into how many fusions XLA duplicates the equation that makes it
    (the fusion roots its value reaches through fused consumers). That equation's
    materialized operands are read once per such fusion."""
    return fusion(program)[2]


def unwritten(analysis, v: int) -> bool:
    """Whether XLA never writes value ``v`` to memory (``analysis``: :func:`fusion`'s
    result): fused into its readers, and no copy written for the reductions among them."""
    fused, _, _, written = analysis
    return v in fused and v not in written


def read_in_registers(analysis, v: int, reader: int | None) -> bool:
    """Whether equation ``reader`` (an index; None: not one of the program's) computes
    value ``v`` inside its own fusion and reads none of it from memory (``analysis``:
    :func:`fusion`'s result); a reduction that reads the copy written for it does read."""
    fused, read_in_fusion, _, written = analysis
    return (v in fused or v in read_in_fusion) and reader not in written.get(v, ())


def value_readers(program) -> tuple[dict[int, list], frozenset[int]]:
    """(value id → the equations reading it, in program order; the program's output
    value ids)."""
    consumers: dict[int, list] = {}
    for eqn in program.eqns:
        for atom in eqn.inputs:
            if not isinstance(atom, Literal):
                consumers.setdefault(atom, []).append(eqn)
    return consumers, frozenset(v for v in program.outvars if not isinstance(v, Literal))


def _reduced_only(program, consumers) -> set[int]:
    """Values made by a fusible equation (``op_rules.fusible``) whose one reader is a
    reduction or makes such a value: XLA computes them inside the reduction's fusion."""
    found: set[int] = set()
    for eqn in reversed(program.eqns):  # readers first
        if not fusible(eqn):
            continue
        for v in eqn.outputs:
            readers = {id(c): c for c in consumers.get(v, ())}
            if len(readers) == 1:
                (c,) = readers.values()
                if _into_reduction(c, found):
                    found.add(v)
    return found


def _into_reduction(eqn, reduced_only) -> bool:
    return eqn.primitive.name in REDUCTIONS or \
        bool(eqn.outputs) and all(o in reduced_only for o in eqn.outputs)


@per_program
def fusion(program) -> tuple[frozenset[int], frozenset[int], dict[int, int],
                             dict[int, frozenset[int]]]:
    """``(fused, read_in_fusion)`` as :func:`fused_values`, the fan-out per fused value as
    :func:`fusion_fanout`, and ``written``: fused values that XLA also writes to memory
    once for the large reductions among their readers (value id → the equations that read
    that copy: a reduction, or an equation fused into one). XLA's CPU reduction library
    fusion (from ``REDUCTION_LIBRARY_ELEMENTS``) takes a producer only when nothing else
    reads it, so a value a reduction shares with another reader (a normalization's
    ``x - mean``, read by its variance and by the normalized value) is written once for
    the reduction while the other readers' loop fusions still recompute it; a value made
    only from smaller operands (a broadcast) is recomputed by the reduction too."""
    consumers, outputs = value_readers(program)
    reduced_only = _reduced_only(program, consumers)
    index = {id(eqn): e for e, eqn in enumerate(program.eqns)}
    fused, read_in_fusion = set(), set()
    written: dict[int, frozenset[int]] = {}
    expanded: set[int] = set()  # fused values computed from small operands only (broadcasts)
    for eqn in program.eqns:
        if not fusible(eqn):
            continue
        for v in eqn.outputs:
            readers = consumers.get(v, ())
            if len(readers) > 1 and eqn.primitive.name in EXPENSIVE:
                continue  # not duplicated: written once
            if readers and all(fusing_consumer(c) for c in readers):
                (read_in_fusion if v in outputs else fused).add(v)
                size = math.prod(program.avals[v].shape)
                if all(isinstance(a, Literal) or a in expanded or
                       math.prod(program.avals[a].shape) < size for a in eqn.inputs):
                    expanded.add(v)  # a reduction's fusion recomputes it too
                    continue
                distinct = {id(c): c for c in readers}
                if v in fused and len(distinct) > 1 and size >= REDUCTION_LIBRARY_ELEMENTS:
                    reducing = frozenset(index[k] for k, c in distinct.items()
                                         if _into_reduction(c, reduced_only))
                    if reducing:
                        written[v] = reducing
    return frozenset(fused), frozenset(read_in_fusion), _fanout(program, fused, consumers,
                                                                 written, index), written


def _fanout(program, fused, consumers, written, index) -> dict[int, int]:
    """Per fused value, the distinct fusions it is computed in: the fusion roots (readers
    that make no fused value) it reaches through fused readers, each counted once however
    many paths lead there (a normalization's input reaches the one fusion of its output
    through its mean, its variance and itself), plus one for a written copy. Measured on
    jax 0.10 (CPU): a GPT's embedding sum reaches 8 fusions by 36 paths."""
    roots: dict[int, frozenset[int]] = {}
    for eqn in reversed(program.eqns):  # readers come later: their roots are known
        for v in eqn.outputs:
            if v not in fused:
                continue
            reading = written.get(v, frozenset())  # they all read the one written copy
            found: set[int] = {-1} if reading else set()
            for c in consumers[v]:
                e = index[id(c)]
                if e in reading:
                    continue
                for o in c.outputs:
                    found.update(roots[o] if o in roots else (e,))
            roots[v] = frozenset(found)
    return {v: len(r) for v, r in roots.items()}
