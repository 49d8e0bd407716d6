"""XLA's fusion as the cost and memory models see it: which values never reach memory,
which are written for the readers that cannot compute them (library fusions, dots), and
into how many fusions an op is duplicated."""
from __future__ import annotations

import math
from typing import NamedTuple

from autoshard.ir.program import Literal, makers, per_program

from .dot_orders import copied_orders
from .library_fusion import library_fusions
from .op_rules import ELEMENTWISE, fusible, fusing_consumer

#: elementwise ops XLA's fusion does not duplicate into several consumers (its
#: ``IsExpensive``), and random bits (twenty threefry rounds each): their value is written
#: to memory once and read by each
EXPENSIVE = frozenset("""
acos acosh asin asinh atan atan2 atanh cbrt cos cosh digamma div erf erf_inv erfc exp exp2
expm1 igamma igammac lgamma log log1p logistic polygamma pow rem rsqrt sin sinh sqrt tan
tanh zeta random_bits
""".split())


class FusionAnalysis(NamedTuple):
    """XLA's fusion of one program (:func:`fusion`): ``fused``, the values it keeps out of
    memory; ``fanout``, per fused value the number of fusions its equation is duplicated
    into; ``written``, fused values also written for the readers that read them from
    memory, library fusions and dots (value id → those equations); ``fusions``, per equation
    index the fusions it is computed in (a fusion named by the equation at its root, or
    ``("copy", v)`` for the one that writes value ``v``'s copy, ``("operand", v, form)``
    for an operand fusion); ``operand_fused``, fused values that dots read from an operand
    fusion (value id → {dot equation index: the form it reads, :func:`operand_forms`});
    ``library``: per equation inside a library fusion of a reduction, its root's index
    (:func:`.library_fusion.library_fusions`)."""

    fused: frozenset[int]
    fanout: dict[int, int]
    written: dict[int, frozenset[int]]
    fusions: dict[int, frozenset]
    operand_fused: dict[int, dict[int, object]]
    library: dict[int, int]


def fused_values(program) -> frozenset[int]:
    """Values XLA's fusion keeps out of memory: made by a fusible equation
    (``op_rules.fusible``), read only by fusing consumers (``op_rules.fusing_consumer``;
    at least one; where the equation is ``EXPENSIVE``, exactly one, which may read it
    twice (``e * e`` of ``e = exp(x)`` is one loop), or several all computed in one
    fusion (``e * 2 + e * e``), and not a program
    output. A program output is written, and its readers read it back from memory: XLA:CPU
    does not compute them in the fusion that writes it (measured on jax 0.10: an
    optimizer's new moment ``m * 0.9 + g``, returned and read by ``p - m``, compiles to two
    loop fusions, the second reading the moment). A value other readers read from memory
    (a dot, a library fusion) is fused too where XLA duplicates its equation
    (:func:`duplicable`): written for them, and recomputed by its fusing readers
    (``FusionAnalysis.written``). Also every value made and read inside a library fusion
    of a large reduction (:mod:`.library_fusion`), dots' results included."""
    return fusion(program).fused


def fusion_fanout(program) -> dict[int, int]:
    """Per fused value: into how many fusions XLA duplicates the equation that makes it
    (the fusion roots its value reaches through fused consumers). That equation's
    materialized operands are read once per such fusion."""
    return fusion(program).fanout


def unwritten(analysis: FusionAnalysis, v: int) -> bool:
    """Whether XLA never writes value ``v`` to memory: fused into its readers, and no copy
    written for the reductions among them."""
    return v in analysis.fused and v not in analysis.written


def read_in_registers(analysis: FusionAnalysis, v: int, reader: int | None) -> bool:
    """Whether equation ``reader`` (an index; None: not one of the program's) computes
    value ``v`` inside its own fusion and reads none of it from memory; a reduction that
    reads the copy written for it does read, and so does a dot that reads the one its
    operand fusion writes."""
    return v in analysis.fused and reader not in analysis.written.get(v, ()) and \
        reader not in analysis.operand_fused.get(v, ())


