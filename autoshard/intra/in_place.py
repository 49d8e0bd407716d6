"""Updates XLA writes over their target in place: what they read and write is the window.

A ``dynamic_update_slice``, and a scatter of one window (one index vector: ``x.at[i].set``,
``.add``, ``.multiply``..., which XLA rewrites into one), write only the window when the
target's buffer is theirs to write over. XLA's ``cost_analysis`` then counts the window
(measured on jax 0.10's CPU backend, a 1 MiB target: a ``dynamic_update_slice`` reads and
writes its update, 2x its bytes; a one-window scatter reads the window's old values too,
3x), not the target. The buffer is not theirs when the target is an argument the call
does not donate, a constant, a program output, or a value some other reader needs after
the update: XLA copies it first, which reads and writes it whole, as the update whole is
priced.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Hashable, Sequence

import jax.extend.core as jcore

from autoshard.ir.program import Literal, Program

#: the update primitives and the operand that holds their window's new values
UPDATE_OPERAND = {"dynamic_update_slice": 1, "scatter": 2, "scatter-add": 2,
                  "scatter-mul": 2, "scatter-min": 2, "scatter-max": 2}


def window_reads(name: str) -> int:
    """Times an update written in place reads or writes its update's bytes: read, written
    into the window, and for a scatter the window's old values read as well."""
    return 2 if name == "dynamic_update_slice" else 3


def one_window(name: str, index_shape: Sequence[int] | None) -> bool:
    """Whether update ``name`` with indices of ``index_shape`` writes one window: every
    ``dynamic_update_slice``; a scatter whose indices are one index vector."""
    if name == "dynamic_update_slice":
        return True
    return index_shape is not None and math.prod(index_shape[:-1]) == 1


def in_place_updates(eqns: Sequence, name_of: Callable[[object], str],
                     operands: Callable[[object], Sequence[Hashable | None]],
                     results: Callable[[object], Sequence[Hashable]],
                     index_shape: Callable[[object], Sequence[int] | None],
                     kept: Collection[Hashable]) -> frozenset[int]:
    """Indices of the one-window updates among ``eqns`` (in program order) that XLA writes
    over their target: the target is not in ``kept`` (arguments not donated, constants,
    program outputs) and every other reader of it is one the update depends on, so that
    all of them read it before it is written. Measured on a 1 MiB intermediate: read also
    by a sum the update does not wait for, or updated twice, XLA copies it first; read by a
    sum the update's values come from, it writes over it. ``operands(eqn)``: keys of its
    operands (None for a literal); ``results(eqn)``: keys of its results;
    ``index_shape(eqn)``: the shape of a scatter's indices."""
    targets: dict[int, Hashable] = {}  # update -> its target
    for e, eqn in enumerate(eqns):
        name = name_of(eqn)
        if name in UPDATE_OPERAND and one_window(name, index_shape(eqn)):
            target = operands(eqn)[0]
            if target is not None and target not in kept:
                targets[e] = target
    if not targets:
        return frozenset()
    watched = set(targets.values())
    readers: dict[Hashable, list[int]] = {}
    for e, eqn in enumerate(eqns):
        for key in operands(eqn):
            if key in watched and (not readers.get(key) or readers[key][-1] != e):
                readers.setdefault(key, []).append(e)
    # update -> the other readers of its target
    candidates = {e: [r for r in readers[t] if r != e] for e, t in targets.items()}
    bit = {r: k for k, r in enumerate(sorted({r for rs in candidates.values() for r in rs}))}
    if not bit:  # no target has another reader
        return frozenset(candidates)
    depends: dict[Hashable, int] = {}  # value -> bits of the tracked readers it depends on
    waits: dict[int, int] = {}         # update -> bits of the tracked readers it depends on
    for e, eqn in enumerate(eqns):
        mask = 0
        for key in operands(eqn):
            if key is not None:
                mask |= depends.get(key, 0)
        if e in candidates:
            waits[e] = mask
        if e in bit:
            mask |= 1 << bit[e]
        for key in results(eqn):
            depends[key] = mask
    return frozenset(e for e, others in candidates.items()
                     if all(waits[e] >> bit[r] & 1 for r in others))


def program_in_place(program: Program, donated: Collection[int] = ()) -> frozenset[int]:
    """:func:`in_place_updates` of ``program``'s equations; ``donated``: flat indices of
    the arguments the call donates (the others are kept)."""
    donated = set(donated)
    kept = {v for i, v in enumerate(program.invars) if i not in donated}
    kept |= {v for v, _ in program.constants}
    kept |= {v for v in program.outvars if not isinstance(v, Literal)}

    def operands(eqn):
        return [None if isinstance(a, Literal) else a for a in eqn.inputs]

    def index_shape(eqn):
        atom = eqn.inputs[1] if len(eqn.inputs) > 1 else None
        return None if atom is None or isinstance(atom, Literal) else \
            tuple(program.avals[atom].shape)

    return in_place_updates(program.eqns, lambda eqn: eqn.primitive.name, operands,
                            lambda eqn: eqn.outputs, index_shape, kept)


def body_in_place(jaxpr, owned_from: int) -> frozenset[int]:
    """:func:`in_place_updates` of a body ``jaxpr``'s equations (jax's own). Its inputs
    from ``owned_from`` on are its own to write over (a loop's carry and a scan's slices
    of its xs); those before it are its caller's (a loop's constants, a branch's
    operands)."""
    kept = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    kept |= {v for v in jaxpr.constvars} | set(jaxpr.invars[:owned_from])

    def operands(eqn):
        return [None if isinstance(v, jcore.Literal) else v for v in eqn.invars]

    def index_shape(eqn):
        atom = eqn.invars[1] if len(eqn.invars) > 1 else None
        return None if atom is None or isinstance(atom, jcore.Literal) else \
            tuple(atom.aval.shape)

    return in_place_updates(jaxpr.eqns, lambda eqn: eqn.primitive.name, operands,
                            lambda eqn: eqn.outvars, index_shape, kept)
