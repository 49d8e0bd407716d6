"""A flat, executable program: the traced function with every call inlined.

The tracer (in ``autoshard``) builds a :class:`Program`; the runtime evaluates it
inside ``jax.jit``. Values are integer ids; an equation reads values or literal
constants and writes values.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class Literal:
    """A constant operand written inline in an equation (a Python scalar or array)."""

    value: Any

    def __repr__(self):
        return f"Literal({self.value!r})"

    def scalar(self) -> tuple[str, Any] | None:
        """(dtype, value as a Python number) of a scalar constant; None for an array."""
        if np.ndim(self.value) != 0:
            return None
        value = np.asarray(self.value)
        return value.dtype.str, value.item()


@dataclasses.dataclass(frozen=True, eq=False)
class Equation:
    """One primitive application: ``outputs = primitive.bind(*inputs, **params)``.

    ``inputs`` are value ids or :class:`Literal`; ``outputs`` are value ids
    (an output nobody reads still gets an id).
    """

    primitive: Any
    params: dict
    inputs: tuple
    outputs: tuple[int, ...]
    #: jax's ``SourceInfo`` of the user's equation it was traced from (None for ours), so
    #: that a program evaluated again (a pipeline stage's) still names the user's lines
    source_info: Any = None

    def __repr__(self):
        return f"Equation({self.primitive.name}, in={self.inputs}, out={self.outputs})"


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """A flat program over value ids.

    ``avals[i]`` is the abstract value (shape, dtype) of value ``i``;
    ``constants`` binds value ids to arrays captured by the traced function.
    """

    avals: tuple
    invars: tuple[int, ...]
    outvars: tuple  # value ids or Literal
    eqns: tuple[Equation, ...]
    constants: tuple[tuple[int, Any], ...] = ()

    def __repr__(self):
        return (f"Program({len(self.invars)} inputs, {len(self.outvars)} outputs, "
                f"{len(self.eqns)} equations)")


def readers(program: Program) -> dict[int, list[int]]:
    """Value id → the indices of the equations that read it, in program order, each once
    (values nothing reads are absent)."""
    read_by: dict[int, list[int]] = {}
    for e, eqn in enumerate(program.eqns):
        for atom in eqn.inputs:
            if not isinstance(atom, Literal):
                seen = read_by.setdefault(atom, [])
                if not seen or seen[-1] != e:
                    seen.append(e)
    return read_by


def per_program(analysis: Callable[..., _T]) -> Callable[..., _T]:
    """``analysis(program, *args)`` computed once per program and arguments: a program
    never changes, and the planner asks for its fusion, liveness and copies again for
    every plan it prices. The result is kept on the program (keyed by the arguments, a
    list as a tuple, a set as a frozenset) and shared: callers must not change it."""
    def hashable(a):
        return tuple(a) if isinstance(a, list) else frozenset(a) if isinstance(a, set) else a

    @functools.wraps(analysis)
    def memoized(program: Program, *args, **kwargs):
        key = (analysis, tuple(map(hashable, args)),
               tuple(sorted((k, hashable(v)) for k, v in kwargs.items())))
        found = program.__dict__.setdefault("_analyses", {})
        if key not in found:
            found[key] = analysis(program, *args, **kwargs)
        return found[key]
    return memoized


@per_program
def makers(program: Program) -> dict[int, int]:
    """Value id → the index of the equation that makes it (the program's inputs and
    constants are absent). Shared: do not change it."""
    return {v: e for e, eqn in enumerate(program.eqns) for v in eqn.outputs}