def operand_forms(eqn, program) -> dict[int, object]:
    """Operand index → the matrix form XLA:CPU makes of each ``dot_general`` operand of rank
    3 or more before the dot runs it: ``"bitcast"`` (its dims merged in place) or the
    order it is copied into (``dot_orders.copied_orders``). When an elementwise equation
    makes such an operand, XLA computes it in a loop fusion of its own that writes that
    form, one per value and form, which every dot reading it so shares; the elementwise
    producers are duplicated into it even when other fusions read them too (measured on
    jax 0.10: a residual stream's gradient, ``g = g + x`` per layer with each ``g`` read by
    ``g @ w`` and ``g * 2``, is never written: each operand fusion reads every ``x`` added
    so far, 4 layers 32.5 arrays of traffic, priced 22.5 with ``g`` written once; a GELU
    read by its forward dot and its weight gradient's is written once, in one form)."""
    if eqn.primitive.name != "dot_general" or \
            any(isinstance(a, Literal) for a in eqn.inputs[:2]):
        return {}
    shapes = [tuple(program.avals[a].shape) for a in eqn.inputs[:2]]
    copied = dict(copied_orders(eqn.params["dimension_numbers"], *shapes))
    return {k: copied.get(k, "bitcast") for k in (0, 1) if len(shapes[k]) >= 3}


def operand_fusion_writes(analysis: FusionAnalysis, v: int, dot: int) -> bool:
    """Whether equation ``dot`` is the first reader of its operand fusion of value ``v``
    (:func:`operand_forms`): that fusion's write is priced with it."""
    forms = analysis.operand_fused.get(v, {})
    return dot in forms and min(d for d, f in forms.items() if f == forms[dot]) == dot


def fusion_reads(program, analysis: FusionAnalysis) -> dict[tuple[int, int], int]:
    """(equation index, operand index) → how many times that materialized operand is read
    from memory, where it is fewer than the fusions the equation is computed in: a fusion
    reads each operand once however many of its equations read it (``0.9 * nu + g * g``
    reads ``g`` once), so an equation computed inside fusions (``op_rules.fusing_consumer``)
    reads an operand only in the fusions no earlier equation, or earlier operand, read it
    in (a library fusion likewise). Operands read in registers (:func:`read_in_registers`)
    are not listed."""
    seen: dict[int, frozenset] = {}
    fewer: dict[tuple[int, int], int] = {}
    for e, eqn in enumerate(program.eqns):
        if not fusing_consumer(eqn) and e not in analysis.library:
            continue
        mine = analysis.fusions[e]
        for k, a in enumerate(eqn.inputs):
            if isinstance(a, Literal) or read_in_registers(analysis, a, e):
                continue
            before = seen.get(a, frozenset())
            if before & mine:
                fewer[(e, k)] = len(mine - before)
            seen[a] = before | mine
    return fewer


def value_readers(program) -> tuple[dict[int, list], frozenset[int]]:
    """(value id → the equations reading it, in program order; the program's output
    value ids)."""
    consumers: dict[int, list] = {}
    for eqn in program.eqns:
        for atom in eqn.inputs:
            if not isinstance(atom, Literal):
                consumers.setdefault(atom, []).append(eqn)
    return consumers, frozenset(v for v in program.outvars if not isinstance(v, Literal))


