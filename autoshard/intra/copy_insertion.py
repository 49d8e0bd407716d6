"""Donated arguments XLA copies before the step writes over them.

An output that takes over a donated argument's buffer is written where the argument was.
XLA's copy insertion leaves it so only when the output depends on every equation that
reads the argument (each read then comes before the write); otherwise it copies the
argument at the start of the step, and every read reads the copy (the argument's own
buffer is free from then until the write). A training step's input gradient
(``dy @ wᵀ``) is such a read: the update ``w - lr * g`` waits for ``g = xᵀ @ dy``, not
for it. An all-reduce XLA merges the gradients into (``combining``) makes every update
wait for every gradient, hence for the whole backward pass: on a data-parallel step
nothing is copied.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable

from autoshard.ir.program import Literal, Program, readers

from .liveness import donated_aliases


def copied_arguments(program: Program, donated: Iterable[int],
                     merged: Collection[int] = ()) -> frozenset[int]:
    """The donated arguments XLA copies (see the module docstring). ``merged``: values
    whose all-reduces XLA merges into one (a value that depends on any of them depends on
    all of them)."""
    aliases = donated_aliases(program, donated)
    read_by = readers(program)
    bit: dict[int, int] = {}  # equation reading an aliased argument -> its bit
    for v in aliases:
        for e in read_by.get(v, ()):
            bit.setdefault(e, len(bit))
    if not bit:
        return frozenset()
    depends = _dependencies(program, bit, {})
    if merged:
        joined = 0
        for v in merged:
            joined |= depends.get(v, 0)
        depends = _dependencies(program, bit, dict.fromkeys(merged, joined))
    return frozenset(v for v, out in aliases.items()
                     if any(not depends.get(out, 0) >> bit[e] & 1 for e in read_by.get(v, ())))


def _dependencies(program: Program, bit: dict[int, int], fixed: dict[int, int]) -> dict[int, int]:
    """Value → the bits of the equations in ``bit`` it depends on (an equation's outputs
    depend on it), as an int; ``fixed`` values depend on their given bits as well."""
    depends: dict[int, int] = {}
    for e, eqn in enumerate(program.eqns):
        mask = 1 << bit[e] if e in bit else 0
        for atom in eqn.inputs:
            if not isinstance(atom, Literal):
                mask |= depends.get(atom, 0)
        for v in eqn.outputs:
            depends[v] = mask | fixed.get(v, 0)
    return depends
