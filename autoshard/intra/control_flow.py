"""Control flow the tracer leaves (a ``while``, a ``cond`` with a contraction in a branch,
a ``scan`` too long to unroll): strategies that split it where its body splits cleanly.

The runtime pins the equation's operands and results and XLA's sharding propagation
carries their layouts into the body. A strategy here is such a layout that the body
follows on its own. One dim of one operand (or that dim of every operand of its size:
a batch of inputs and labels) split over some mesh axes is carried through every body
equation by the equation's loop description (``op_rules``): the body's inputs it reads
along the same loop are sliced locally, its results split where that loop goes, a
gather or scatter follows a split of its indices' batch or of its operand's rows.

A split that reaches a reduction loop leaves partial sums, which the strategy
all-reduces there (XLA's partitioner does the same) when every operand along that loop
is split so; the value is whole from then on. No strategy where XLA would do otherwise:
a reduction with an operand whole along the split loop (XLA may all-gather the split
one instead), a reduction's result (a dot's, a sum's, a scatter's) the body computes
whole and reads along the split loop (XLA's propagation, which runs backward too, would
split the ops making it), an op without a rule, control flow nested inside. A loop's
carry must come out of the body split as it went in: a carry the body makes split is
split on the way in too, and a layout the body does not give back is no strategy. The
replicated strategy is always there.

Priced as :mod:`.flops` counts a body: a ``scan``'s body times its length, a ``while``'s
condition and body once, a ``cond``'s dearest branch; arithmetic and traffic of the
split equations divided by the axes' devices.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax.extend.core as jcore

from autoshard.cost_model import CollectiveStep, MeshCostModel
from autoshard.ir.jax_compat import inlined_call
from autoshard.ir.specs import Spec, replicated

from .flops import (
    COLLECTIVES,
    NO_OPS,
    bodies_traffic,
    eqn_traffic,
    op_flops,
    value_bytes,
    window_traffic,
)
from .in_place import UPDATE_OPERAND, body_in_place
from .op_rules import FUSIBLE, loop_op
from .strategies import Strategy, dtype_name, held_bytes, replicated_strategy

#: ops that move a reduction's result unchanged (it stays one)
_MOVES = frozenset({"transpose", "reshape", "convert_element_type", "copy", "copy_p"})


@dataclasses.dataclass
class _Tally:
    """Per-device work of one run of a body under one split: ``steps`` the collectives
    the compiled body holds (once each, as in its text), ``communication_s`` their price
    as they run."""

    flops: float = 0.0
    traffic: float = 0.0
    communication_s: float = 0.0
    steps: list = dataclasses.field(default_factory=list)

    def add(self, other: _Tally):
        self.flops += other.flops
        self.traffic += other.traffic
        self.communication_s += other.communication_s
        self.steps.extend(other.steps)


def control_flow_strategies(eqn, in_avals: Sequence, out_avals: Sequence,
                            model: MeshCostModel, reads: Sequence[float] = ()
                            ) -> tuple[Strategy, ...]:
    """The strategies of control-flow ``eqn``: replicated, then the splits its body
    follows (see the module docstring) of one operand dim over one set of mesh axes, or of
    that dim of every operand with a dim of its size there (a batch of several inputs).

    ``compute_s`` and ``communication_s`` price every iteration of a ``scan``;
    ``flops``, ``bytes_accessed`` and ``collectives`` are what its compiled program holds
    (the body once), as XLA's ``cost_analysis`` and HLO text count them."""
    kind = eqn.primitive.name
    repeats = eqn.params["length"] if kind == "scan" else 1
    whole = replicated_strategy(in_avals, out_avals, model, reads=reads)
    once = op_flops(eqn, in_avals, out_avals) / repeats
    found = {(whole.in_specs, whole.out_specs): _priced(
        whole, model, once, bodies_traffic(eqn) / repeats, 0.0, (), repeats,
        in_avals, out_avals)}
    cache: dict = {}
    ranked = [(k, d) for k, a in enumerate(in_avals) for d in range(len(getattr(a, "shape", ())))]
    looped_from, xs_at = _looped_operands(eqn)
    # a scan's body sees each of its xs without the scanned dim: an x's dim d + 1 is the
    # body's dim d, as a const's or a carry's dim d is (the batch dim of a carried state
    # and of the stacked inputs or residuals its backward reads, split together)
    body_dim = (lambda k, d: d) if xs_at is None else (lambda k, d: d - (k >= xs_at))
    for axes in axis_sets([a for a, size in enumerate(model.mesh_shape) if size > 1]):
        n = math.prod(model.mesh_shape[a] for a in axes)
        tried: dict[frozenset, dict[int, int]] = {}
        for k, d in ranked:
            size = in_avals[k].shape[d]
            if size % n or size == 1:
                continue
            # the dim alone, with the same dim of every operand of that size (the
            # micro-batches' inputs and labels, split together), of every looped one (the
            # consts, the weights, left out), and of every stacked one: a weight, or its
            # gradient carried, with a dim of the batch's size (16 input features, a batch
            # of 16) is not split with the batch
            together = {i: e for i, e in ranked if body_dim(i, e) == body_dim(k, d)
                        and in_avals[i].shape[e] == size}
            looped = {i: e for i, e in together.items() if i >= looped_from}
            stacked = {k: d, **{i: e for i, e in together.items()
                                if xs_at is not None and i >= xs_at}}
            for seeds in ({k: d}, together, looped, stacked):
                if not seeds:
                    continue
                tried.setdefault(frozenset(seeds.items()), seeds)
        for seeds in tried.values():
            if len(seeds) == 1 and any(spec[k] == _spec(in_avals[k], d, axes)
                                       for spec, _ in found for k, d in seeds.items()):
                continue  # (a split found from another seed splits it so already)
            split = _split(eqn, seeds, axes, n, model, in_avals, cache)
            if split is None:
                continue
            ins, outs, tally = split
            in_specs = tuple(None if a is None else _spec(a, dim, axes)
                             for a, dim in zip(in_avals, ins))
            out_specs = tuple(_spec(a, dim, axes) for a, dim in zip(out_avals, outs))
            if (in_specs, out_specs) in found:
                continue
            laid = dataclasses.replace(whole, name=f"{kind} split {axes}",
                                       in_specs=in_specs, out_specs=out_specs)
            found[(in_specs, out_specs)] = _priced(
                laid, model, tally.flops, tally.traffic, tally.communication_s,
                tuple(tally.steps), repeats, in_avals, out_avals)
    return tuple(found.values())


