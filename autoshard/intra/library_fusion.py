"""XLA:CPU's library fusions of large reductions (YNNPACK), as its library rewriter grows
them: which equations run inside one such fusion, whose values never reach memory.

XLA:CPU starts a library fusion at every reduction and dot it supports, from the end of
the program up, before its loop fusion runs. A dot's fusion stays one dot; a reduction's
grows breadth first (``xla/backends/cpu/transforms/library_rewriter.cc``):

- up, to the equation making an operand, when every reader of that value is inside;
- down, to the one reader of the fusion's result (a value of several readers ends it);
- a dot it reaches, in either direction, joins (XLA merges the dot's own fusion);
- the growth is repeated from the whole fusion until nothing more joins.

An equation joins only where the library supports it (``ynn_support.cc``): float32
reductions over some axes, float32 dots of two matrices (neither a vector), elementwise
arithmetic and the transcendental functions it implements, broadcasts, reshapes and
pads; elementwise ops and reductions only where they or an operand hold
``REDUCTION_LIBRARY_ELEMENTS`` or more (``IsInstructionPreferredByYnn``). Selects,
comparisons, integer ops, transposes (those XLA puts before a dot's operand too), slices
and gathers end a fusion: their values are written, and the fusion reads them. Shapes are
the global ones, as for the rest of the fusion analysis.

Measured on jax 0.10 (one CPU device): a softmax over [8, 8, 128, 128] reads its input
and writes its result, nothing else; so does its product with the values, ``softmax(s)
@ v``, which writes only the product; ``sum(where(x > 0, x, 0), 1)`` writes the select
(not supported), and a softmax over [256, 256] is three fusions (its row statistics, of
256 elements, are too small to join).
"""
from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

from autoshard.ir.program import Literal, makers, per_program, readers

from .dot_orders import copied_orders

#: elements from which XLA:CPU's library fusion takes an elementwise op or a reduction:
#: its result or an operand holds this many (``IsInstructionPreferredByYnn``)
REDUCTION_LIBRARY_ELEMENTS = 4096

#: reductions a library fusion starts at and grows from
LIBRARY_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min"})
#: elementwise primitives the library implements (``GetYnnUnaryOpMap``,
#: ``GetYnnBinaryOpMap``; ``integer_pow`` and ``square`` are multiplies in HLO)
LIBRARY_ELEMENTWISE = frozenset("""
abs ceil convert_element_type cos erf exp expm1 floor log log1p logistic neg round rsqrt
sign sin sqrt tanh tan add add_any div max min mul pow sub integer_pow square
""".split())
#: primitives that are the operand's buffer, or a broadcast of it, in HLO: always taken
LIBRARY_LAYOUT = frozenset({"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "pad",
                            "stop_gradient"})


class LibraryFusions(NamedTuple):
    """``root``: per equation index inside a library fusion of a reduction, the index of
    the fusion's root (the one equation whose result it writes); ``inside``: the values
    made inside such fusions and read only there (never written); ``broadcasts``:
    (equation index, operand index) → how many arrays of the equation's result shape it
    moves in place of that operand, where a library fusion reads a broadcast of it that
    XLA writes (:func:`_written_broadcasts`)."""

    root: dict[int, int]
    inside: frozenset[int]
    broadcasts: dict[tuple[int, int], float]


