"""Recomputing forward activations in the backward pass: a rewrite of a traced program.

A training step's program runs the forward pass, then the backward pass, which reads
values the forward made (its residuals: what a step stores between the two passes). The
*turn* is the equation where the backward begins. :func:`recompute` takes contiguous
segments of equations before the turn and, for each, recomputes the segment's values
that equations at or after the turn read: a copy of the equations that make them is
inserted just before the first such reader, and the readers at or after the turn read the
copies. The originals then die in the forward pass; the segment's inputs (the layer's
input activation, the parameters) stay stored in their place.

The copy reads each of its inputs that an equation made (the layer's input activation; the
step's arguments, such as parameters, it reads as they are, except the smallest argument of
an equation that reads nothing else, such as the token ids of an embedding lookup) plus a
zero made from a value of the backward pass (the sum of an operand of the first reader,
times zero): so XLA can neither merge the copy back into the original (CSE) nor run it
before the backward pass reaches it. An ``optimization_barrier`` alone, as jax lowers
``jax.checkpoint``, does neither on XLA's CPU backend, which removes barriers before CSE
(measured: the recomputation vanished and the compiled temporaries did not shrink). The
sum is exact unless the backward value holds an infinity or NaN, which then reaches these
gradients too.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from jax import lax

from .jax_compat import optimization_barrier_primitive
from .program import Equation, Literal, makers, readers
from .trace import TracedFunction


@dataclasses.dataclass(frozen=True)
class Rematerialization:
    """Which forward segments a plan recomputes in the backward pass.

    ``turn``: the equation (of the traced program) where the backward pass begins;
    ``segments``: ``(start, stop)`` equation ranges before ``turn``, in order, whose
    values read at or after ``turn`` are recomputed there instead of stored."""

    turn: int
    segments: tuple[tuple[int, int], ...]

    def __post_init__(self):
        stop = 0
        for start, end in self.segments:
            if not stop <= start < end <= self.turn:
                raise ValueError(f"rematerialized segments must be ordered, non-empty, "
                                 f"disjoint ranges before the turn (equation {self.turn}); "
                                 f"got {self.segments}")
            stop = end

    def __repr__(self):
        return f"Rematerialization(turn={self.turn}, equations {self._ranges()})"

    def describe(self) -> str:
        """One line for a plan's summary."""
        return (f"recomputed in the backward pass instead of stored: the activations of "
                f"{len(self.segments)} forward segment(s), equations {self._ranges()} (the "
                f"backward pass begins at equation {self.turn})")

    def _ranges(self) -> str:
        return ", ".join(f"{a}-{b - 1}" for a, b in self.segments)


