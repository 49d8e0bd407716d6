"""A loss computed from values combined over the batch, such as a masked mean: each
micro-batch computes those values, and the step computes the loss from their totals.

``(ce * mask).sum() / mask.sum()`` is no combination of its micro-batches' values (a ratio
of two sums). Its parts are: the masked sum ``S`` and the count ``N`` are sums over the
rows (``microbatch_outputs``); the division is a function of the two totals. So the loss
program is cut where such functions begin (the values ``microbatch_outputs`` calls
``"post"``): the stages compute ``S`` and ``N`` per micro-batch, the pipeline sums them,
and the step program computes ``S / N`` from the totals, as ``jax.jit`` computes it on the
whole batch.

The gradient is exact when the loss reads one such value that depends on the
differentiated inputs, a scalar sum or mean over the rows (``S``): the micro-batches'
backward passes differentiate ``S`` (summed, or averaged, like a loss that is a sum or a
mean), and the step multiplies the gradients by ``d loss / d S`` at the totals (``1 / N``
for a masked mean; any function of ``S`` and batch-independent or parameter-free
combined values, ``S / jnp.maximum(N, 1)``, a log, a weighted sum with another mean).
Values the loss reads beside them that depend on the differentiated inputs but not on the
batch (an L2 penalty: ``S / N + wd * sum(p ** 2)``) are differentiated by the step itself:
``d loss / d penalty`` at the totals, pulled back through the penalty's own equations, is
added to the scaled gradients. Aux outputs computed from combined values (a masked
accuracy) are computed so too.

A loss of several such values that depend on the differentiated inputs (``S1 / N + z * S2
/ N``, ``jnp.log(S2)``, a product of two means), or of one that is not a scalar, needs
each one's ``d loss / d S_i`` inside the backward passes: it is known once every
micro-batch's forward has run, which GPipe does before any backward pass
(``forwards_first``). Then the forward outputs every such value (``heads``), a small
program computes their cotangents from the totals (``head_cotangents``: ``d loss / d
S_i``, over the number of micro-batches for a mean), and the backward passes
differentiate them with those, so the summed gradients are the whole batch's. Under 1F1B
such a loss is refused.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from autoshard.ir.program import Equation, Literal, Program
from autoshard.ir.trace import TracedFunction, flatten_open_jaxpr, live_equations, trace
from autoshard.runtime import evaluate_program

from .batch_prelude import kept_aux_paths
from .layers import depends_on
from .microbatch_outputs import MEAN, POST, SAME, SAME_VALUE, SUM


@dataclasses.dataclass(frozen=True)
class PostReduced:
    """A step whose loss (or aux leaves) are computed from combined values. ``forward``:
    the loss program up to those values, its outputs (the value the backward passes
    differentiate, then the kept aux leaves and the combined values the step reads);
    ``program``: the step with ``grad_eqn`` making them and the equations computing the
    loss, the aux leaves and the scaled gradients from them right after it;
    ``inserted``: how many; ``kinds``: per ``forward`` output, its kind (``value_kinds``)."""

    program: Program
    forward: TracedFunction
    kinds: tuple
    inserted: int
    sources: tuple[str, ...]
    aux_paths: tuple[str, ...]   # per aux leaf of ``forward``, how errors name it
    heads: tuple[int, ...] = (0,)   # the ``forward`` outputs the backward passes differentiate
    # several heads: their cotangents, a program of the combined values at their totals
    # (read from ``cotangent_inputs``, value ids of ``program``), one output per head
    head_cotangents: TracedFunction | None = None
    cotangent_inputs: tuple[int, ...] = ()


def post_reduced(O: Program, sources, grad_eqn: int, forward: TracedFunction,
                 diff, kinds: dict, aux_paths=(), *, num_microbatches: int = 1,
                 forwards_first: bool = False) -> PostReduced | str | None:
    """``O`` with its loss ``forward`` cut where the functions of combined values begin
    (module doc). ``kinds``: ``value_kinds`` of ``forward``'s program; ``aux_paths``: per
    aux leaf of ``forward``, how errors name it; ``forwards_first``: every micro-batch's
    forward runs before the first backward (GPipe), so a loss of several such values is
    differentiated at their totals. ``None`` when no
    output of ``forward`` is such a function; a reason (a string) when the loss is one but
    its gradient cannot be recovered."""
    F = forward.program
    post_out = [k for k, a in enumerate(F.outvars)
                if isinstance(a, int) and _kind(kinds.get(a)) == POST]
    if not post_out:
        return None
    producer = {v: e for e, eqn in enumerate(F.eqns) for v in eqn.outputs}
    post_eqns = set()
    todo = [F.outvars[k] for k in post_out]
    while todo:
        v = todo.pop()
        e = producer.get(v)
        if e is None or e in post_eqns or _kind(kinds.get(v)) != POST:
            continue
        post_eqns.add(e)
        todo.extend(a for a in F.eqns[e].inputs if isinstance(a, int))
    order = sorted(post_eqns)
    frontier = list(dict.fromkeys(a for e in order for a in F.eqns[e].inputs
                                  if isinstance(a, int) and producer.get(a) not in post_eqns))
    depends = {v for v, d in zip(F.invars, diff) if d} | {
        v for eqn, d in zip(F.eqns, depends_on(F, diff)) if d for v in eqn.outputs}
    loss = F.outvars[0]
    post_loss = 0 in post_out
    heads, direct = [loss], []
    at_totals = False   # the backward passes differentiate each head at the totals
    if post_loss:
        cone = _cone(F, loss, post_eqns, producer)
        differentiated = [f for f in frontier if f in cone and f in depends]
        # batch-independent ones (a parameter norm): differentiated in the step itself
        direct = [f for f in differentiated if _kind(kinds.get(f)) == SAME]
        heads = [f for f in differentiated if f not in direct]
        if not heads:
            return ("a function of values combined over the batch, none of which depends on "
                    "the differentiated arguments")
        if any(_kind(kinds[h]) not in (SUM, MEAN) or
               not np.issubdtype(F.avals[h].dtype, np.inexact) for h in heads):
            return ("a function of a value combined over the batch that is not a sum or mean "
                    "over it")
        at_totals = len(heads) > 1 or bool(F.avals[heads[0]].shape)
        if at_totals and not forwards_first:
            what = (f"a function of {len(heads)} values combined over the batch that depend on "
                    f"the differentiated arguments" if len(heads) > 1 else
                    "a function of a value combined over the batch that is not a scalar")
            return (f"{what}, whose factor d loss / d value the backward passes need before "
                    f"every micro-batch's forward has run (schedule='1f1b')")
    head = heads[0]
    # the forward's outputs: the differentiated value, the kept aux leaves, the combined
    # values the post equations read (the forward's own inputs and constants aside)
    kept_aux = [k for k in range(1, len(F.outvars)) if k not in post_out]
    invars, consts = set(F.invars), dict(F.constants)
    outs = [head] + [F.outvars[k] for k in kept_aux]
    extra = [f for f in frontier if f not in invars and f not in consts and f not in outs]
    outs += extra
    kept = [e for e in range(len(F.eqns)) if e not in post_eqns]
    F2 = Program(F.avals, F.invars, tuple(outs), tuple(F.eqns[e] for e in kept), F.constants)
    paths = ("loss",) + tuple(forward.out_paths[k] for k in kept_aux) + \
        tuple(f"combined[{j}]" for j in range(len(extra)))
    forward2 = dataclasses.replace(
        forward, program=F2, out_paths=paths,
        out_tree=jax.tree_util.tree_structure((0,) * len(outs)),
        sources=tuple(forward.sources[e] for e in kept),
        scopes=tuple(forward.scopes[e] for e in kept) if forward.scopes else ())

    # the step: the marker makes the forward's new outputs, then the post equations run
    geqn = O.eqns[grad_eqn]
    n_val = len(F.outvars)
    old_vals, grads = geqn.outputs[:n_val], geqn.outputs[n_val:]
    avals, constants = list(O.avals), list(O.constants)

    def fresh(aval) -> int:
        avals.append(aval)
        return len(avals) - 1

    outer = {F.outvars[k]: old_vals[k] for k in kept_aux if isinstance(F.outvars[k], int)}
    outer[head] = fresh(F.avals[head]) if post_loss else old_vals[0]
    for f in extra:
        outer[f] = fresh(F.avals[f])
    for v, atom in zip(F.invars, geqn.inputs):
        outer.setdefault(v, atom)
    for v, c in F.constants:
        constants.append((fresh(F.avals[v]), c))
        outer[v] = constants[-1][0]
    # gradients the step part changes: scaled by d loss / d head, or a direct value's added
    R, R_diff = _direct_values(F, direct, diff)
    diff_inputs = [v for v, d in zip(F.invars, diff) if d]
    scaled = [k for k, g in enumerate(grads) if post_loss
              and (not at_totals or diff_inputs[k] in R.invars)
              and np.issubdtype(O.avals[g].dtype, np.inexact)]
    raw = list(grads)
    for k in scaled:
        raw[k] = fresh(O.avals[grads[k]])
    geqn2 = Equation(geqn.primitive, geqn.params, geqn.inputs,
                     (outer[head], *(old_vals[k] for k in kept_aux),
                      *(outer[f] for f in extra), *raw), geqn.source_info)

    P = Program(F.avals, tuple(frontier), tuple(F.outvars[k] for k in post_out),
                tuple(F.eqns[e] for e in order), ())
    at = [frontier.index(f) for f in [head, *direct]] if post_loss else []
    if at_totals:
        at = [None, *at[1:]]   # the gradients arrive differentiated at the totals
    # per gradient scaled, its differentiated input's position among R's inputs
    into = [R.invars.index(diff_inputs[k]) if diff_inputs[k] in R.invars else None
            for k in scaled]

    def step_part(combined, gradients, read):
        results = list(evaluate_program(P, combined))
        moved = [k for k in at if k is not None]
        if moved:
            slopes = _slopes(P, combined, moved)
            if at[0] is not None:
                slope = slopes.pop(0)
                gradients = [g * slope.astype(g.dtype) for g in gradients]
            if direct:   # d loss / d r times the gradient of r, a function of the inputs
                def of_inputs(*diffed):
                    ins, it = list(read), iter(diffed)
                    return tuple(evaluate_program(R, [next(it) if d else x for x, d in
                                                      zip(ins, R_diff)]))
                _, pullback = jax.vjp(of_inputs, *(x for x, d in zip(read, R_diff) if d))
                pulled = pullback(tuple(s.astype(F.avals[r].dtype)
                                        for s, r in zip(slopes, direct)))
                where = [sum(R_diff[:j]) for j in range(len(R_diff))]
                gradients = [g if j is None else g + pulled[where[j]].astype(g.dtype)
                             for g, j in zip(gradients, into)]
            results += gradients
        seen = set()
        for k, value in enumerate(results):   # a leaf returned twice (the loss as an aux
            if id(value) in seen:              # leaf too): each output its own value
                results[k] = jax.numpy.array(value, copy=True)
            seen.add(id(value))
        return results

    closed = jax.make_jaxpr(step_part)(
        [jax.ShapeDtypeStruct(F.avals[f].shape, F.avals[f].dtype) for f in frontier],
        [jax.ShapeDtypeStruct(O.avals[grads[k]].shape, O.avals[grads[k]].dtype)
         for k in scaled],
        [jax.ShapeDtypeStruct(F.avals[v].shape, F.avals[v].dtype) for v in R.invars])
    Q = flatten_open_jaxpr(closed.jaxpr, (), ()).program
    ids = {}
    for v, c in zip(Q.invars[:len(closed.consts)], closed.consts):
        constants.append((fresh(Q.avals[v]), c))
        ids[v] = constants[-1][0]
    for v, atom in zip(Q.invars[len(closed.consts):],
                       [outer[f] for f in frontier] + [raw[k] for k in scaled] +
                       [outer[v] for v in R.invars], strict=True):
        ids[v] = atom
    targets = [old_vals[k] for k in post_out] + [grads[k] for k in scaled]
    made = {v for eqn in Q.eqns for v in eqn.outputs}
    if len(set(Q.outvars)) != len(Q.outvars) or not all(
            isinstance(a, int) and a in made for a in Q.outvars):
        raise AssertionError("post_reduced: every output of the step part is its own value")
    ids.update(zip(Q.outvars, targets))
    for eqn in Q.eqns:
        for v in eqn.outputs:
            if v not in ids:
                ids[v] = fresh(Q.avals[v])
    moved = tuple(Equation(eqn.primitive, eqn.params,
                           tuple(a if isinstance(a, Literal) else ids[a] for a in eqn.inputs),
                           tuple(ids[v] for v in eqn.outputs), geqn.source_info)
                  for eqn in Q.eqns)
    eqns = O.eqns[:grad_eqn] + (geqn2,) + moved + O.eqns[grad_eqn + 1:]
    program = Program(tuple(avals), O.invars, O.outvars, eqns, tuple(constants))
    where = sources[grad_eqn]
    new_sources = tuple(sources[:grad_eqn + 1]) + (where,) * len(moved) + \
        tuple(sources[grad_eqn + 1:])
    out_kinds = tuple(kinds[a] if isinstance(a, int) else SAME_VALUE for a in outs)
    paths = kept_aux_paths(aux_paths, kept_aux) + \
        tuple(f" (a value the step reads: {p})" for p in forward2.out_paths[1 + len(kept_aux):])
    if not at_totals:
        return PostReduced(program, forward2, out_kinds, len(moved), new_sources, paths)
    B = num_microbatches
    positions = [frontier.index(h) for h in heads]

    def head_cotangents(combined):
        # d loss / d each head's total; a mean's total is the micro-batches' mean
        return [s / B if _kind(kinds[h]) == MEAN else s
                for s, h in zip(_slopes(P, combined, positions), heads)]

    cotangents = trace(head_cotangents, ([jax.ShapeDtypeStruct(F.avals[f].shape,
                                                                F.avals[f].dtype)
                                          for f in frontier],))
    return PostReduced(program, forward2, out_kinds, len(moved), new_sources, paths,
                       heads=tuple(outs.index(h) for h in heads), head_cotangents=cotangents,
                       cotangent_inputs=tuple(outer[f] for f in frontier))


def _kind(value):
    return None if value is None else value[0]


def _slopes(P: Program, combined, positions) -> list:
    """``d P[0] / d combined[k]`` for each ``k`` of ``positions``, at ``combined`` (``P``:
    the loss from the combined values)."""
    def of(*values):
        ins = list(combined)
        for k, value in zip(positions, values):
            ins[k] = value
        return evaluate_program(P, ins)[0]
    return list(jax.grad(of, argnums=tuple(range(len(positions))))(
        *(combined[k] for k in positions)))


def _direct_values(F: Program, direct, diff) -> tuple[Program, tuple[bool, ...]]:
    """The program computing the ``direct`` values of ``F`` (batch-independent ones the
    loss reads beside its combined values: a parameter norm) from the inputs of ``F`` they
    read (its constants kept), and per such input, whether it is differentiated."""
    needed = live_equations(F.eqns, direct, set())
    read = set(direct) | {a for e in needed for a in F.eqns[e].inputs if isinstance(a, int)}
    consts = tuple((v, c) for v, c in F.constants if v in read)
    reads = [(v, d) for v, d in zip(F.invars, diff) if v in read]
    return (Program(F.avals, tuple(v for v, _ in reads), tuple(direct),
                    tuple(F.eqns[e] for e in needed), consts),
            tuple(d for _, d in reads))


def _cone(F: Program, out: int, post_eqns, producer) -> set:
    """The values the post equations read to compute ``out``."""
    seen, todo = set(), [out]
    while todo:
        v = todo.pop()
        e = producer.get(v)
        if e is None or e not in post_eqns:
            seen.add(v)
            continue
        for a in F.eqns[e].inputs:
            if isinstance(a, int) and a not in seen:
                todo.append(a)
    return seen