@per_program
def fusion(program) -> FusionAnalysis:
    """XLA's fusion of ``program`` (:class:`FusionAnalysis`): fused values as
    :func:`fused_values`, the fan-out per fused value as :func:`fusion_fanout`, the
    fusions of every equation, and ``written``: fused values that XLA also writes to
    memory for the readers that read it from there (value id → those equations).
    XLA:CPU's library fusions of large reductions (:mod:`.library_fusion`) run first: the
    values inside them are never written, and they read every other operand from memory.
    A value a library fusion or a dot shares with fusing readers (a normalization's ``x -
    mean``, read by its variance and by the normalized value; a residual gradient's
    partial sum, read by its layer's dots and by the next sum) is written for them in a
    fusion of its own, while the fusing readers still recompute it, where its equation is
    ``duplicable``; each such write is one more fusion its producers are duplicated into
    (measured on jax 0.10: the residual gradient of a 16-layer step re-adds every term
    since the last value it could not recompute; priced with those writes counted as one
    fusion, a 32-layer GPT was 0.91x its compiled bytes, 1.004x with each)."""
    consumers, outputs = value_readers(program)
    library = library_fusions(program)
    members = library.root
    index = {id(eqn): e for e, eqn in enumerate(program.eqns)}

    def fuses(c) -> bool:  # a reader computing its fusible operands in its own loop
        return fusing_consumer(c) and index[id(c)] not in members

    fused = set()
    shared: list[int] = []  # EXPENSIVE values of several fusing readers
    written: dict[int, frozenset[int]] = {}
    operand_fused: dict[int, dict[int, object]] = {}
    for e, eqn in enumerate(program.eqns):
        if not fusible(eqn) or e in members:
            continue
        for v in eqn.outputs:
            readers = consumers.get(v, ())
            distinct = {id(c): c for c in readers}  # (an equation may read v twice: v * v)
            if len(distinct) > 1 and eqn.primitive.name in EXPENSIVE:
                if v not in outputs and all(map(fuses, distinct.values())):
                    shared.append(v)  # fused if its readers all end in one fusion
                continue  # not duplicated: written once
            # the dots that read v from an operand fusion of their own
            dots = {} if v in outputs or eqn.primitive.name not in ELEMENTWISE else {
                index[id(c)]: form for c in readers
                if not fusing_consumer(c) and index[id(c)] not in members
                for k, form in operand_forms(c, program).items() if c.inputs[k] == v}
            # readers that read v from memory: a library fusion's, a dot's without an
            # operand fusion, any other that fuses nothing
            writing = frozenset(index[k] for k, c in distinct.items()
                                if not fuses(c) and index[k] not in dots)
            if v in outputs or not readers or len(writing) == len(distinct):
                continue
            if writing and not duplicable(eqn, program):
                continue  # written once, and every reader reads it
            fused.add(v)
            if dots:
                operand_fused[v] = dots
            if writing:  # written for them, and recomputed by every fusion reading it
                written[v] = writing
    for v in _duplicated_across_unfusible_paths(program, consumers, fused, written, members):
        fused.discard(v)
        operand_fused.pop(v, None)
    fused |= library.inside
    roots = _roots(program, fused, consumers, written, operand_fused, index)
    fusions = _fusions(program, roots)
    reused = _concatenates_reused(program, fused, consumers, fusions, index)
    if reused:
        fused -= reused
        roots = _roots(program, fused, consumers, written, operand_fused, index)
        fusions = _fusions(program, roots)
    while shared:  # each value fused can bring its own producer's readers into one fusion
        into_one = [v for v in shared if _one_fusion(consumers[v], fusions, index)]
        if not into_one:
            break
        fused.update(into_one)
        shared = [v for v in shared if v not in fused]
        roots = _roots(program, fused, consumers, written, operand_fused, index)
        fusions = _fusions(program, roots)
    return FusionAnalysis(frozenset(fused), {v: len(r) for v, r in roots.items()},
                          written, fusions, operand_fused, members)


def _duplicated_across_unfusible_paths(program, consumers, fused, written, library
                                       ) -> list[int]:
    """Fused values of several readers that XLA writes once instead: their equation reads
    more elements than it makes (not ``duplicable``), and a path from the value to one of
    its readers runs through an equation that fuses nothing (a dot, or one inside a
    ``library`` fusion) (XLA's
    ``ComputeGloballyUnfusible``: such a producer is duplicated only when it fuses into
    every reader along every path)."""
    made = makers(program)
    bit: dict[int, int] = {}
    for e, eqn in enumerate(program.eqns):
        if not fusible(eqn) or e in library:
            bit[e] = 1 << len(bit)
    above = {}   # value -> bits of the unfusible equations it depends on
    for e, eqn in enumerate(program.eqns):
        mine = bit.get(e, 0)
        for a in eqn.inputs:
            if not isinstance(a, Literal):
                mine |= above.get(a, 0)
        for v in eqn.outputs:
            above[v] = mine
    below = {}   # value -> bits of the unfusible equations that depend on it
    for e in range(len(program.eqns) - 1, -1, -1):
        eqn = program.eqns[e]
        mine = bit.get(e, 0)
        for o in eqn.outputs:
            mine |= below.get(o, 0)
        for a in eqn.inputs:
            if not isinstance(a, Literal):
                below[a] = below.get(a, 0) | mine
    found = []
    for v in fused:
        if v in written or not below.get(v):
            continue
        readers = {id(c): c for c in consumers.get(v, ())}
        if len(readers) < 2 or duplicable(program.eqns[made[v]], program):
            continue
        if any(above.get(a, 0) & below[v] for c in readers.values() for a in c.inputs
               if not isinstance(a, Literal)):
            found.append(v)
    return found


