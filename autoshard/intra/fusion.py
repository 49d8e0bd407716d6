"""XLA's fusion as the cost and memory models see it: which values never reach memory, and
into how many fusions an op is duplicated."""
from __future__ import annotations

from autoshard.ir.program import Literal

from .op_rules import FUSIBLE, FUSING_CONSUMERS

#: elementwise ops XLA's fusion does not duplicate into several consumers (its
#: ``IsExpensive``): their value is written to memory once and read by each
EXPENSIVE = frozenset("""
acos acosh asin asinh atan atan2 atanh cbrt cos cosh digamma div erf erf_inv erfc exp exp2
expm1 igamma igammac lgamma log log1p logistic polygamma pow rem rsqrt sin sinh sqrt tan
tanh zeta
""".split())


def fused_values(program) -> tuple[frozenset[int], frozenset[int]]:
    """Values XLA's fusion keeps out of memory traffic, as (fused, read_in_fusion).

    ``fused``: made by a ``FUSIBLE`` equation, read only by ``FUSING_CONSUMERS`` (at least
    one; exactly one where the equation is ``EXPENSIVE``), and not a program output: no
    memory traffic for the equations that make or read them. ``read_in_fusion``: the same
    but a program output (an optimizer's new moments): XLA's multi-output fusion writes it
    once and its readers in the fusion take it from there, so only the write is traffic."""
    fused, read_in_fusion, _ = fusion(program)
    return fused, read_in_fusion


def fusion_fanout(program) -> dict[int, int]:
    """Per fused value: into how many fusions XLA duplicates the equation that makes it
    (the fusion roots its value reaches through fused consumers). That equation's
    materialized operands are read once per such fusion."""
    return fusion(program)[2]


def value_readers(program) -> tuple[dict[int, list], frozenset[int]]:
    """(value id → the equations reading it, in program order; the program's output
    value ids)."""
    consumers: dict[int, list] = {}
    for eqn in program.eqns:
        for atom in eqn.inputs:
            if not isinstance(atom, Literal):
                consumers.setdefault(atom, []).append(eqn)
    return consumers, frozenset(v for v in program.outvars if not isinstance(v, Literal))


def fusion(program) -> tuple[frozenset[int], frozenset[int], dict[int, int]]:
    """``(fused_values(program), fusion_fanout(program))`` in one pass:
    (fused, read_in_fusion, fan-out per fused value)."""
    consumers, outputs = value_readers(program)
    fused, read_in_fusion = set(), set()
    for eqn in program.eqns:
        if eqn.primitive.name not in FUSIBLE:
            continue
        for v in eqn.outputs:
            readers = consumers.get(v, ())
            if len(readers) > 1 and eqn.primitive.name in EXPENSIVE:
                continue  # not duplicated: written once
            if readers and all(c.primitive.name in FUSING_CONSUMERS for c in readers):
                (read_in_fusion if v in outputs else fused).add(v)
    fanout: dict[int, int] = {}
    for eqn in reversed(program.eqns):  # consumers come later: their fan-out is known
        for v in eqn.outputs:
            if v in fused:
                fanout[v] = sum(max((fanout.get(o, 1) for o in c.outputs), default=1)
                                for c in consumers[v])
    return frozenset(fused), frozenset(read_in_fusion), fanout