@per_program
def library_fusions(program) -> LibraryFusions:
    """The library fusions XLA:CPU grows from ``program``'s large reductions (see the
    module docstring)."""
    made = makers(program)
    read_by = readers(program)
    outputs = frozenset(v for v in program.outvars if not isinstance(v, Literal))
    fusion_of: dict[int, int] = {}      # equation -> its fusion's id
    members: dict[int, set[int]] = {}   # fusion id -> equations
    root: dict[int, int] = {}           # fusion id -> root equation

    def result(e):
        outs = program.eqns[e].outputs
        return outs[0] if len(outs) == 1 else None

    def one_reader(e):
        v = result(e)
        if v is None or v in outputs:
            return None
        found = read_by.get(v, ())
        return found[0] if len(found) == 1 else None

    def joins(e) -> bool:
        return e not in fusion_of and _supported(program.eqns[e], program) and \
            not _small_reciprocal(e, program, read_by)

    for start in range(len(program.eqns) - 1, -1, -1):
        eqn = program.eqns[start]
        if start in fusion_of or eqn.primitive.name not in LIBRARY_REDUCTIONS or \
                not _supported(eqn, program):
            continue
        fid = start
        fusion_of[start], members[fid], root[fid] = fid, {start}, start

        def take(e, fid=fid):
            """Add equation ``e`` (or the fusion it is in) to fusion ``fid``."""
            other = fusion_of.get(e)
            if other is None:
                fusion_of[e] = fid
                members[fid].add(e)
                return
            for m in members.pop(other):
                fusion_of[m] = fid
                members[fid].add(m)
            root.pop(other)

        changed = True
        while changed:
            changed = False
            frontier = deque([(m, "up") for m in sorted(members[fid])] + [(root[fid], "down")])
            visited = set(members[fid])
            while frontier:
                e, direction = frontier.popleft()
                if direction == "up":
                    transposed = _transposed_operands(program.eqns[e], program)
                    for k, a in enumerate(program.eqns[e].inputs):
                        if isinstance(a, Literal) or a in outputs or a not in made or \
                                k in transposed:
                            continue
                        p = made[a]
                        if p in visited or p in members[fid] or \
                                not members[fid].issuperset(read_by[a]):
                            continue
                        visited.add(p)
                        if p in fusion_of and root[fusion_of[p]] == p or joins(p):
                            take(p)
                            changed = True
                            frontier.append((p, "up"))
                else:
                    if e != root[fid]:
                        continue
                    r = one_reader(e)
                    if r is None or r in visited or r in members[fid] or any(
                            program.eqns[r].inputs[k] == result(e)
                            for k in _transposed_operands(program.eqns[r], program)):
                        continue
                    visited.add(r)
                    if r in fusion_of or joins(r):
                        merged_root = root.get(fusion_of[r]) if r in fusion_of else r
                        take(r)
                        root[fid] = merged_root
                        changed = True
                        frontier.append((merged_root, "down"))
                        frontier.extend((m, "up") for m in sorted(members[fid]))
    inside = set()
    for fid, group in members.items():
        for e in group:
            if e != root[fid]:
                inside.update(program.eqns[e].outputs)
    of_root = {e: root[f] for e, f in fusion_of.items()}
    return LibraryFusions(of_root, frozenset(inside), _written_broadcasts(program, of_root))


