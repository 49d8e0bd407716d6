"""Liveness of a program's values: when each is born and last read; peak bytes per device."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from autoshard.ir.program import Literal, Program, makers, per_program, readers

from .fusion import fusion
from .op_rules import ELEMENTWISE


@per_program
def live_ranges(program: Program, donated: Iterable[int] = (),
                held: Iterable[tuple[int, int, int]] = (), writers: frozenset[int] = frozenset()
                ) -> dict[int, tuple[int, int]]:
    """Value id → (first step, last step) it occupies memory.

    Step ``e`` is the execution of equation ``e``; arguments and constants are
    born at step 0; arguments live to the end unless donated (then until their last
    read). Program outputs live to the last step and, as XLA allocates them for the
    whole run, from step 0 unless they take over a donated argument's buffer (same
    shape and dtype, matched in order as jax aliases them). Intermediates that an
    output's elementwise chain overwrites in place (same shape and dtype, last read
    there) share the output's buffer and are left out, as are values XLA's fusion keeps
    in registers (``fusion.fused_values``: they never reach memory) unless XLA writes them
    for large reductions (``written`` of ``fusion.fusion``: until the last of those) or
    dots read them from operand fusions (``operand_fused``: held as the value was, as one
    buffer from its equation to its last reader). In a loop's view (``LoopView``): each
    ``held`` (value, first, last) occupies memory at least from first to last, and the
    equations ``writers`` (the stacks: XLA writes a step's value into the loop's buffer
    where it is made) do not hold what they read.
    The ILP's memory rows count each of these as its own buffer; the reported peak
    places them in the outputs' buffers where XLA does (``buffer_assignment``).
    """
    born, last, shared = _steps(program, donated, writers)
    analysis = fusion(program)
    fused, written = analysis.fused, analysis.written
    reach = _read_where_fused(program, fused, last)
    ranges = {v: (b, max(last.get(v, b), b)) for v, b in born.items()
              if v not in shared and v not in fused}
    for v, reading in written.items():  # written once for the reductions that read it
        ranges[v] = (born[v], max(reading))
    for v in analysis.operand_fused:  # the operand fusions' buffers: held as the value's
        ranges[v] = (born[v], last.get(v, born[v]))  # was, to its last reader (a dot or later)
    for v in random_words(program):  # (``memory_points.held_bytes_factors`` sizes them)
        if v in fused:
            ranges[v] = (born[v], max(born[v], reach.get(v, born[v])))
    for v, first, end in held:   # a loop's buffers: in memory while the loop runs
        if v not in shared:
            start, stop = ranges.get(v, (born[v], last.get(v, born[v])))
            ranges[v] = (min(start, first), max(stop, end))
    return ranges


@per_program
def random_words(program: Program) -> frozenset[int]:
    """The results of ``random_bits``: where a backend computes them in a loop
    (``Cluster.threefry_in_loops``) its two words stay in memory until the last fusion that
    finishes them, fused or not (:func:`live_ranges` gives fused ones that range too)."""
    return frozenset(v for eqn in program.eqns if eqn.primitive.name == "random_bits"
                     for v in eqn.outputs)


def output_births(program: Program, donated: Iterable[int] = ()) -> dict[int, int]:
    """Output value → the step XLA first writes its buffer: its own equation's, or that
    of the first intermediate its elementwise chain overwrites in place (a reduced
    gradient the optimizer's update is written over); outputs that take over a donated
    argument's buffer: their own equation's."""
    born, _, shared = _steps(program, donated)
    defined = makers(program)
    births = {a: defined.get(a, 0) for a in program.outvars if not isinstance(a, Literal)}
    for v, out in shared.items():
        births[out] = min(births[out], born[v])
    return births


def _steps(program: Program, donated: Iterable[int], writers: frozenset[int] = frozenset()
           ) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """(born, last, shared) of :func:`live_ranges` before fusion is accounted for: value
    → its first step, value → its last read (outputs: the last step), and intermediate
    → the output whose buffer it shares (``_in_place_chains``)."""
    end = max(len(program.eqns) - 1, 0)
    donated = set(donated)
    born: dict[int, int] = {}
    last: dict[int, int] = {}
    for vid, _ in program.constants:
        born[vid] = 0
    for vid in program.invars:
        born[vid] = 0
        last[vid] = 0 if vid in donated else end
    for e, eqn in enumerate(program.eqns):
        for atom in eqn.inputs:
            if not isinstance(atom, Literal) and e not in writers:
                last[atom] = max(last.get(atom, e), e)
        for vid in eqn.outputs:
            born[vid] = e
    _hoist_scatter_targets(program, born)
    _hoist_donated_flips(program, donated, born)
    aliased = aliased_outputs(program, [v for v in program.invars if v in donated])
    for o, atom in enumerate(program.outvars):
        if not isinstance(atom, Literal):
            last[atom] = end
            if o not in aliased:
                born[atom] = 0
    shared = _in_place_chains(program, [a for o, a in enumerate(program.outvars)
                                        if o not in aliased and not isinstance(a, Literal)], last)
    return born, last, shared


#: primitives that write their result over operand 0 (the "target")
_SCATTERS = frozenset({"scatter", "scatter-add", "scatter-mul", "scatter-min", "scatter-max"})


def _hoist_scatter_targets(program: Program, born: dict[int, int]) -> None:
    """A scatter's target made from constants alone (the zeros an embedding gradient is
    summed into) is made where XLA's post-order schedule puts it: before everything its
    scatter waits for, as its first operand (measured: the zeroed gradient of a 32768-row
    embedding table is made before the forward pass and held through both passes). Updates
    ``born`` in place."""
    made: dict[int, int] = {}
    earliest: list[int] = []  # per equation: the first step of it and everything it waits for
    for e, eqn in enumerate(program.eqns):
        earliest.append(min([e] + [earliest[made[a]] for a in eqn.inputs
                                   if not isinstance(a, Literal) and a in made]))
        for v in eqn.outputs:
            made[v] = e
    for eqn in program.eqns:
        target = eqn.inputs[0] if eqn.primitive.name in _SCATTERS else None
        if target is None or isinstance(target, Literal) or target not in made or \
                any(not isinstance(a, Literal) for a in program.eqns[made[target]].inputs):
            continue
        born[target] = min([made[target]] + [earliest[made[a]] for a in eqn.inputs[1:]
                                             if not isinstance(a, Literal) and a in made])


def _hoist_donated_flips(program: Program, donated: set[int], born: dict[int, int]) -> None:
    """A donated argument flipped by ``rev`` (the kernel a convolution's input gradient
    reads) is flipped where XLA's schedule puts it: at the start, before the forward pass
    (measured on jax 0.10 CPU, a Wide-ResNet block's two kernels, each flipped and
    relayouted in one copy, both made first and held to their backward convolutions, on
    the heap when the kernels are donated: 1.15x the peak with the flips at their own
    steps). Undonated, XLA's schedule holds them as early in the new kernels' buffers,
    which it writes after the input gradients; the traced program computes each filter
    gradient, which starts that buffer, before its input gradient, so there the flip stays
    at its own step, where it also takes no heap. Updates ``born`` in place."""
    for eqn in program.eqns:
        if eqn.primitive.name == "rev" and eqn.inputs[0] in donated:
            for v in eqn.outputs:
                born[v] = 0


def _read_where_fused(program: Program, fused: frozenset[int], last: dict[int, int]
                      ) -> dict[int, int]:
    """A fused value is computed inside each fusion that reads it, from its equation's
    operands: they stay live until its last reader (a softmax's scores, read again by the
    backward pass's fusions). Not through readers whose fused chain ends in a program output
    (an optimizer's update): XLA runs that fusion as soon as its operands exist, not where
    the program lists it. Updates ``last`` in place; returns each fused value's last step
    (-1: only in fusions that end in outputs)."""
    outputs = {a for a in program.outvars if not isinstance(a, Literal)}
    read_by = readers(program)
    to_output = [False] * len(program.eqns)
    reach: dict[int, int] = {}  # fused value -> the last step a fusion computes it in
    for e in range(len(program.eqns) - 1, -1, -1):  # readers first
        eqn = program.eqns[e]
        to_output[e] = any(v in outputs or (v in fused and any(to_output[r] for r in read_by[v]))
                           for v in eqn.outputs)
        until = -1
        for v in eqn.outputs:
            if v in fused:
                for r in read_by[v]:
                    if not to_output[r]:
                        until = max(until, r, *(reach.get(w, -1) for w in program.eqns[r].outputs))
                reach[v] = until
        if until >= 0:
            for atom in eqn.inputs:
                if not isinstance(atom, Literal):
                    last[atom] = max(last.get(atom, until), until)
    return reach


def aliased_outputs(program: Program, donated: list[int]) -> set[int]:
    """Output positions that take over a donated argument's buffer (first unused output
    with its shape and dtype, in argument order)."""
    return set(_alias_positions(program, donated).values())


def donated_aliases(program: Program, donated: Iterable[int]) -> dict[int, int]:
    """Donated argument → the output value that takes over its buffer (as
    :func:`aliased_outputs` pairs them); arguments no output takes over are left out."""
    donated = set(donated)
    pairs = _alias_positions(program, [v for v in program.invars if v in donated])
    return {vid: program.outvars[o] for vid, o in pairs.items()}


def _alias_positions(program: Program, donated: list[int]) -> dict[int, int]:
    """Donated argument → the position of the first unused output with its shape and
    dtype, in argument order."""
    taken: dict[int, int] = {}
    used: set[int] = set()
    for vid in donated:
        for o, atom in enumerate(program.outvars):
            if o not in used and not isinstance(atom, Literal) and \
                    _same_buffer_type(program, atom, vid):
                taken[vid] = o
                used.add(o)
                break
    return taken


def _in_place_chains(program: Program, outputs: list[int], last: dict[int, int]) -> dict[int, int]:
    """Intermediates written over in place on the way to an output (→ that output):
    walking back from each output through elementwise equations and scatters, the first
    operand of the output's shape and dtype that is an intermediate read for the last time
    there (a scatter's: its target)."""
    defined_by = makers(program)
    outside = set(program.invars) | {vid for vid, _ in program.constants} | set(outputs)
    shared: dict[int, int] = {}
    for out in outputs:
        vid = out
        while vid in defined_by:
            e = defined_by[vid]
            eqn = program.eqns[e]
            name = eqn.primitive.name
            if (name not in ELEMENTWISE and name not in _SCATTERS) or len(eqn.outputs) != 1:
                break
            operands = eqn.inputs[:1] if name in _SCATTERS else eqn.inputs  # over the target
            reused = next((a for a in operands if not isinstance(a, Literal)
                           and a not in outside and a not in shared and last.get(a) == e
                           and _same_buffer_type(program, a, vid)), None)
            if reused is None:
                break
            shared[reused] = out
            vid = reused
    return shared


def _same_buffer_type(program: Program, a: int, b: int) -> bool:
    return tuple(program.avals[a].shape) == tuple(program.avals[b].shape) and \
        program.avals[a].dtype == program.avals[b].dtype


def live_bytes(ranges: Mapping[int, tuple[int, int]], value_bytes: Mapping[int, float],
               num_steps: int) -> np.ndarray:
    """Bytes per device live at each step, given each value's (first, last) step and bytes."""
    delta = np.zeros(max(num_steps, 1) + 1)
    for vid, (b, l) in ranges.items():
        nbytes = value_bytes.get(vid, 0)
        delta[b] += nbytes
        delta[l + 1] -= nbytes
    return np.cumsum(delta[:-1])
