"""The hand-written layouts of the presets: one fixed spec per argument, as a person
writes ``in_shardings`` for ``jax.jit``. Nothing here is priced or searched.

* ``Annotated``: the model's own annotations, read off the arguments by
  :mod:`autoshard.intra.annotations` and taken as they are.
* ``DataParallel``: batch arguments split on their leading dim over every mesh axis;
  everything else replicated.
* ``ZeRO3``: batch as above; every other argument split over every mesh axis on its
  largest dim that the axes divide (fewer axes when none does).
* ``Megatron``: batch arguments split on their leading dim over the data axes (every
  mesh axis but the last); parameters replicated over the data axes and laid out over
  the model axis (the last one) by Megatron-LM's rule, read off the program in order:

  - a matrix multiply whose activation operand arrives whole (features not split) splits
    the weight's output features: column-parallel (q/k/v, the first MLP kernel);
  - one whose activation arrives split on the contracted features splits the weight's
    input features: row-parallel (the attention output, the second MLP kernel), and
    its result is summed over the model axis; unless that result is wider than the
    activation (an output projection to a vocabulary): then the activation is gathered
    and the weight column-parallel, as Megatron-LM's output layer;
  - a weight meeting a whole activation whose output features are selected over right
    away (a max or argmax over them: a softmax's or a choice's) and that does not widen
    its activation (a router, a classifier head) stays replicated, as Megatron-LM's
    plain linear layers; a vocabulary projection (wider) stays column-parallel;
  - an embedding table read by a gather is split on the rows it indexes:
    vocab-parallel;
  - any other argument (a bias, a norm scale, optimizer state) follows the layout of
    the activation it is first combined with, dim for dim, and is replicated when
    that activation is whole (after a row-parallel sum).

  Arguments only read through layout ops (a transpose, a convert) before such a use take
  the layout the use gives, mapped back through those ops. A dim the model axis does
  not divide stays whole.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from autoshard.ir.program import Literal, Program
from autoshard.ir.specs import Spec, replicated
from autoshard.methods import Annotated, DataParallel, Megatron, ZeRO3

from .fusion import value_readers
from .op_rules import ELEMENTWISE, LoopOp, loop_op


def preset_layouts(method, program: Program, mesh_shape: Sequence[int],
                   batch_flat: Sequence[bool], annotations: Sequence[Spec] | None = None
                   ) -> tuple[Spec, ...]:
    """One spec per flat input of ``program`` for the preset ``method``; ``Annotated``
    takes ``annotations`` (``intra.annotations.annotated_layouts``) as they are."""
    mesh_shape = tuple(mesh_shape)
    if isinstance(method, Annotated):
        if annotations is None or len(annotations) != len(program.invars):
            raise ValueError("method=Annotated() needs the layouts read off the arguments' "
                             "annotations (autoshard.intra.annotations)")
        return tuple(annotations)
    shapes = [tuple(program.avals[v].shape) for v in program.invars]
    axes = tuple(a for a, n in enumerate(mesh_shape) if n > 1)
    if isinstance(method, DataParallel):
        return tuple(split_leading(s, mesh_shape, axes) if b else replicated(len(s))
                     for s, b in zip(shapes, batch_flat))
    if isinstance(method, ZeRO3):
        return tuple(split_leading(s, mesh_shape, axes) if b else
                     _split_largest(s, mesh_shape, axes) for s, b in zip(shapes, batch_flat))
    if isinstance(method, Megatron):
        return _megatron(program, mesh_shape, batch_flat)
    raise TypeError(f"{method!r} is not a preset")


def split_leading(shape, mesh_shape, axes: Sequence[int]) -> Spec:
    """Dim 0 split over as many of ``axes`` (in order) as divide it."""
    if not shape:
        return ()
    chosen: list[int] = []
    for a in axes:
        if shape[0] % (math.prod(mesh_shape[b] for b in chosen) * mesh_shape[a]) == 0:
            chosen.append(a)
    return (tuple(chosen),) + ((),) * (len(shape) - 1)


def _split_largest(shape, mesh_shape, axes: Sequence[int]) -> Spec:
    """The largest dim split over every axis of ``axes``, else over the largest single axis
    that divides some dim, else replicated."""
    n = math.prod(mesh_shape[a] for a in axes)
    by_size = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
    for d in by_size:
        if n > 1 and shape[d] % n == 0:
            return tuple(tuple(axes) if k == d else () for k in range(len(shape)))
    for a in sorted(axes, key=lambda a: -mesh_shape[a]):
        for d in by_size:
            if shape[d] % mesh_shape[a] == 0:
                return tuple((a,) if k == d else () for k in range(len(shape)))
    return replicated(len(shape))


# ------------------------------------------------------------------------------ Megatron
# Per value, the dim the model axis splits (None: whole). Arguments not yet laid out, and
# values computed from them alone, are "free": their layout is decided by their first
# use with an activation.

_FREE = "free"


def _megatron(program: Program, mesh_shape, batch_flat) -> tuple[Spec, ...]:
    axes = [a for a, n in enumerate(mesh_shape) if n > 1]
    if not axes:
        return tuple(replicated(len(program.avals[v].shape)) for v in program.invars)
    model, data = axes[-1], tuple(axes[:-1])
    size = mesh_shape[model]
    split: dict[int, object] = {}      # value -> dim split over the model axis, None, _FREE
    derived: dict[int, tuple] = {}     # free value -> (eqn, its LoopOp) that made it
    decided: dict[int, int | None] = {}   # input value -> its dim split over the model axis
    inputs = frozenset(program.invars)
    for v, is_batch in zip(program.invars, batch_flat):
        if is_batch:
            split[v] = decided[v] = None
        else:
            split[v] = _FREE
    for v, _ in program.constants:
        split[v] = None
    readers, _ = value_readers(program)   # value -> the equations reading it

    def settle(v: int, dim: int | None) -> None:
        """Give the free value ``v`` the split ``dim`` (divisible, else whole), and pass it
        back to the free values it was computed from."""
        if split.get(v) is not _FREE:
            return
        if dim is not None and program.avals[v].shape[dim] % size:
            dim = None
        split[v] = dim
        if v in inputs:
            decided[v] = dim
        elif v in derived:
            eqn, op = derived[v]
            loop = None
            if dim is not None:
                out_dims = op.out_dims[list(eqn.outputs).index(v)]
                loop = out_dims[dim]
            for k, atom in enumerate(eqn.inputs):
                if isinstance(atom, Literal) or split.get(atom) is not _FREE:
                    continue
                settle(atom, _dim_of(op.in_dims[k], loop))

    for eqn in program.eqns:
        in_avals = [None if isinstance(a, Literal) else program.avals[a] for a in eqn.inputs]
        out_avals = [program.avals[v] for v in eqn.outputs]
        op = loop_op(eqn, in_avals, out_avals)
        ins = [None if isinstance(a, Literal) else a for a in eqn.inputs]
        free = [k for k, a in enumerate(ins) if a is not None and split.get(a) is _FREE]
        known = [k for k, a in enumerate(ins) if a is not None and split.get(a) is not _FREE]
        if op is None:  # no rule: replicated, and so is whatever it reads
            for k in free:
                settle(ins[k], None)
            for v in eqn.outputs:
                split[v] = None
            continue
        if not known:  # arguments only: decided by a later use
            for v in eqn.outputs:
                split[v] = _FREE
                derived[v] = (eqn, op)
            continue
        loop = _model_loop(eqn, op, ins, known, free, split, size,
                           lambda l: _selected_at_once(program, readers, eqn, op, known, l))
        for k in free:
            settle(ins[k], _dim_of(op.in_dims[k], loop))
        for v, dims in zip(eqn.outputs, op.out_dims):
            split[v] = _dim_of(dims, loop)

    specs = []
    for v, is_batch in zip(program.invars, batch_flat):
        shape = tuple(program.avals[v].shape)
        if is_batch:
            specs.append(split_leading(shape, mesh_shape, data))
            continue
        dim = decided.get(v)
        specs.append(tuple((model,) if d == dim else () for d in range(len(shape))))
    return tuple(specs)


def _dim_of(dims, loop) -> int | None:
    """The dim of a tensor (per-dim loops ``dims``) that follows ``loop``, if any."""
    if loop is None or dims is None:
        return None
    return next((d for d, l in enumerate(dims) if l == loop), None)


_CONTRACTIONS = ("dot_general", "conv_general_dilated")
#: reductions that select over a dim (a softmax starts with the max over its features)
_SELECTIONS = frozenset({"reduce_max", "reduce_min", "argmax", "argmin"})


def _selected_at_once(program: Program, readers, eqn, op: LoopOp, activations, loop: int,
                      hops: int = 2) -> bool:
    """Whether the weight of contraction ``eqn``, column-parallel over output ``loop``, is
    a router's or a classifier's: its result is no larger than its ``activations``
    operands (positions), and is read (directly, or through up to ``hops`` elementwise ops:
    a bias) by a max or argmax over that loop's dim. Megatron-LM keeps such layers
    replicated."""
    dims = op.out_dims[0]
    if dims is None or loop not in dims:
        return False
    activation = max(math.prod(program.avals[eqn.inputs[k]].shape) for k in activations)
    if math.prod(program.avals[eqn.outputs[0]].shape) > activation:
        return False
    todo = [(eqn.outputs[0], dims.index(loop), hops)]
    while todo:
        v, dim, left = todo.pop()
        shape = program.avals[v].shape
        for reader in readers.get(v, ()):
            name = reader.primitive.name
            if name in _SELECTIONS and dim in reader.params.get("axes", ()):
                return True
            if left and name in ELEMENTWISE and program.avals[reader.outputs[0]].shape == shape:
                todo.append((reader.outputs[0], dim, left - 1))
    return False


def _widening(op: LoopOp, k: int, loop: int) -> bool:
    """Whether ``loop``, operand ``k``'s split, is contracted, and the result has more
    elements than operand ``k``."""
    output_loops = {l for dims in op.out_dims for l in dims if l is not None}
    if loop in output_loops:
        return False
    operand = math.prod(op.sizes[l] for l in op.in_dims[k] if l is not None)
    return math.prod(op.sizes[l] for l in output_loops) > operand


def _model_loop(eqn, op: LoopOp, ins, known, free, split, size, selected) -> int | None:
    """The loop of ``eqn`` the model axis splits: the one an activation operand arrives
    split on; else, for a weight meeting a whole activation, its output features
    (column-parallel) or, for an embedding gather, the rows it indexes (vocab-parallel).

    An activation stays split through a loop the model axis does not divide, as XLA's
    propagation keeps it: q/k/v of 4 heads, column-parallel over 8 devices, reshaped to
    [.., heads, head_dim], are split over heads and part of head_dim, and the attention
    output reaches its projection split (row-parallel), as hand-written Megatron has it.

    A weight whose row-parallel result would be wider than the activation it contracts
    (an output projection to a vocabulary, [B, D] -> [B, V]) is column-parallel instead,
    its activation gathered, as Megatron-LM lays out its output layer: the sum over the
    model axis would move the wide result, the gather moves the narrow activation.

    A weight meeting a whole activation stays replicated where ``selected(loop)`` (its
    output features, ``loop``, are selected over at once: ``_selected_at_once``)."""
    name = eqn.primitive.name
    for k in known:
        dim = split[ins[k]]
        if dim is not None and op.in_dims[k] is not None:
            loop = op.in_dims[k][dim]
            if loop is not None and op.splittable[loop] and not (
                    free and name in _CONTRACTIONS and _widening(op, k, loop)):
                return loop
    if not free:
        return None
    if name in _CONTRACTIONS:
        weight = free[-1]
        activation_loops = {l for k in known if op.in_dims[k] for l in op.in_dims[k]}
        output_loops = {l for dims in op.out_dims for l in dims if l is not None}
        candidates = [l for l in op.in_dims[weight] or ()
                      if l is not None and l in output_loops and l not in activation_loops
                      and op.splittable[l] and op.sizes[l] % size == 0]
        loop = max(candidates, key=lambda l: op.sizes[l], default=None)
        return None if loop is None or selected(loop) else loop
    if name == "gather" and free == [0]:
        followed = {l for dims in op.out_dims for l in dims if l is not None}
        rows = [l for l in op.in_dims[0] or () if l is not None and l not in followed
                and op.splittable[l] and op.sizes[l] % size == 0]
        return rows[0] if rows else None
    return None
