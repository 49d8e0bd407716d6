"""Arithmetic and memory traffic of equations and of the bodies they call: what stage
balancing, recomputation, ``shard_map`` regions and control flow run replicated count.

A body is counted as it runs once: a ``cond`` as its dearest branch, a ``scan`` as its
body times its length, a ``while`` as its condition and body once (its trip count is
not known before it runs; XLA's ``cost_analysis`` counts every loop so, a ``scan``
included)."""
from __future__ import annotations

import math

from .in_place import UPDATE_OPERAND, body_in_place, window_reads
from .op_rules import FUSIBLE, RULES, loop_op

#: body primitives that neither compute nor move data (type-level marks of jax's checks)
NO_OPS = frozenset({"pvary", "pbroadcast", "pcast"})

#: body primitives that communicate: (collective kind, the param naming the axes); their
#: sums are in their price, not in the body's arithmetic
COLLECTIVES = {
    "psum": ("all-reduce", "axes"), "psum_invariant": ("all-reduce", "axes"),
    "pmax": ("all-reduce", "axes"), "pmin": ("all-reduce", "axes"),
    "all_gather": ("all-gather", "axis_name"),
    "all_gather_invariant": ("all-gather", "axis_name"),
    "reduce_scatter": ("reduce-scatter", "axis_name"),
    "all_to_all": ("all-to-all", "axis_name"),
    "ppermute": ("collective-permute", "axis_name"),
}


def eqn_flops(program, eqn) -> float:
    """Flops of ``eqn`` of ``program`` (:func:`op_flops` with the program's avals)."""
    in_avals = [program.avals[a] if isinstance(a, int) else None for a in eqn.inputs]
    return op_flops(eqn, in_avals, [program.avals[v] for v in eqn.outputs])


def op_flops(eqn, in_avals, out_avals) -> float:
    """Flops of ``eqn`` (of our programs or of jax's) read with ``in_avals`` and
    ``out_avals`` (None for a literal operand), by its rule, as its strategies price it;
    where it has none, a call's or control flow's by its bodies (see the module
    docstring), else its outputs' size."""
    try:
        op = loop_op(eqn, in_avals, out_avals)
    except Exception:  # noqa: BLE001 - a rule that cannot read this eqn: size is enough here
        op = None
    if op is not None:  # (data movement: none, as XLA's cost analysis counts it)
        return float(op.flops)
    inner = inner_jaxprs(eqn)
    if inner:
        return _combined(eqn, [body_flops(j) for j in inner])
    return float(sum(math.prod(getattr(a, "shape", ())) for a in out_avals))


def inner_jaxprs(eqn) -> list:
    """The bodies ``eqn`` runs (a ClosedJaxpr's jaxpr, or a Jaxpr), in its params' order:
    a call's, control flow's, a ``shard_map``'s; none for an op with a sharding rule (a
    scatter's combining ``update_jaxpr`` is part of the op)."""
    if eqn.primitive.name in RULES:
        return []
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple) else (value,):  # cond's branches
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                found.append(inner)
    return found


def _combined(eqn, per_body: list[float]) -> float:
    """One run of ``eqn`` from its bodies' figures (see the module docstring)."""
    name = eqn.primitive.name
    if name == "cond":
        return max(per_body)
    if name == "scan":
        return eqn.params["length"] * sum(per_body)
    return sum(per_body)  # a call's body, a while's condition and body


def body_flops(jaxpr) -> float:
    """Arithmetic of one run of ``jaxpr`` (shapes as it has them), by each op's rule."""
    return sum(op_flops(eqn, [getattr(v, "aval", None) for v in eqn.invars],
                        [v.aval for v in eqn.outvars])
               for eqn in jaxpr.eqns
               if eqn.primitive.name not in NO_OPS and eqn.primitive.name not in COLLECTIVES)


def bodies_traffic(eqn) -> float:
    """:func:`body_traffic` of one run of the bodies ``eqn`` calls (0 for none); a loop's
    body writes its results (the carry, a scan's ys) each iteration, while a branch's or a
    call's results are the equation's own, written as it writes them."""
    inner = inner_jaxprs(eqn)
    loop = eqn.primitive.name in ("while", "scan")
    return _combined(eqn, [body_traffic(j, loop, owned_inputs_from(eqn, j))
                           for j in inner]) if inner else 0.0


def owned_inputs_from(eqn, jaxpr) -> int | None:
    """The first input of body ``jaxpr`` of ``eqn`` that the body may write over (a loop's
    carry, a scan's slices of its xs; ``in_place``); None: none may (a ``while``'s
    condition, a branch, a call)."""
    name, params = eqn.primitive.name, eqn.params
    if name == "scan" and jaxpr is params["jaxpr"].jaxpr:
        return params["num_consts"]
    if name == "while" and jaxpr is params["body_jaxpr"].jaxpr:
        return params["body_nconsts"]
    return None


def body_traffic(jaxpr, writes_results: bool = False, owned_from: int | None = None) -> float:
    """Memory bytes of one run of ``jaxpr``: its ops that XLA does not fuse into a consumer
    (dots, reductions, collectives...) read their operands and write their results, but
    for updates written in place (their window: ``in_place``; ``owned_from``: see
    :func:`owned_inputs_from`); with ``writes_results``, the fused ops making the body's
    results write them too (a loop's carry has no consumer to fuse into)."""
    results = {id(v) for v in jaxpr.outvars} if writes_results else set()
    in_place = body_in_place(jaxpr, len(jaxpr.invars) if owned_from is None else owned_from)
    total = 0.0
    for e, eqn in enumerate(jaxpr.eqns):
        total += window_traffic(eqn) if e in in_place else eqn_traffic(eqn)
        if eqn.primitive.name in FUSIBLE:  # fused, but a result it makes is written
            total += sum(value_bytes(v.aval) for v in eqn.outvars if id(v) in results)
    return total


def eqn_traffic(eqn) -> float:
    """Memory bytes of one run of body equation ``eqn`` whole: its bodies' (a call's,
    control flow's), none for a fused op or a no-op, else its operands and results."""
    if inner_jaxprs(eqn):
        return bodies_traffic(eqn)
    if eqn.primitive.name in FUSIBLE or eqn.primitive.name in NO_OPS:
        return 0.0
    return float(sum(value_bytes(v.aval) for v in [*eqn.invars, *eqn.outvars]
                     if hasattr(v.aval, "shape")))


def window_traffic(eqn, split: int = 1) -> float:
    """Memory bytes of body update ``eqn`` written over its target in place: its update's
    bytes (divided by ``split`` when split) times ``in_place.window_reads``."""
    name = eqn.primitive.name
    return window_reads(name) * value_bytes(eqn.invars[UPDATE_OPERAND[name]].aval) / split


def value_bytes(aval) -> int:
    """Bytes of a whole value of ``aval``."""
    return int(math.prod(aval.shape)) * aval.dtype.itemsize