def _one_fusion(readers, fusions, index) -> bool:
    """Whether ``readers`` are all computed in one and the same loop fusion: XLA then fuses
    an ``EXPENSIVE`` producer into it, as nothing is duplicated (measured on jax 0.10: the
    ``tanh`` of a tanh loss, read by ``1 - t²`` and ``t - y`` of one cotangent, and
    ``e * 2 + e * e`` of ``e = exp(x)`` are one fusion each, ``t`` and ``e`` never
    written)."""
    reached = frozenset().union(*(fusions[index[id(c)]] for c in readers))
    return len(reached) == 1 and not isinstance(next(iter(reached)), tuple)


def duplicable(eqn, program) -> bool:
    """Whether XLA duplicates ``eqn`` into its fusible readers when another reader cannot
    take it (XLA's ``ComputeGloballyUnfusible``): it reads at most one large operand
    (``EffectivelyAtMostUnary``: broadcasts, iotas and operands of fewer non-unit dims than
    its result do not count), or no more elements than it makes. Otherwise it is written
    once and every reader reads it (measured on jax 0.10: ``v = x1 * x0 + x1`` read by a
    sum, a dot and ``v + x2`` is written and read by all three; ``x - mean`` beside a
    layernorm's variance is written for the sum and recomputed by the normalized value)."""
    out_shape = program.avals[eqn.outputs[0]].shape
    rank = sum(n > 1 for n in out_shape)
    made = makers(program)
    large = 0
    elements = 0
    for a in dict.fromkeys(a for a in eqn.inputs if not isinstance(a, Literal)):
        shape = program.avals[a].shape
        elements += math.prod(shape)
        if a in made and program.eqns[made[a]].primitive.name in ("broadcast_in_dim", "iota"):
            continue
        large += sum(n > 1 for n in shape) >= rank
    return large <= 1 or elements <= math.prod(out_shape)


def _fusions(program, roots) -> dict[int, frozenset]:
    """Per equation index, the fusions it is computed in: its fused outputs' ``roots``
    (:func:`_roots`), or its own fusion."""
    return {e: frozenset().union(*(roots.get(v, (e,)) for v in eqn.outputs))
            if eqn.outputs else frozenset((e,)) for e, eqn in enumerate(program.eqns)}


#: ops XLA fuses into each reader, but writes once when one fusion reads it through
#: several of its ops (measured on jax 0.10: ``0.1 * s * s`` of a stacked ``s`` compiles
#: to the stack's own fusion and a fusion reading it; ``s * s`` and ``s + m, s * n`` read
#: its pieces). An optimizer's second moment of a stacked (scanned) gradient is one.
CONCATENATES = frozenset({"concatenate", "stack"})


def _concatenates_reused(program, fused, consumers, fusions, index) -> set[int]:
    """Fused values made by a ``CONCATENATES`` op that two of their readers read in one
    fusion (``fusions``: :func:`_fusions` of ``fused``)."""
    reused = set()
    for eqn in program.eqns:
        if eqn.primitive.name not in CONCATENATES:
            continue
        for v in eqn.outputs:
            if v not in fused:
                continue
            seen: set = set()
            for reader in {index[id(c)] for c in consumers[v]}:
                mine = fusions[reader]
                if seen & mine:
                    reused.add(v)
                    break
                seen |= mine
    return reused


def _roots(program, fused, consumers, written, operand_fused, index) -> dict[int, frozenset]:
    """Per fused value, the distinct fusions it is computed in: the fusion roots (readers
    that make no fused value) it reaches through fused readers, each counted once however
    many paths lead there (a normalization's input reaches the one fusion of its output
    through its mean, its variance and itself), plus ``("copy", v)`` for a written copy.
    Measured on jax 0.10 (CPU): a GPT's embedding sum reaches 8 fusions by 36 paths."""
    roots: dict[int, frozenset] = {}
    for eqn in reversed(program.eqns):  # readers come later: their roots are known
        for v in eqn.outputs:
            if v not in fused:
                continue
            reading = written.get(v, frozenset())  # they all read the one written copy
            found: set = {("copy", v)} if reading else set()
            forms = operand_fused.get(v, {})
            for c in consumers[v]:
                e = index[id(c)]
                if e in forms:  # a dot reading the operand fusion that writes this form
                    found.add(("operand", v, forms[e]))
                    continue
                if e in reading:
                    continue
                for o in c.outputs:
                    found.update(roots[o] if o in roots else (e,))
            roots[v] = frozenset(found)
    return roots
