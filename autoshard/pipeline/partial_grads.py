"""Gradients reduced once per step: a stage's backward keeps per-device partial sums.

A data-parallel stage computes each parameter gradient as a contraction over the batch,
which its plan splits over some mesh axes; XLA ends that contraction with an all-reduce
over those axes, once per micro-batch. Summing micro-batches first and reducing once gives
the same gradient for one all-reduce per step (Alpa's gradient accumulation).

The backward program is rewritten so that such a gradient comes out as ``D`` partial sums,
shape ``(D, *grad.shape)``, its leading dim split over the reducing axes (``D`` devices
along them): the contraction's batch dim ``n`` is viewed as ``(D, n / D)`` on both
operands (a free reshape: dim ``n`` is already split over those axes) and the contraction
is vmapped over ``D``, so no device communicates. What follows the contraction up to the
gradient output (a transpose, a dtype conversion, the sum of two such partials) is vmapped
likewise. The runtime accumulates the partials over micro-batches in place and a
reduction program sums their leading dim once per step, into the gradient's planned layout.

Everything is decided from the stage plan's layouts (:class:`PartialGradient` records), so
a saved plan's shardings give the same rewrite.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec

from autoshard.cost_model import MeshCostModel
from autoshard.ir.jax_compat import bind
from autoshard.ir.program import Equation, Literal, Program, makers
from autoshard.ir.specs import from_partition_spec
from autoshard.ir.trace import struct_of_aval, trace
from autoshard.plan.parts import Collective
from autoshard.plan.record import Plan

from .stage_program import StageProgram, split_programs

#: equations between a batch contraction and the gradient output that act on each partial
#: alone, so they commute with the sum over partials
_PER_PARTIAL = frozenset({"convert_element_type", "transpose", "reshape", "copy", "copy_p",
                          "neg", "reduce_precision", "squeeze", "expand_dims"})
_SUMS = frozenset({"add", "add_any"})
_CONTRACTIONS = frozenset({"dot_general", "reduce_sum", "scatter-add"})


@dataclasses.dataclass(frozen=True)
class PartialGradient:
    """Backward output ``output`` (a position in the backward program's outputs) comes out
    as ``groups`` partial sums over mesh ``axes``, laid out ``partial_spec``; the reduction
    program sums them into ``spec``. ``contractions``: the equations (indices into the
    stage's combined program) whose all-reduce over ``axes`` is deferred; ``chain``: the
    equations after them up to the output, applied to each partial."""

    output: int
    axes: tuple[str, ...]
    groups: int
    spec: PartitionSpec
    partial_spec: PartitionSpec
    contractions: tuple[int, ...]
    chain: tuple[int, ...]


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entries(spec: PartitionSpec, rank: int) -> list:
    return list(tuple(spec)) + [None] * (rank - len(tuple(spec)))


def _used_axes(spec: PartitionSpec) -> set[str]:
    return {a for entry in tuple(spec) for a in _axes(entry)}


class _Specs:
    """Layout lookups of one stage plan over its combined program's value ids."""

    def __init__(self, program: Program, specs):
        self.program = program
        self.inputs = dict(zip(program.invars, specs.flat_in_specs, strict=True))
        self.values = dict(specs.value_specs)
        self.operands = {(e, k): s for e, k, s in specs.operand_specs}
        self.producer = makers(program)

    def is_zeros(self, v) -> bool:
        """``v`` is a broadcast zero (what the transpose of a gather scatters into)."""
        e = self.producer.get(v)
        if e is None or self.program.eqns[e].primitive.name != "broadcast_in_dim":
            return False
        atom = self.program.eqns[e].inputs[0]
        return isinstance(atom, Literal) and not np.any(np.asarray(atom.value))

    def value(self, v) -> PartitionSpec:
        if v in self.inputs:
            return self.inputs[v]
        return self.values.get(v, PartitionSpec())

    def operand(self, e: int, k: int) -> PartitionSpec:
        spec = self.operands.get((e, k))
        if spec is not None:
            return spec
        return self.value(self.program.eqns[e].inputs[k])


def _contraction_axes(e: int, specs: _Specs, sizes: dict
                      ) -> tuple[tuple[str, ...], tuple[int | None, ...]] | None:
    """(mesh axes, split dim per operand or ``None``) of equation ``e``'s one contraction
    over a dim its operands split evenly over axes its result does not use; ``None`` if it
    has none or several. A scatter-add into zeros (a gather's transpose) contracts the
    rows of its indices and updates."""
    P = specs.program
    eqn = P.eqns[e]
    if any(not isinstance(a, int) for a in eqn.inputs):
        return None
    out_axes = _used_axes(specs.value(eqn.outputs[0]))
    if eqn.primitive.name == "scatter-add":
        dn = eqn.params["dimension_numbers"]
        if dn.operand_batching_dims or not specs.is_zeros(eqn.inputs[0]):
            return None
        indices = _entries(specs.operand(e, 1), len(P.avals[eqn.inputs[1]].shape))
        updates = _entries(specs.operand(e, 2), len(P.avals[eqn.inputs[2]].shape))
        scatter_dims = [d for d in range(len(updates)) if d not in dn.update_window_dims]
        found = [(_axes(updates[u]), (None, i, u)) for i, u in enumerate(scatter_dims)
                 if _axes(updates[u]) and _axes(updates[u]) == _axes(indices[i])
                 and not set(_axes(updates[u])) & out_axes]
    elif eqn.primitive.name == "dot_general":
        (lc, rc), _ = eqn.params["dimension_numbers"]
        lhs = _entries(specs.operand(e, 0), len(P.avals[eqn.inputs[0]].shape))
        rhs = _entries(specs.operand(e, 1), len(P.avals[eqn.inputs[1]].shape))
        found = [(_axes(lhs[a]), (a, b)) for a, b in zip(lc, rc)
                 if _axes(lhs[a]) and _axes(lhs[a]) == _axes(rhs[b])
                 and not set(_axes(lhs[a])) & out_axes]
    else:   # reduce_sum
        operand = _entries(specs.operand(e, 0), len(P.avals[eqn.inputs[0]].shape))
        found = [(_axes(operand[d]), (d,)) for d in eqn.params["axes"]
                 if _axes(operand[d]) and not set(_axes(operand[d])) & out_axes]
    if len(found) != 1:
        return None
    axes, dims = found[0]
    groups = math.prod(sizes[a] for a in axes)
    if any(d is not None and P.avals[a].shape[d] % groups for a, d in zip(eqn.inputs, dims)):
        return None
    return axes, dims


def partial_gradients(combined: Program, backward: Program, backward_eqns: Sequence[int],
                      outputs: Sequence[int], specs, axis_names: Sequence[str],
                      mesh_shape: Sequence[int]) -> tuple[PartialGradient, ...]:
    """The gradient outputs of a stage's backward that can leave their batch reduction to
    once per step. ``combined``: the stage's combined program, whose equation indices
    ``specs`` (its plan's layouts) use; ``backward``: its backward part, made of
    ``combined``'s equations ``backward_eqns``; ``outputs``: positions in
    ``backward.outvars`` of parameter gradients (not cotangents sent to another stage)."""
    sizes = dict(zip(axis_names, mesh_shape))
    lookup = _Specs(combined, specs)
    producer = {v: e for e in backward_eqns for v in combined.eqns[e].outputs}
    readers: dict = {}
    for e in backward_eqns:
        for a in combined.eqns[e].inputs:
            if isinstance(a, int):
                readers[a] = readers.get(a, 0) + 1
    for a in backward.outvars:
        if isinstance(a, int):
            readers[a] = readers.get(a, 0) + 1

    def resolve(v) -> tuple[tuple[str, ...], list[int], list[int]] | None:
        """(axes, contraction eqns, chain eqns) making ``v`` from deferrable reductions."""
        e = producer.get(v)
        if e is None or readers.get(v, 0) != 1:
            return None
        eqn = combined.eqns[e]
        name = eqn.primitive.name
        if name in _CONTRACTIONS:
            found = _contraction_axes(e, lookup, sizes)
            if found is not None:
                return found[0], [e], []
        # a sum over dims no mesh axis splits (a broadcast's transpose) acts on each
        # partial alone, as do _PER_PARTIAL equations
        if (name in _PER_PARTIAL or name == "reduce_sum") and len(eqn.inputs) == 1 \
                and isinstance(eqn.inputs[0], int):
            parts = [resolve(eqn.inputs[0])]
        elif name in _SUMS and all(isinstance(a, int) for a in eqn.inputs):
            parts = [resolve(a) for a in eqn.inputs]
        else:
            return None
        if any(p is None for p in parts) or len({p[0] for p in parts}) != 1 \
                or set(parts[0][0]) & _used_axes(lookup.value(v)):   # the partials' axes
            return None                                            # must stay free
        return (parts[0][0], [x for p in parts for x in p[1]],
                [x for p in parts for x in p[2]] + [e])

    found = []
    for k in outputs:
        v = backward.outvars[k]
        got = resolve(v) if isinstance(v, int) else None
        if got is None:
            continue
        axes, contractions, chain = got
        spec = lookup.value(v)
        groups = math.prod(sizes[a] for a in axes)
        entry = axes if len(axes) > 1 else axes[0]
        found.append(PartialGradient(k, axes, groups, spec, PartitionSpec(entry, *tuple(spec)),
                                     tuple(contractions), tuple(chain)))
    return tuple(found)


def stage_partial_gradients(sp: StageProgram, specs, axis_names: Sequence[str],
                            mesh_shape: Sequence[int], num_microbatches: int,
                            forward_inputs) -> tuple[PartialGradient, ...]:
    """:func:`partial_gradients` of stage ``sp`` planned as ``specs`` on a sub-mesh of
    ``mesh_shape``, for its parameters' gradients (its differentiated inputs that are in
    ``forward_inputs``, the loss's own inputs). None with one micro-batch: a reduction per
    micro-batch is then already one per step."""
    if num_microbatches == 1:
        return ()
    diff = [v for v, d in zip(sp.inputs, sp.diff_in) if d]
    outputs = [j for j, v in enumerate(diff) if v in forward_inputs]
    _, backward = split_programs(sp)
    return partial_gradients(sp.traced.program, backward, sp.backward_eqns, outputs, specs,
                             axis_names, mesh_shape)


@dataclasses.dataclass(frozen=True)
class DeferredReduction:
    """What deferring ``partials``' reductions changes in a stage plan's price: seconds
    ``saved_s`` per micro-batch (the all-reduces its backward no longer runs, listed in
    ``deferred``) and ``step_s`` once per step (the reduction program's all-reduces,
    listed in ``reductions``)."""

    saved_s: float = 0.0
    step_s: float = 0.0
    deferred: tuple[Collective, ...] = ()
    reductions: tuple[Collective, ...] = ()


def deferred_reduction(sp: StageProgram, plan: Plan, partials: Sequence[PartialGradient],
                       model: MeshCostModel, axis_names: Sequence[str]) -> DeferredReduction:
    """The price of running ``partials`` (of stage ``sp`` planned as ``plan``, on the
    sub-mesh ``model`` prices) once per step instead of once per micro-batch."""
    P = sp.traced.program
    grads = P.outvars[len(sp.outputs):]
    at = {f"{P.eqns[e].primitive.name}#{e}": frozenset(p.axes) for p in partials
          for e in p.contractions}
    all_reduces = [c for c in plan.collectives if c.kind == "all-reduce" and not c.resharding]
    deferred = [c for c in all_reduces if at.get(c.op) == frozenset(c.axes)]
    # XLA combines the all-reduces over the same axes into one: the plan charges their
    # shared latency once ("merged", 0 bytes), saved too when the backward program keeps
    # none of them (the forward is a program of its own)
    backward = {f"{P.eqns[e].primitive.name}#{e}" for e in sp.backward_eqns}
    kept = {frozenset(c.axes) for c in all_reduces
            if c.nbytes and c not in deferred and c.op in backward}
    deferred += [c for c in all_reduces if not c.nbytes and frozenset(c.axes) in set(at.values())
                 and frozenset(c.axes) not in kept]
    nbytes: dict = {}
    for p in partials:   # one combined all-reduce per group of axes
        aval = P.avals[grads[p.output]]
        spec = from_partition_spec(p.spec, len(aval.shape), axis_names)
        nbytes[p.axes] = nbytes.get(p.axes, 0) + \
            model.bytes_per_device(tuple(aval.shape), aval.dtype.itemsize, spec)
    reductions = tuple(
        Collective("gradient reduction", "all-reduce",
                   model.all_reduce(n, [list(axis_names).index(a) for a in axes]), n, axes)
        for axes, n in nbytes.items())
    return DeferredReduction(float(sum(c.seconds for c in deferred)),
                             float(sum(c.seconds for c in reductions)), tuple(deferred),
                             reductions)


def _split_dim(x, dim: int, groups: int):
    """``x`` with dim ``dim`` viewed as ``(groups, size / groups)``, the groups moved first."""
    shape = x.shape
    x = jax.lax.reshape(x, shape[:dim] + (groups, shape[dim] // groups) + shape[dim + 1:])
    return jax.lax.transpose(x, (dim,) + tuple(d for d in range(len(shape) + 1) if d != dim))


def _with_group(spec: PartitionSpec, rank: int, dim: int, axes) -> PartitionSpec:
    """The layout of ``_split_dim``'s result for an operand laid out ``spec``."""
    entries = _entries(spec, rank)
    entries[dim] = None
    return PartitionSpec(axes if len(axes) > 1 else axes[0], *entries)


def deferred_backward(combined: Program, backward: Program, backward_eqns: Sequence[int],
                      partials: Sequence[PartialGradient], specs, axis_names: Sequence[str],
                      mesh_shape: Sequence[int]) -> tuple[Program, dict, dict]:
    """``backward`` with each of ``partials``' outputs made as partial sums.

    Returns (program, value specs, operand specs): the program over ``combined``'s value
    ids plus new ones, and the layouts to pin in it (``specs``' own, re-indexed to the new
    equation order, and the partials' layouts)."""
    lookup = _Specs(combined, specs)
    sizes = dict(zip(axis_names, mesh_shape))
    avals = list(combined.avals)
    constants = list(backward.constants)
    eqns: list[Equation] = []
    value_specs = dict(specs.value_specs)
    operand_specs = {}
    partial_of: dict[int, int] = {}       # old value id -> its partial sums' value id
    job = {}
    for p in partials:
        for e in p.contractions:
            job[e] = ("contract", p)
        for e in p.chain:
            job[e] = ("chain", p)

    def splice(fn, args, atoms) -> list:
        """Trace ``fn`` on ``args`` (structs), append its equations reading ``atoms``;
        its outputs' atoms."""
        q = trace(fn, args).program
        ids = dict(zip(q.invars, atoms, strict=True))
        for v, c in q.constants:
            ids[v] = len(avals)
            avals.append(q.avals[v])
            constants.append((ids[v], c))
        for eqn in q.eqns:
            outs = []
            for v in eqn.outputs:
                ids[v] = len(avals)
                avals.append(q.avals[v])
                outs.append(ids[v])
            eqns.append(Equation(eqn.primitive, eqn.params,
                                 tuple(a if isinstance(a, Literal) else ids[a]
                                       for a in eqn.inputs), tuple(outs), eqn.source_info))
        return [a if isinstance(a, Literal) else ids[a] for a in q.outvars]

    for e in backward_eqns:
        eqn = combined.eqns[e]
        what = job.get(e)
        if what is None:
            for k in range(len(eqn.inputs)):
                if (e, k) in lookup.operands:
                    operand_specs[(len(eqns), k)] = lookup.operands[(e, k)]
            eqns.append(eqn)
            continue
        kind, p = what
        out = eqn.outputs[0]
        out_spec = lookup.value(out)
        out_rank = len(combined.avals[out].shape)
        group = p.axes if len(p.axes) > 1 else p.axes[0]
        if kind == "contract":
            dims = _contraction_axes(e, lookup, sizes)[1]
            structs = [struct_of_aval(combined.avals[a]) for a in eqn.inputs]

            def contraction(*xs, eqn=eqn, dims=dims, groups=p.groups):
                split = [x if d is None else _split_dim(x, d, groups) for x, d in zip(xs, dims)]
                summed = jax.vmap(lambda *ys: bind(eqn.primitive, eqn.params, ys)[0],
                                  in_axes=[None if d is None else 0 for d in dims])(*split)
                return [summed] + split

            made = splice(contraction, structs, list(eqn.inputs))
            for k, (a, d) in enumerate(zip(eqn.inputs, dims)):
                if d is not None:
                    rank = len(combined.avals[a].shape)
                    value_specs[made[1 + k]] = _with_group(lookup.operand(e, k), rank, d,
                                                           p.axes)
        else:
            xs = [partial_of[a] for a in eqn.inputs]   # every input is a partial (resolve)

            def per_partial(*ys, eqn=eqn):
                return [jax.vmap(lambda *zs: bind(eqn.primitive, eqn.params, zs)[0])(*ys)]

            made = splice(per_partial, [struct_of_aval(avals[a]) for a in xs], xs)
        partial_of[out] = made[0]
        value_specs[made[0]] = PartitionSpec(group, *_entries(out_spec, out_rank))
    outvars = list(backward.outvars)
    for p in partials:
        outvars[p.output] = partial_of[backward.outvars[p.output]]
    program = Program(tuple(avals), backward.invars, tuple(outvars), tuple(eqns),
                      tuple(constants))
    return program, value_specs, operand_specs


def reduction_program(partial_avals: Sequence) -> Program:
    """``(partials, ...) → (their sum over the leading dim, ...)``."""
    return trace(lambda *xs: [x.sum(0, dtype=x.dtype) for x in xs],
                 [struct_of_aval(a) for a in partial_avals]).program