def _written_broadcasts(program, root) -> dict[tuple[int, int], float]:
    """Operands a library fusion reads broadcast to a larger shape, where XLA writes that
    broadcast (``root``: equation → its library fusion's root). An elementwise equation
    broadcasts an operand of size-1 dims, or a scalar constant, implicitly; in HLO that
    is one broadcast instruction per value and shape (constants of one value and type
    included: XLA's CSE merges them across the program), which the fusion takes in only
    when every equation broadcasting the value so is inside it. Otherwise XLA writes the
    broadcast, at the full shape, and the fusion reads it. Measured on jax 0.10: a
    softmax whose probabilities are returned and whose gradient is taken, over [8, 8,
    128, 128], writes ``1 / sum`` broadcast to the whole shape for the gradient's fusion,
    which the probabilities' loop fusion recomputes; a 2-layer transformer's loss fusion,
    which takes the last layer's MLP in, reads GELU's four constants written as [8, 128,
    1024] arrays, shared with the first layer's GELU. Per (equation, operand): its reads
    of the broadcast (one per fusion, by its first equation reading it) and writes (one,
    by the first of all), arrays of the equation's result shape."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for e, eqn in enumerate(program.eqns):
        if len(eqn.outputs) != 1:
            continue
        out = program.avals[eqn.outputs[0]]
        shape = tuple(out.shape)
        for k, a in enumerate(eqn.inputs):
            if isinstance(a, Literal):
                scalar = a.scalar()
                if shape and scalar is not None:
                    groups.setdefault(("constant", scalar[1], out.dtype.name, shape),
                                      []).append((e, k))
                continue
            mine = tuple(program.avals[a].shape)
            if mine != shape and (not mine or len(mine) == len(shape) and all(
                    m in (1, n) for m, n in zip(mine, shape))):
                groups.setdefault((a, shape), []).append((e, k))
    found: dict[tuple[int, int], float] = {}
    for broadcasting in groups.values():
        fusions = {root.get(e) for e, _ in broadcasting}
        if fusions == {None} or len(fusions) == 1:
            continue  # no library fusion reads it, or one takes every broadcast in
        seen: set[int] = set()
        for e, k in broadcasting:
            if e in root:
                found[(e, k)] = (root[e] not in seen) + (not seen)
                seen.add(root[e])
    return found


def _supported(eqn, program) -> bool:
    """Whether the library takes ``eqn`` into a fusion (float32 throughout)."""
    name = eqn.primitive.name
    if len(eqn.outputs) != 1:
        return False
    out = program.avals[eqn.outputs[0]]
    ins = [program.avals[a] for a in eqn.inputs if not isinstance(a, Literal)]  # constants: any
    if any(a.dtype.name != "float32" for a in (out, *ins)):
        return False
    large = any(math.prod(a.shape) >= REDUCTION_LIBRARY_ELEMENTS for a in (out, *ins))
    if name in LIBRARY_LAYOUT:
        return True
    if name in LIBRARY_ELEMENTWISE:
        return large
    if name in LIBRARY_REDUCTIONS:
        return large and bool(eqn.params.get("axes")) and not _of_pieces(eqn, program)
    if name == "dot_general":   # one that contracts nothing is a broadcast multiply in HLO
        return _library_dot(eqn, program) if eqn.params["dimension_numbers"][0][0] else large
    return False


def _of_pieces(eqn, program) -> bool:
    """A reduction of a stack or concatenation, which XLA's simplifier rewrites as the sum
    of its pieces' (measured on jax 0.10: ``stack([a, b, c]).sum(0)`` is one loop
    fusion adding the three)."""
    made = makers(program)
    a = eqn.inputs[0]
    return not isinstance(a, Literal) and a in made and \
        program.eqns[made[a]].primitive.name in ("stack", "concatenate")


def _transposed_operands(eqn, program) -> frozenset[int]:
    """The operands of a dot that XLA transposes before it runs (``dot_orders``): a
    transpose stands between them and the dot, and the library takes no transpose."""
    if eqn.primitive.name != "dot_general" or \
            any(isinstance(a, Literal) for a in eqn.inputs[:2]):
        return frozenset()
    shapes = [tuple(program.avals[a].shape) for a in eqn.inputs[:2]]
    return frozenset(k for k, _ in copied_orders(eqn.params["dimension_numbers"], *shapes))


def _small_reciprocal(e, program, read_by) -> bool:
    """Whether equation ``e`` broadcasts a divisor of fewer than
    ``REDUCTION_LIBRARY_ELEMENTS``: XLA's simplifier rewrites ``x / broadcast(s)`` as ``x *
    broadcast(1 / s)``, and the reciprocal, at ``s``'s shape, is too small to join."""
    eqn = program.eqns[e]
    if eqn.primitive.name != "broadcast_in_dim" or isinstance(eqn.inputs[0], Literal):
        return False
    v = eqn.outputs[0]
    divides = [program.eqns[r] for r in read_by.get(v, ())]
    return any(d.primitive.name == "div" and d.inputs[1] == v for d in divides) and \
        math.prod(program.avals[eqn.inputs[0]].shape) < REDUCTION_LIBRARY_ELEMENTS


def _library_dot(eqn, program) -> bool:
    """A dot of two matrices (no vector: each operand keeps a dimension of more than one
    element), one of its dimensions 8 or more (``IsDotSupportedByYnn``)."""
    (contract, batch) = eqn.params["dimension_numbers"]
    shapes = [program.avals[a].shape for a in eqn.inputs[:2]]
    free = [math.prod(n for d, n in enumerate(shape) if d not in (*c, *b))
            for shape, c, b in zip(shapes, contract, batch)]
    k = math.prod(shapes[0][d] for d in contract[0])
    return min(free) > 1 and max(*free, k) >= 8