def recompute(traced: TracedFunction, remat: Rematerialization) -> TracedFunction:
    """``traced`` with each segment of ``remat`` recomputed before its first reader at or
    after the turn (see the module doc); the same function, value for value. New values
    and equations are numbered deterministically, so a saved plan's value ids and
    equation indices refer to the same rewritten program in every process."""
    program = traced.program
    if remat.turn > len(program.eqns):
        raise ValueError(f"{remat!r} does not fit a program of {len(program.eqns)} equations")
    avals = list(program.avals)
    eqns = program.eqns
    late = {v: after for v, r in readers(program).items()
            if (after := [e for e in r if e >= remat.turn])}  # value -> its backward readers
    made_at = makers(program)
    stored = set(program.invars) | {v for v, _ in program.constants}  # read as they are
    inserted: dict[int, list[tuple[Equation, int]]] = {}  # reader -> (copy, original eqn)
    reads: dict[int, dict[int, int]] = {}  # late reader -> {original value: its copy}

    def new_value(aval) -> int:
        avals.append(aval)
        return len(avals) - 1

    def splice(jaxpr, ins: Sequence[int], origin: int, block: list) -> int:
        """``jaxpr``'s equations appended to ``block`` reading ``ins``; its one output."""
        env = dict(zip(jaxpr.jaxpr.invars, ins, strict=True))
        read = lambda a: Literal(a.val) if isinstance(a, jcore.Literal) else env[a]  # noqa: E731
        for eqn in jaxpr.jaxpr.eqns:
            for var in eqn.outvars:
                env[var] = new_value(var.aval)
            block.append((Equation(eqn.primitive, dict(eqn.params),
                                   tuple(read(a) for a in eqn.invars),
                                   tuple(env[var] for var in eqn.outvars),
                                   eqn.source_info), origin))
        return read(jaxpr.jaxpr.outvars[0])

    for start, stop in remat.segments:
        made = {v: e for e in range(start, stop) for v in eqns[e].outputs}
        residuals = [v for v in made if v in late]
        if not residuals:
            continue
        needed: set[int] = set()
        stack = [made[v] for v in residuals]
        while stack:
            e = stack.pop()
            if e not in needed:
                needed.add(e)
                stack.extend(made[a] for a in eqns[e].inputs if isinstance(a, int) and a in made)
        first = min(r for v in residuals for r in late[v])
        block: list[tuple[Equation, int]] = []
        anchor = _anchor(eqns, made_at, first, remat.turn)
        zero = None if anchor is None else splice(
            _zero_of(tuple(avals[anchor].shape), avals[anchor].dtype), [anchor], first, block)
        copy: dict[int, int] = {}
        for e in sorted(needed):
            eqn = eqns[e]
            values = [a for a in eqn.inputs if not isinstance(a, Literal)]
            # what it reads from before the segment, and, when it reads only the step's
            # arguments (an embedding's lookup), the smallest of them (the token ids)
            outside = [a for a in values if a not in made and a not in stored]
            if not outside and not any(a in made for a in values) and values:
                outside = [min(values, key=lambda a: np.prod(avals[a].shape))]
            for a in outside:
                if a in copy:
                    continue
                if zero is not None and _numeric(avals[a].dtype):
                    copy[a] = splice(_plus(tuple(avals[a].shape), avals[a].dtype), [a, zero],
                                     e, block)
                else:
                    copy[a] = new_value(avals[a])
                    block.append((Equation(optimization_barrier_primitive(), {}, (a,),
                                           (copy[a],)), e))
            outs = [new_value(avals[v]) for v in eqn.outputs]
            copy.update(zip(eqn.outputs, outs))
            block.append((Equation(eqn.primitive, eqn.params,
                                   tuple(a if isinstance(a, Literal) else copy.get(a, a)
                                         for a in eqn.inputs), tuple(outs),
                                   eqn.source_info), e))
        inserted.setdefault(first, []).extend(block)
        for v in residuals:
            for r in late[v]:
                reads.setdefault(r, {})[v] = copy[v]

    new_eqns, sources, scopes = [], [], []
    scope_of = lambda e: traced.scopes[e] if e < len(traced.scopes) else ""  # noqa: E731
    for e, eqn in enumerate(eqns):
        for copied, original in inserted.get(e, ()):
            new_eqns.append(copied)
            sources.append(traced.sources[original])
            scopes.append(scope_of(original))
        if e in reads:
            swap = reads[e]
            eqn = dataclasses.replace(eqn, inputs=tuple(
                a if isinstance(a, Literal) else swap.get(a, a) for a in eqn.inputs))
        new_eqns.append(eqn)
        sources.append(traced.sources[e])
        scopes.append(scope_of(e))
    rewritten = dataclasses.replace(program, avals=tuple(avals), eqns=tuple(new_eqns))
    return dataclasses.replace(traced, program=rewritten, sources=tuple(sources),
                               scopes=tuple(scopes))


def _anchor(eqns, made_at: dict[int, int], first: int, turn: int) -> int | None:
    """A value of the backward pass that exists when equation ``first`` runs: one of its
    operands made at or after the turn, else what the equation before it made."""
    for a in eqns[first].inputs:
        if not isinstance(a, Literal) and made_at.get(a, -1) >= turn:
            return a
    return eqns[first - 1].outputs[0] if first - 1 >= turn and eqns[first - 1].outputs else None


def _numeric(dtype) -> bool:
    return np.issubdtype(dtype, np.number) or dtype == jnp.bfloat16


@functools.cache
def _zero_of(shape: tuple[int, ...], dtype):
    """The jaxpr of a float32 zero computed from an array of ``shape`` and ``dtype``."""
    return jax.make_jaxpr(lambda a: jnp.sum(a, dtype=jnp.float32) * 0.0)(
        jax.ShapeDtypeStruct(shape, dtype))


@functools.cache
def _plus(shape: tuple[int, ...], dtype):
    """The jaxpr of ``x + zero`` for ``x`` of ``shape`` and ``dtype``, a float32 ``zero``."""
    def plus(x, zero):
        zero = lax.broadcast_in_dim(lax.convert_element_type(zero, dtype), shape, ())
        return lax.add(x, zero)
    return jax.make_jaxpr(plus)(jax.ShapeDtypeStruct(shape, dtype),
                                jax.ShapeDtypeStruct((), jnp.float32))