def _priced(strategy: Strategy, model: MeshCostModel, flops: float, traffic: float,
            communication_s: float, steps: tuple, repeats: int, in_avals, out_avals
            ) -> Strategy:
    """``strategy`` (its layouts) priced with one run of its body (``flops``,
    ``traffic``, collectives ``steps`` costing ``communication_s``) run ``repeats``
    times, its operands and results read and written once."""
    region = held_bytes(model, [*in_avals, *out_avals],
                        [*strategy.in_specs, *strategy.out_specs])
    dtype = dtype_name(list(in_avals) + list(out_avals))
    return dataclasses.replace(
        strategy, compute_s=model.compute(repeats * flops, region + repeats * traffic, dtype),
        communication_s=repeats * communication_s, flops=flops,
        bytes_accessed=region + traffic, collectives=steps)


def axis_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The mesh axes a strategy here splits one dim over: each of ``axes`` alone, then all
    of them together (in mesh order)."""
    return [(a,) for a in axes] + ([tuple(axes)] if len(axes) > 1 else [])


def with_split(spec: Spec, dim: int | None, axes: tuple[int, ...]) -> Spec:
    """``spec`` with ``dim`` (None: none) split over ``axes``."""
    return spec if dim is None else \
        tuple(tuple(axes) if d == dim else s for d, s in enumerate(spec))


def _spec(aval, dim: int | None, axes: tuple[int, ...]) -> Spec:
    return with_split(replicated(len(aval.shape)), dim, axes)


def _looped_operands(eqn) -> tuple[int, int | None]:
    """(the first operand a loop carries, the consts before it: a ``scan``'s, or a
    ``while``'s condition's then its body's; the first operand a ``scan`` scans over,
    None for any other): (0, None) for a ``cond``."""
    params, kind = eqn.params, eqn.primitive.name
    if kind == "scan":
        return params["num_consts"], params["num_consts"] + params["num_carry"]
    if kind == "while":
        return params["cond_nconsts"] + params["body_nconsts"], None
    return 0, None


def _split(eqn, seeds: dict[int, int], axes, n: int, model, in_avals, cache: dict):
    """(operand dims, result dims, tally of one run of the body: a scan's one iteration)
    of ``eqn`` with operands ``seeds`` (index → dim) split over ``axes`` (``n``
    devices); None when the body does not follow it."""
    params, kind = eqn.params, eqn.primitive.name
    if kind == "cond":
        if 0 in seeds:
            return None  # the branch index
        outs, tallies = None, []
        for branch in params["branches"]:
            tally = _Tally()
            got = _propagate(branch.jaxpr, {k - 1: d for k, d in seeds.items()}, axes, n,
                             model, tally, cache)
            if got is None:
                return None
            if outs is not None:  # a result one branch makes whole is sliced to the split
                if any(a is not None and b is not None and a != b for a, b in zip(outs, got)):
                    return None
                got = [a if b is None else b for a, b in zip(outs, got)]
            outs, tallies = got, [*tallies, tally]
        dearest = max(tallies, key=lambda t: t.flops)
        dearest.steps = [s for t in tallies for s in t.steps]  # every branch's, as compiled
        return tuple(seeds.get(i) for i in range(len(in_avals))), outs, dearest
    if kind == "while":
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        carry_at = n_cond + n_body
        found = _carried(params["body_jaxpr"].jaxpr, seeds,
                         lambda seeds: {i - n_cond: s for i, s in seeds.items() if n_cond <= i},
                         carry_at, len(in_avals) - carry_at, axes, n, model, cache,
                         owned_from=n_body)
        if found is None:
            return None
        seeds, outs, tally = found
        cond = {i if i < n_cond else i - n_body: s for i, s in seeds.items()
                if i < n_cond or i >= carry_at}
        cond_tally = _Tally()
        if _propagate(params["cond_jaxpr"].jaxpr, cond, axes, n, model, cond_tally,
                      cache) is None:
            return None
        tally.add(cond_tally)
        return tuple(seeds.get(i) for i in range(len(in_avals))), tuple(outs), tally
    # scan: operands are consts, carry, xs (a body sees each x without the scanned dim)
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    xs_at = n_consts + n_carry
    if any(k >= xs_at and d == 0 for k, d in seeds.items()):
        return None  # the scanned dim
    found = _carried(params["jaxpr"].jaxpr, seeds,
                     lambda seeds: {i: (s - 1 if i >= xs_at else s) for i, s in seeds.items()},
                     n_consts, n_carry, axes, n, model, cache, owned_from=n_consts)
    if found is None:
        return None
    seeds, outs, tally = found
    ys = tuple(None if o is None else o + 1 for o in outs[n_carry:])
    return tuple(seeds.get(i) for i in range(len(in_avals))), (*outs[:n_carry], *ys), tally


def _carried(body, seeds: dict[int, int], to_body, carry_at: int, n_carry: int, axes,
             n: int, model, cache: dict, owned_from: int):
    """A loop's body split from operand ``seeds`` (``to_body``: as the body's invars),
    the seeds grown by the carries the body gives back split until each carry (operands
    ``carry_at`` on, the body's first ``n_carry`` results; the body's invars from
    ``owned_from`` on) comes back as it went: (those seeds, the body's result dims, its
    tally); None when a carry comes back in another layout or the body does not follow."""
    seeds = dict(seeds)
    for _ in range(n_carry + 1):
        tally = _Tally()
        outs = _propagate(body, to_body(seeds), axes, n, model, tally, cache,
                          writes_results=True, owned_from=owned_from)
        if outs is None:
            return None
        carry_in = [seeds.get(carry_at + i) for i in range(n_carry)]
        if outs[:n_carry] == carry_in:
            return seeds, outs, tally
        if any(a is not None and a != b for a, b in zip(carry_in, outs[:n_carry])):
            return None
        seeds.update({carry_at + i: o for i, o in enumerate(outs[:n_carry]) if o is not None})
    return None


@dataclasses.dataclass
class _Eqn:
    """What propagation reads of one body equation, worked out once per planning of the
    control flow: its avals, its work whole, its rule."""

    in_avals: list
    out_avals: list
    flops: float
    traffic: float
    #: (the jaxpr it runs, which of its operands that jaxpr's invars are) when the tracer
    #: would inline it (``jax_compat.inlined_call``), else None
    call: tuple | None
    op: object  # its LoopOp; None without a rule (or control flow nested inside)


def _facts(eqn, cache: dict) -> _Eqn:
    found = cache.get(id(eqn))
    if found is None:
        in_avals = [getattr(v, "aval", None) for v in eqn.invars]
        out_avals = [v.aval for v in eqn.outvars]
        name = eqn.primitive.name
        flops = 0.0 if name in COLLECTIVES else op_flops(eqn, in_avals, out_avals)
        traffic = eqn_traffic(eqn)
        try:
            op = None if name in COLLECTIVES else loop_op(eqn, in_avals, out_avals)
        except Exception:  # noqa: BLE001 - a rule that cannot read it: not split
            op = None
        call = inlined_call(eqn, range(len(eqn.invars)))
        found = cache[id(eqn)] = _Eqn(in_avals, out_avals, flops, traffic,
                                      None if call is None else (call[0], tuple(call[1])), op)
        cache.setdefault("keep", []).append(eqn)  # the ids stay those equations'
    return found


def body_split(jaxpr, seeds: dict[int, int], axes: tuple[int, ...], model: MeshCostModel,
               cache: dict, collective=None):
    """(the split dim of each result or None, the per-device work) of one run of
    ``jaxpr`` with its invars ``seeds`` (index → dim) split over ``axes``; None when it
    does not follow. ``collective(eqn, split dims of its operands)`` reads the body's
    collectives (a ``shard_map``'s, over its manual axes): (its results' split dims, its
    priced CollectiveStep or None), or None when it does not follow; without it a body
    collective does not. ``cache``: one dict per equation holding ``jaxpr``."""
    tally = _Tally()
    n = math.prod(model.mesh_shape[a] for a in axes)
    outs = _propagate(jaxpr, seeds, axes, n, model, tally, cache, collective=collective)
    return None if outs is None else (outs, tally)


def _propagate(jaxpr, seeds: dict[int, int], axes, n: int, model: MeshCostModel,
               tally: _Tally, cache: dict, writes_results: bool = False,
               collective=None, heavy: frozenset = frozenset(),
               owned_from: int | None = None) -> list | None:
    """The split dim of each result of ``jaxpr`` (None: whole) when its invars ``seeds``
    (index → dim) are split over ``axes``, its work added to ``tally``; None when an
    equation does not follow the split (see the module docstring). ``cache``: equations'
    :class:`_Eqn` (one dict per control-flow equation planned). ``writes_results``: a
    loop's body, which writes the results its fused ops make (``flops.body_traffic``).
    ``owned_from``: its invars it may write over in place (``flops.owned_inputs_from``)."""
    split = {jaxpr.invars[i]: dim for i, dim in seeds.items()}
    owned = len(jaxpr.invars) if owned_from is None else owned_from
    in_place = cache.get(("in place", id(jaxpr), owned))
    if in_place is None:
        in_place = cache["in place", id(jaxpr), owned] = body_in_place(jaxpr, owned)
    fused = set()  # results of fusible ops: in registers unless the body returns them
    # results of the body's reductions (dots, sums, scatters), moved or not (``heavy``:
    # invars that are)
    derived = {jaxpr.invars[i] for i in heavy}
    for e, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        if name in FUSIBLE:
            fused.update(eqn.outvars)
        ins = [None if isinstance(v, jcore.Literal) else split.get(v) for v in eqn.invars]
        facts = _facts(eqn, cache)
        if facts.op is not None and facts.op.reduction_loops and name not in FUSIBLE or \
                name in _MOVES and eqn.invars[0] in derived:
            derived.update(eqn.outvars)
        if name in COLLECTIVES and collective is not None:
            read = collective(eqn, ins)
            if read is None:
                return None
            outs, step = read
            if step is not None:
                tally.steps.append(step)
                tally.communication_s += step.seconds
            split.update({v: dim for v, dim in zip(eqn.outvars, outs) if dim is not None})
            continue
        if name in NO_OPS:  # type-level marks: their operand's layout
            split.update({v: dim for v, dim in zip(eqn.outvars, ins) if dim is not None})
            continue
        if all(dim is None for dim in ins):  # whole, as the replicated body
            tally.flops += facts.flops
            tally.traffic += window_traffic(eqn) if e in in_place else facts.traffic
            continue
        if facts.call is not None:
            callee, operands = facts.call
            outs = _propagate(getattr(callee, "jaxpr", callee),
                              {k: ins[i] for k, i in enumerate(operands) if ins[i] is not None},
                              axes, n, model, tally, cache, collective=collective,
                              heavy=frozenset(k for k, i in enumerate(operands)
                                              if not isinstance(eqn.invars[i], jcore.Literal)
                                              and eqn.invars[i] in derived))
            if outs is None:
                return None
            split.update({v: dim for v, dim in zip(eqn.outvars, outs) if dim is not None})
            continue
        op = facts.op
        if op is None:
            return None
        loops = {(op.in_dims[i] or ())[dim] if dim < len(op.in_dims[i] or ()) else None
                 for i, dim in enumerate(ins) if dim is not None}
        if len(loops) != 1 or None in loops:
            return None
        (loop,) = loops
        if any(ins[i] is None and v in derived for i, (v, dims) in
               enumerate(zip(eqn.invars, op.in_dims)) if dims is not None and loop in dims):
            return None  # a whole value the body computes: XLA would split its producers
        if not op.splittable[loop] or op.sizes[loop] % n or op.indexing is not None and \
                op.indexing.permutes(
                    {loop: tuple(axes)}, [a for a, size in enumerate(model.mesh_shape) if size > 1]):
            return None
        tally.flops += facts.flops / n
        if e in in_place:  # the update's window, not the target
            update = UPDATE_OPERAND[name]
            tally.traffic += window_traffic(eqn, n if loop in (op.in_dims[update] or ()) else 1)
        elif name not in FUSIBLE:
            dims = [*op.in_dims, *op.out_dims]
            tally.traffic += sum(value_bytes(a) / (n if loop in (dims[i] or ()) else 1)
                                 for i, a in enumerate([*facts.in_avals, *facts.out_avals])
                                 if hasattr(a, "shape"))
        if loop in op.reduction_loops:  # partial sums: all-reduced here, whole from now on
            if any(ins[i] is None for i, dims in enumerate(op.in_dims)
                   if dims is not None and loop in dims):
                return None  # an operand whole along it: XLA may gather the split one
            for a in facts.out_avals:
                nbytes = value_bytes(a)
                step = CollectiveStep("all-reduce", tuple(axes), nbytes,
                                      model.all_reduce(nbytes, tuple(axes)))
                tally.steps.append(step)
                tally.communication_s += step.seconds
            continue
        for v, dims in zip(eqn.outvars, op.out_dims):
            if loop in dims:
                split[v] = dims.index(loop)
    outs = [None if isinstance(v, jcore.Literal) else split.get(v) for v in jaxpr.outvars]
    if writes_results:
        tally.traffic += sum(value_bytes(v.aval) / (1 if dim is None else n)
                             for v, dim in zip(jaxpr.outvars, outs)
                             if not isinstance(v, jcore.Literal) and v in fused)
    return outs
