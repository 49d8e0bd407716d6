"""Arithmetic of one equation by its sharding rule: what stage balancing, recomputation
and the pricing of ``shard_map`` bodies count."""
from __future__ import annotations

import math

from .op_rules import loop_op


def eqn_flops(program, eqn) -> float:
    """Flops of ``eqn`` of ``program`` (:func:`op_flops` with the program's avals)."""
    in_avals = [program.avals[a] if isinstance(a, int) else None for a in eqn.inputs]
    return op_flops(eqn, in_avals, [program.avals[v] for v in eqn.outputs])


def op_flops(eqn, in_avals, out_avals) -> float:
    """Flops of ``eqn`` (of our programs or of jax's) read with ``in_avals`` and
    ``out_avals`` (None for a literal operand), by its rule; its outputs' size where it
    has none."""
    try:
        op = loop_op(eqn, in_avals, out_avals)
    except Exception:  # noqa: BLE001 - a rule that cannot read this eqn: size is enough here
        op = None
    if op is not None and op.flops:
        return float(op.flops)
    return float(sum(math.prod(getattr(a, "shape", ())) for a in out_avals))
