"""The layouts XLA's sharding propagation gives the values of a program whose inputs' and
outputs' layouts are fixed, as a preset's ``jax.jit`` fixes them and leaves the rest to XLA,
and the layouts its partitioner then reads each op's operands in.

Modelled on Shardy's (jax 0.10's propagation; openxla/shardy,
``dialect/sdy/transforms/propagation``): op-priority propagation, each priority's ops
propagated aggressively until nothing changes. An op's factors are its loops
(``op_rules.loop_op``). Per factor, the axes its operands and results agree on (major
first; axes that differ end the list) are offered to every tensor of the op; a tensor
takes them where its own axes are a prefix of them, in order of the factor's largest
source tensor, leaving out axes another of its dims holds and axes its dim's size does
not divide. Layouts fixed by the caller (arguments, returned values, sharding
constraints) are closed: they give axes and take none. Priorities, as Shardy's schedule:

0. layout ops (elementwise, reshape, transpose) none of whose operands has another
   reader, both ways; dynamic slices and updates forward (and a loop view's slices and
   stacks of a step, which stand for them: ``ShardingGraph.per_step_copies``);
1. the same with several readers;
2. every op's factors that are neither summed nor kept whole (a broadcast backward only);
3. every factor (a broadcast backward only);
4. every factor, every op.

Each priority first takes the fixed layouts of the returned values into the values
returned, then visits the ops in XLA's post-order of the computation (``_post_order``:
the order settles conflicts). As jax lowers the program and Shardy imports it: a
constant expression or a broadcast scalar is copied for each reader
(``per_use_values``); an elementwise op's operand with dims of size 1 is broadcast by an
op of its own; a broadcast adding only such dims is a reshape.

Not modelled: sub-axes (an axis whose size a dim divides only in part stops the list),
dims made of several factors (a reshape's minor dims take nothing), priorities users
give constraints, and control flow (its ops pass nothing on).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from autoshard.ir.program import Literal, Program
from autoshard.ir.specs import Spec

from .op_rules import ELEMENTWISE, loop_op

NONE, FORWARD, BACKWARD, BOTH = 0, 1, 2, 3

#: ops that hand each element on without reading others (Shardy's pass-through ops)
LAYOUT_OPS = ELEMENTWISE | frozenset({"reshape", "squeeze", "transpose"})
#: ops whose layout passes forward only at the first priorities
FORWARD_OPS = frozenset({"dynamic_slice", "dynamic_update_slice"})
PRIORITIES = 5


@dataclasses.dataclass(frozen=True)
class Propagated:
    """``made[v]``: the layout of value ``v`` (values it gives no axis are left out:
    replicated); ``read[e]``: per operand of equation ``e`` the layout it is read in
    (None for a literal; equations without a rule are left out)."""

    made: Mapping[int, Spec]
    read: Mapping[int, tuple]

    def __repr__(self):
        return f"Propagated({len(self.made)} values split, {len(self.read)} ops)"


@dataclasses.dataclass(frozen=True, eq=False)
class _Op:
    """One equation as factors: ``operands``/``results`` are (value, per dim its loop or
    None); ``kind``: ``"layout"``, ``"forward"``, ``"broadcast"`` or ``"other"``."""

    sizes: tuple[int, ...]
    open_loops: tuple[bool, ...]      # splittable: may take axes
    passed_on: tuple[bool, ...]       # splittable and kept by a result (not summed)
    operands: tuple[tuple[int, tuple], ...]
    results: tuple[tuple[int, tuple], ...]
    in_dims: tuple                    # per operand (literals too): ``LoopOp.in_dims``
    elements: tuple[int, ...]         # per tensor of ``operands + results``: its size
    kind: str
    elementwise: bool
    shared_operand: bool              # an operand (not a scalar) read elsewhere too
    #: a gather from or scatter into its operand 0 at indices (operand 1): (the indexed
    #: loop, the indices' batch loops, the tensor moved if the operand is not: the
    #: gather's result or the scatter's updates, whether it scatters)
    indexing: tuple | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class ProgramFactors:
    """A program's ops as factors, for :func:`propagated_layouts` (made once for every
    layout propagated through it): ``ops`` per equation (None: no rule), then the
    implicit broadcasts of elementwise operands; ``order``: the order ops are visited in;
    ``users`` / ``producer``: value -> ops reading it / the op making it; ``kinds``: per
    op a number equal for ops alike but for the values they read and make (a repeated
    layer's), which propagate and read alike from equal layouts; ``directed``: per
    priority the ops it gives a direction the one before did not (``_newly_directed``)."""

    ops: tuple[_Op | None, ...]
    order: tuple[int, ...]
    users: Mapping
    producer: Mapping
    kinds: tuple[int, ...]
    directed: tuple[tuple[int, ...], ...]

    def __repr__(self):
        return f"ProgramFactors({len(self.ops)} ops)"


def program_factors(program: Program, signatures: Sequence[str] | None = None,
                    forward: frozenset[int] = frozenset()) -> ProgramFactors:
    """``program``'s factors; ``signatures`` (per equation, equal for equal equations:
    ``TracedFunction.signatures``) let repeated layers share their loop descriptions;
    ``forward``: equations that stand for a dynamic slice or update (a loop's view:
    ``ShardingGraph.per_step_copies``), propagated as those are."""
    ops, order, users, producer, kinds = _ops(program, signatures, forward)
    directed = tuple(tuple(i for i, op in enumerate(ops)
                           if op is not None and _newly_directed(op, priority))
                     for priority in range(PRIORITIES))
    return ProgramFactors(ops, order, users, producer, kinds, directed)


def propagated_layouts(program: Program, in_layouts: Sequence[Spec],
                       out_layouts: Mapping[int, Spec], constrained: Mapping[int, Spec],
                       mesh_shape: Sequence[int], factors: ProgramFactors | None = None
                       ) -> Propagated:
    """Layouts of ``program``'s values after XLA's propagation, and those its ops read
    their operands in: ``in_layouts`` per flat input, ``out_layouts`` per flat output
    position (those fixed), ``constrained`` per equation (a sharding constraint's
    result); ``factors``: ``program_factors(program)``, made here when not given."""
    axes: dict[int, list[tuple[int, ...]]] = {}
    closed: set[int] = set()
    for vid, spec in zip(program.invars, in_layouts, strict=True):
        axes[vid] = list(spec)
        closed.add(vid)
    factors = factors or program_factors(program)
    ops, order, users, producer = factors.ops, factors.order, factors.users, factors.producer
    grown_from: dict = {}   # what an op of a kind, from its tensors' layouts, makes of them
    for e, spec in constrained.items():
        vid = program.eqns[e].outputs[0]
        axes[vid] = list(spec)
        closed.add(vid)
    returned = [(program.outvars[o], spec) for o, spec in sorted(out_layouts.items())
                if not isinstance(program.outvars[o], Literal)]
    sizes = tuple(mesh_shape)
    dirty = {i for i, op in enumerate(ops) if op is not None}  # may propagate something
    for priority in range(PRIORITIES):
        for vid, spec in returned:
            if vid not in closed and _take_returned(axes, vid, spec, program, sizes):
                dirty.update(i for i in (*users.get(vid, ()), producer.get(vid))
                             if i is not None and ops[i] is not None)
        dirty.update(factors.directed[priority])
        # every op is visited in order, as Shardy's worklist visits them (the order
        # settles conflicts); one that no neighbour changed since its last visit, and to
        # which this priority gives no new direction, would change nothing: skipped
        work = [i for i in reversed(order) if ops[i] is not None]
        queued = set(work)
        while work:
            e = work.pop()
            queued.discard(e)
            if e not in dirty:
                continue
            dirty.discard(e)
            for vid in _propagate(ops[e], factors.kinds[e], priority, axes, closed, sizes,
                                  grown_from):
                for other in (*users.get(vid, ()), producer.get(vid)):
                    if other is not None and other != e and ops[other] is not None:
                        dirty.add(other)
                        if other not in queued:
                            work.append(other)
                            queued.add(other)
    made = {vid: tuple(tuple(d) for d in dims) for vid, dims in axes.items() if any(dims)}
    read, read_from = {}, {}   # an op reads as one of its kind whose values are made alike
    for e, op in enumerate(ops[:len(program.eqns)]):
        if op is not None:
            key = (factors.kinds[e], tuple(made.get(vid) for vid, _ in op.operands + op.results))
            if key not in read_from:
                read_from[key] = _read_layouts(program.eqns[e], op, made, sizes)
            read[e] = read_from[key]
    made.update(_copies_made(program, users, made, read))
    return Propagated(made, read)


def _copies_made(program: Program, users: Mapping, made: Mapping, read: Mapping
                 ) -> dict[int, Spec]:
    """The layout of each ``per_use_values`` value whose readers (each reading a copy of
    its own, keyed (equation, operand)) all read it in one split layout, and that nothing
    else reads or returns: XLA makes the value in that layout, where its readers need it
    (measured: the zeros an embedding table's gradient is scattered into, the table split
    on its rows over "model" of 8x8, are made split so, 1 MiB per device, not the whole
    8 MiB table). Values a reader reads whole keep no layout."""
    copies: dict[int, set] = {}
    for key in users:
        if isinstance(key, tuple) and len(key) == 2:
            e, k = key
            layout = read[e][k] if e in read else None
            copies.setdefault(program.eqns[e].inputs[k], set()).add(
                tuple(layout) if layout is not None and any(layout) else None)
    returned = {a for a in program.outvars if not isinstance(a, Literal)}
    return {vid: next(iter(layouts)) for vid, layouts in copies.items()
            if len(layouts) == 1 and None not in layouts and vid not in made
            and vid not in users and vid not in returned}


def _read_layouts(eqn, op: _Op, made: Mapping[int, Spec], mesh_shape) -> tuple:
    """The layout XLA's partitioner reads each operand of ``op`` in (None for a literal).
    A loop no result keeps (summed) is split over the axes its operands agree on when
    each of them is split there: partial results, summed, then sliced to the result's
    layout (measured: ZeRO-3's weight gradients, summed over the batch's axes, then
    sliced; an embedding table split on its rows, gathered from in parts, then summed);
    else it is whole. A loop a result keeps is split as that result is, less the summed
    loops' axes; but a scatter keeps its result's split first (measured: an embedding
    table's gradient, the table split on its rows, is scattered on each device into its
    own rows, the updates gathered whole, not summed over the batch's axis).

    A gather or scatter whose indices' batch dims and table's rows are split over the
    same axes is partitioned over the batch instead (the table read, or made, without
    those axes: gathered, or summed into whole) when the table is smaller than what the
    other way moves (the result a gather sums, the updates a scatter gathers): XLA's
    partitioner orders the ways it can partition either by the bytes they make and move
    (``GatherPartitionMethodsOrderedByCost``). Measured: a GPT of vocab 256 and d_model
    256, ZeRO-3 on 8 devices, batch 8 x seq 64: its embedding table (256 KiB) is
    all-gathered for the lookup, and its gradient, each device's updates scattered into
    the whole table, all-reduced (not its 512 KiB of updates gathered)."""
    loops: dict[int, tuple] = {}
    kept = {l for _, dims in op.results for l in dims if l is not None}
    used: set[int] = set()
    over_batch = scatter = False   # partitioned over the indices' batch dims
    if op.indexing is not None:
        indexed, batch, moved, scatter = op.indexing
        vid, dims = op.operands[1]
        held = made.get(vid) or ((),) * len(dims)
        wanted = {a for l in batch if l in dims for a in held[dims.index(l)]}
        vid, dims = op.results[0] if scatter else op.operands[0]
        rows = (made.get(vid) or ((),) * len(dims))[dims.index(indexed)]
        over_batch = bool(wanted & set(rows)) and op.elements[0] < op.elements[moved]
        if over_batch:
            loops[indexed] = tuple(a for a in rows if a not in wanted)
            used.update(loops[indexed])

    def split_kept():
        for vid, dims in op.results:
            held = made.get(vid)
            for d, loop in enumerate(dims):
                if loop is not None and loop not in loops:
                    loops[loop] = tuple(_before_any(held[d], used)) if held is not None else ()
                    used.update(loops[loop])

    if scatter and not over_batch:
        split_kept()
    for loop in range(len(op.sizes)):
        if loop in kept or loop in loops or not op.open_loops[loop]:
            continue
        found, expand = [], True
        for vid, dims in op.operands:
            if loop in dims:
                held = made.get(vid)
                axes = held[dims.index(loop)] if held is not None else ()
                if not axes:
                    found = []
                    break
                found, expand = _merged(found, axes, expand)
        found = _before_any(_within_dim(found, (), op.sizes[loop], mesh_shape), used)
        loops[loop] = tuple(found)
        used.update(found)
    split_kept()
    return tuple(None if isinstance(a, Literal) else () if not dims else
                 tuple(loops.get(l, ()) if l is not None else () for l in dims)
                 for a, dims in zip(eqn.inputs, op.in_dims))


#: ops that keep a value made from constants a constant expression (Shardy's
#: ``isConstantPreserving``), besides the elementwise ones
CONSTANT_PRESERVING = frozenset({"broadcast_in_dim", "reshape", "squeeze", "slice"})


def per_use_values(program: Program) -> frozenset[int]:
    """Values XLA's propagation gives each reader a copy of (Shardy's constant splitter):
    constant expressions (constants, iotas, and broadcasts, reshapes, slices and
    elementwise ops of them) and broadcasts of a scalar. Their layouts pass nothing from
    one reader to another."""
    constant = {vid for vid, _ in program.constants}
    split = set(constant)
    for eqn in program.eqns:
        name = eqn.primitive.name
        values = [a for a in eqn.inputs if not isinstance(a, Literal)]
        if name == "iota" or (name in CONSTANT_PRESERVING or name in ELEMENTWISE) and \
                all(a in constant for a in values):
            constant.update(eqn.outputs)
            split.update(eqn.outputs)
        elif name == "broadcast_in_dim" and values and \
                len(program.avals[values[0]].shape) == 0:
            split.update(eqn.outputs)
    return frozenset(split)


def _ops(program: Program, signatures: Sequence[str] | None, forward: frozenset[int]):
    """(ops: per equation its ``_Op`` or None, then the implicit broadcasts of elementwise
    operands; the order to visit them in; value -> ops reading it; value -> op making
    it). A reader of a ``per_use_values`` value reads a copy of its own, keyed (equation,
    operand); an elementwise op's operand with dims of size 1 its result's dims are not
    is broadcast first, as jax lowers it, into a value keyed ("broadcast", equation,
    operand)."""
    split = per_use_values(program)
    eqns = program.eqns
    inputs = [[(e, k) if not isinstance(a, Literal) and a in split
               and not split.issuperset(eqn.outputs) else a
               for k, a in enumerate(eqn.inputs)] for e, eqn in enumerate(eqns)]
    broadcasts = []   # (equation, operand, the value it broadcasts)
    for e, eqn in enumerate(eqns):
        for k, a in enumerate(eqn.inputs):
            if broadcast_operand(program, eqn, a):
                broadcasts.append((e, k, inputs[e][k]))
                inputs[e][k] = ("broadcast", e, k)
    readers: dict = {}
    for e, atoms in enumerate(inputs):
        for a in atoms:
            if not isinstance(a, Literal):
                readers.setdefault(a, []).append(e)
    for i, (_, _, a) in enumerate(broadcasts):
        readers.setdefault(a, []).append(len(eqns) + i)
    for a in program.outvars:
        if not isinstance(a, Literal):
            readers.setdefault(a, []).append(-1)
    ops, producer, loops = [], {}, {}
    for e, eqn in enumerate(eqns):
        for vid in eqn.outputs:
            producer[vid] = e
        in_avals = [None if isinstance(a, Literal) else program.avals[a] for a in eqn.inputs]
        out_avals = [program.avals[v] for v in eqn.outputs]
        key = e if signatures is None else signatures[e]
        if key not in loops:
            loops[key] = loop_op(eqn, in_avals, out_avals)
        op = loops[key]
        ops.append(None if op is None else _op(eqn, op, inputs[e], in_avals, out_avals,
                                               readers, e in forward))
    for i, (e, k, a) in enumerate(broadcasts):
        aval, out = program.avals[eqns[e].inputs[k]], program.avals[eqns[e].outputs[0]]
        dims = tuple(d if aval.shape[d] == out.shape[d] else None
                     for d in range(len(out.shape)))
        key = ("broadcast", e, k)
        producer[key] = len(ops)
        full = tuple(range(len(out.shape)))
        ops.append(_Op(tuple(out.shape), (True,) * len(full), (True,) * len(full),
                       ((a, dims),), ((key, full),), (dims,),
                       (math.prod(aval.shape), math.prod(out.shape)), "broadcast", False,
                       len(readers[a]) > 1))
    users = {v: [i for i in es if i >= 0] for v, es in readers.items()}
    alike: dict = {}
    kinds = tuple(-1 if op is None else alike.setdefault(
        (op.sizes, op.open_loops, op.passed_on, tuple(d for _, d in op.operands),
         tuple(d for _, d in op.results), op.in_dims, op.elements, op.kind, op.elementwise,
         op.shared_operand, op.indexing, i < len(eqns) and tuple(
             isinstance(a, Literal) for a in eqns[i].inputs)), len(alike))
        for i, op in enumerate(ops))
    return tuple(ops), _post_order(program, inputs, ops, producer), users, producer, kinds


def broadcast_operand(program: Program, eqn, atom) -> bool:
    """Whether elementwise ``eqn`` reads value ``atom`` with dims of size 1 its result's
    dims are not: jax broadcasts it first, for this reader alone."""
    if isinstance(atom, Literal) or eqn.primitive.name not in ELEMENTWISE:
        return False
    shape, out = tuple(program.avals[atom].shape), tuple(program.avals[eqn.outputs[0]].shape)
    return len(shape) == len(out) and shape != out


def _post_order(program: Program, inputs, ops, producer) -> tuple[int, ...]:
    """The ops in the order XLA's propagation visits them: the post-order XLA gives an
    HLO computation (``MakeInstructionPostOrder``), depth first from the returned values
    in order, each op's operands in order before it (an implicit broadcast is an op of
    its own, before its reader); ops no returned value needs (XLA removes them) last, in
    program order."""
    count = len(program.eqns)

    def sources(i):
        atoms = inputs[i] if i < count else [ops[i].operands[0][0]]
        return [producer.get(a) for a in atoms if not isinstance(a, Literal)]

    order, seen = [], set()
    for root in program.outvars:
        if isinstance(root, Literal) or root not in producer:
            continue
        stack = [(producer[root], False)]
        while stack:
            i, expanded = stack.pop()
            if i in seen:
                continue
            if expanded:
                seen.add(i)
                order.append(i)
                continue
            stack.append((i, True))
            stack.extend((j, False) for j in reversed(sources(i))
                         if j is not None and j not in seen)
    return tuple(order) + tuple(i for i in range(len(ops)) if i not in seen)


def _op(eqn, op, inputs, in_avals, out_avals, readers, forward: bool = False) -> _Op:
    """``eqn`` (``op``: its loops) as factors, reading ``inputs`` (its operands' keys);
    ``forward``: it stands for a dynamic slice or update."""
    name = eqn.primitive.name
    positions = [k for k, (a, dims) in enumerate(zip(inputs, op.in_dims))
                 if not isinstance(a, Literal) and dims]
    out_rank = len(out_avals[0].shape)
    operands = tuple((inputs[k], tuple(range(out_rank)) if isinstance(inputs[k], tuple)
                      and inputs[k][0] == "broadcast" else op.in_dims[k]) for k in positions)
    elements = tuple(math.prod(out_avals[0].shape) if isinstance(inputs[k], tuple)
                     and inputs[k][0] == "broadcast" else math.prod(in_avals[k].shape)
                     for k in positions) + tuple(math.prod(a.shape) for a in out_avals)
    results = tuple((v, dims) for v, dims in zip(eqn.outputs, op.out_dims))
    kept = {l for _, dims in results for l in dims if l is not None}
    kind = "layout" if name in LAYOUT_OPS else "forward" if forward or name in FORWARD_OPS else \
        "broadcast" if name == "broadcast_in_dim" else "other"
    if kind == "broadcast" and operands and elements[0] == elements[-1]:
        kind = "layout"   # only adds dims of size 1: jax lowers it as a reshape
    shared = any(len(readers[a]) > 1 for a, _ in operands)
    indexing, scatter = None, name.startswith("scatter")
    read = 3 if scatter else 2     # operand, indices (and updates) as tensors 0, 1 (and 2)
    if op.indexing is not None and positions[:read] == list(range(read)):
        indexing = (op.indexing.indexed, op.indexing.batch, 2 if scatter else len(operands),
                    scatter)
    return _Op(tuple(op.sizes), tuple(op.splittable),
               tuple(s and l in kept for l, s in enumerate(op.splittable)),
               operands, results, tuple(op.in_dims), elements, kind,
               name in ELEMENTWISE, shared, indexing)


def _direction(op: _Op, loop: int, priority: int) -> int:
    """The directions ``loop`` of ``op`` propagates in at ``priority`` (Shardy's
    schedule: the union of every priority up to it)."""
    direction = NONE
    if op.kind == "layout":
        if priority >= 1 or not op.shared_operand:
            direction = BOTH
    elif op.kind == "forward" and (priority >= 1 or not op.shared_operand):
        direction = FORWARD
    if priority >= 2 and (op.passed_on[loop] or priority >= 3):
        direction |= BACKWARD if op.kind == "broadcast" and priority < 4 else BOTH
    return direction


def _newly_directed(op: _Op, priority: int) -> bool:
    """Whether ``priority`` gives some loop of ``op`` a direction the one before did not."""
    if op.kind in ("layout", "forward") and priority < 2:
        return op.shared_operand == (priority == 1)
    if priority == 2:
        return op.kind != "layout"
    if priority == 3:
        return op.kind != "layout" and any(o and not p for o, p
                                           in zip(op.open_loops, op.passed_on))
    return priority == 4 and op.kind == "broadcast"


def _merged(old: list, new: Sequence[int], expand: bool) -> tuple[list, bool]:
    """The axes ``old`` and ``new`` agree on, major first, and whether more may join."""
    n = min(len(old), len(new))
    for i in range(n):
        if old[i] != new[i]:
            return old[:i], False
    result = old + list(new[n:]) if expand else list(old)
    return result, expand


def _propagate(op: _Op, kind: int, priority: int, axes: dict, closed: set, mesh_shape,
               grown_from: dict) -> list[int]:
    """Propagate ``op``'s factors once; returns the values whose layout grew. ``kind``:
    its ``ProgramFactors.kinds``; ``grown_from``: the growths found so far, by kind and
    layouts (a repeated layer's ops propagate as the layer before)."""
    if priority < 2 and op.kind in ("other", "broadcast"):
        return []   # no direction before priority 2
    tensors = op.operands + op.results
    held = [axes.get(vid) for vid, _ in tensors]
    if not any(h is not None and any(h) for h in held):
        return []   # no tensor of it is split: nothing to pass on
    shut = tuple(vid in closed for vid, _ in tensors)
    key = (kind, priority, tuple(None if h is None else tuple(h) for h in held), shut)
    growth = grown_from.get(key)
    if growth is None:
        growth = grown_from[key] = _growth(op, priority, held, shut, mesh_shape)
    grown = []
    for t, layout in growth:
        vid = tensors[t][0]
        axes[vid] = list(layout)
        grown.append(vid)
    return grown


def _growth(op: _Op, priority: int, held: list, closed: Sequence[bool], mesh_shape
            ) -> tuple[tuple[int, tuple], ...]:
    """(tensor of ``op``, its new layout) of each tensor whose layout grows, in order,
    from its tensors' layouts ``held`` (None: none yet), those ``closed`` taking none."""
    tensors = [(vid, dims, h) for (vid, dims), h in zip(op.operands + op.results, held)]
    count = len(op.operands)
    offered = []
    for loop in range(len(op.sizes)):
        direction = _direction(op, loop, priority) if op.open_loops[loop] else NONE
        if direction == NONE:
            offered.append([])
            continue
        first, second = (tensors[:count], tensors[count:]) if direction != BACKWARD \
            else (tensors[count:], tensors[:count])
        found, expand = [], True
        for group, last in ((first, False), (second, True)):
            if last and direction != BOTH:
                expand = False
            for _, dims, held in group:
                if held is not None and loop in dims:
                    found, expand = _merged(found, held[dims.index(loop)], expand)
        offered.append(found)
    if not any(offered):
        return ()
    source = []   # per loop: (-size of the largest tensor holding its axes, tensor index)
    for loop, found in enumerate(offered):
        best = (0, len(tensors))
        if found:
            for t, (_, dims, held) in enumerate(tensors):
                if held is not None and loop in dims and \
                        tuple(held[dims.index(loop)][:len(found)]) == tuple(found):
                    best = min(best, (-op.elements[t], t))
        source.append(best)

    def spread(loop):
        return math.prod(mesh_shape[a] for a in offered[loop]) if op.elementwise else 1
    order = sorted(range(len(op.sizes)), key=lambda l: (source[l][0], -spread(l),
                                                        source[l][1], l))
    grown = []
    for t in list(range(count, len(tensors))) + list(range(count)):
        vid, dims, held = tensors[t]
        if closed[t]:
            continue
        current = list(held) if held is not None else [()] * len(dims)
        for loop in order:
            if not offered[loop] or loop not in dims:
                continue
            d = dims.index(loop)
            new = _within_dim(offered[loop], current[d], op.sizes[loop], mesh_shape)
            if not _strict_prefix(current[d], new):
                continue
            used = {a for k, dim in enumerate(current) if k != d for a in dim}
            new = _before_any(new, used)
            if t < count and op.elementwise:
                for _, rdims, rheld in tensors[count:]:
                    if rheld is not None and loop in rdims and \
                            _strict_prefix(rheld[rdims.index(loop)], new):
                        new = list(rheld[rdims.index(loop)])
            if len(new) > len(current[d]):
                current[d] = tuple(new)
        if held is None and any(current) or held is not None and current != held:
            tensors[t] = (vid, dims, current)
            grown.append((t, tuple(current)))
    return tuple(grown)


def _within_dim(offered: Sequence[int], held: Sequence[int], size: int,
                mesh_shape) -> list[int]:
    """``offered`` cut where a dim of ``size`` holding ``held`` cannot take the next axis
    (it does not divide what is left of the dim)."""
    kept, split = [], 1
    for a in offered:
        if a not in held and (size % split or (size // split) % mesh_shape[a]):
            break
        kept.append(a)
        split *= mesh_shape[a]
    return kept


def _before_any(axes: Sequence[int], used: set) -> list[int]:
    """``axes`` up to the first that ``used`` holds."""
    kept = []
    for a in axes:
        if a in used:
            break
        kept.append(a)
    return kept


def _strict_prefix(held: Sequence[int], new: Sequence[int]) -> bool:
    return len(held) < len(new) and tuple(new[:len(held)]) == tuple(held)


def _take_returned(axes: dict, vid: int, spec: Spec, program: Program, mesh_shape) -> bool:
    """A returned value takes its fixed output layout where its own agrees (Shardy
    propagates between a function's results and the values it returns as an identity);
    whether its layout grew."""
    held = axes.get(vid) or [()] * len(spec)
    shape = program.avals[vid].shape
    current = list(held)
    for d, (mine, fixed) in enumerate(zip(held, spec)):
        found, _ = _merged(list(mine), fixed, True)
        new = _within_dim(found, mine, shape[d], mesh_shape)
        if _strict_prefix(mine, new):
            used = {a for k, dim in enumerate(current) if k != d for a in dim}
            new = _before_any(new, used)
            if len(new) > len(mine):
                current[d] = tuple(new)
    if current != list(held):
        axes[vid] = current
        return True
    return False
