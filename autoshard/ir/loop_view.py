"""A program's loops over layers spliced in once: the view a plan of a rolled scan is
searched on.

A ``lax.scan`` whose body contracts stays one loop when ShardParallel plans
(``trace(..., rolled_layers=True)``): layers scanned over stacked weights, as MaxText's
``scan_layers`` writes a model, and their transposes in the backward pass. The view
replaces each such scan by one copy of its body (``traced_body``) between
- an entry per body input: an identity of a const or a carry (resharded once, on the way
  into the loop), a slice of one step of a stacked operand (``x[0]``);
- a stack per stacked result: the step's result broadcast along a new leading dim of the
  loop's length, which writes what the loop writes over all its steps.

The body's equations run ``length`` times (``SplicedLoop.length``); the loop's carries go
back into its entries (``SplicedLoop.carried``). A plan of the view lays out every step
alike, as the loop runs them, and the forward loop, the backward loop and the optimizer
that reads the stacked weights are planned together, however many layers there are.
"""
from __future__ import annotations

import dataclasses
import functools

import jax

from .jax_compat import optimization_barrier_primitive
from .program import Equation, Literal, Program
from .trace import TracedFunction, traced_body


@dataclasses.dataclass(frozen=True)
class SplicedLoop:
    """Scan equation ``eqn`` of the program, spliced into the view.

    ``body``: the scan's body as a program of its own (``traced_body``); its value ``v`` is
    the view's ``v + offset``, its equation ``b`` the view's ``start + b`` (up to
    ``stop``). ``entries[k]``: the view's equation making body input ``k`` (an identity,
    or the squeeze ending a step's slice); ``slices[k]``: for a stacked operand, the view's
    equation slicing it (else ``None``); ``stacks[j]``: the view's equation stacking the
    body's ``j``-th stacked result. ``carried``: (the view's value a carry leaves the body
    as, the entry equation it goes back into). ``copies``: the copies of the body the
    compiled loop holds (a scan's ``unroll``: XLA runs ``length / copies`` iterations)."""

    eqn: int
    length: int
    body: Program
    start: int
    stop: int
    offset: int
    entries: tuple[int, ...]
    slices: tuple[int | None, ...]
    stacks: tuple[int, ...]
    carried: tuple[tuple[int, int], ...]
    copies: int = 1

    @property
    def runs(self) -> float:
        """How many times the compiled loop runs its body per call."""
        return self.length / self.copies

    def __repr__(self):
        return (f"SplicedLoop(equation {self.eqn}: {self.length} steps of "
                f"{self.stop - self.start} equations)")


@dataclasses.dataclass(frozen=True, eq=False)
class LoopView:
    """The view of ``program`` (``traced``) with ``loops`` spliced in. ``origins[e]``
    says what view equation ``e`` stands for: ``("program", e)``, ``("body", i, b)``,
    ``("entry", i, k)``, ``("slice", i, k)`` or ``("stack", i, j)`` (loop ``i``).
    ``renamed``: a loop's carry output in the program -> the view's value it is (the
    body's carry)."""

    traced: TracedFunction
    program: Program
    loops: tuple[SplicedLoop, ...]
    origins: tuple[tuple, ...]
    renamed: dict

    def __repr__(self):
        return f"LoopView({len(self.loops)} loops, {len(self.traced.program.eqns)} equations)"

    @functools.cached_property
    def per_step_copies(self) -> frozenset[int]:
        """The view equations standing for what a loop's ``dynamic_slice`` and
        ``dynamic_update_slice`` do each step: the slice of a step of a stacked operand
        and the stack of a stacked result (its ``squeeze`` is a reshape either way)."""
        return frozenset(e for e, origin in enumerate(self.origins)
                         if origin[0] in ("slice", "stack"))

    @functools.cached_property
    def held_buffers(self) -> tuple[tuple[int, int, int], ...]:
        """(view value, first step, last step) of each buffer a loop holds longer than the
        view's equations read or make it: a stacked operand, which the loop reads a step
        of every iteration, until its body's last equation; a stacked result, which the
        loop writes a step of every iteration into a buffer allocated before it, from the
        loop's first entry on."""
        eqns = self.traced.program.eqns
        held = []
        for loop in self.loops:
            first = min([*loop.entries, *(s for s in loop.slices if s is not None)],
                        default=loop.start)
            held += [(a, first, loop.stop - 1) for a in (eqns[s].inputs[0] for s in loop.slices
                                                         if s is not None)
                     if not isinstance(a, Literal)]
            held += [(eqns[s].outputs[0], first, loop.stop - 1) for s in loop.stacks]
        return tuple(held)

    @functools.cached_property
    def stack_equations(self) -> frozenset[int]:
        """The view equations stacking a loop's results: a step's value is written into
        the loop's buffer where it is made, not held until the stack reads it."""
        return frozenset(s for loop in self.loops for s in loop.stacks)

    def repeats(self, eqn: int) -> int:
        """How many times view equation ``eqn`` runs per call."""
        origin = self.origins[eqn]
        return self.loops[origin[1]].length if origin[0] == "body" else 1


@functools.lru_cache(maxsize=None)
def _step_of(shape: tuple, dtype):
    """The equations of ``x[0]`` (jax's own primitives and parameters)."""
    return jax.make_jaxpr(lambda x: jax.lax.index_in_dim(x, 0, keepdims=False))(
        jax.ShapeDtypeStruct(shape, dtype)).jaxpr


@functools.lru_cache(maxsize=None)
def _stacked(shape: tuple, dtype, length: int):
    """The equations of ``y`` broadcast along a new leading dim of ``length``."""
    return jax.make_jaxpr(lambda y: jax.lax.broadcast_in_dim(
        y, (length, *shape), tuple(range(1, len(shape) + 1))))(
        jax.ShapeDtypeStruct(shape, dtype)).jaxpr


def loop_view(traced: TracedFunction) -> LoopView | None:
    """``traced`` with every scan it kept a loop spliced in (module docstring); ``None``
    when it has none."""
    program = traced.program
    if not any(eqn.primitive.name == "scan" for eqn in program.eqns):
        return None
    avals = list(program.avals)
    constants = list(program.constants)
    eqns, sources, scopes, origins = [], [], [], []
    renamed: dict[int, object] = {}
    loops: list[SplicedLoop] = []
    scope_of = lambda e: traced.scopes[e] if e < len(traced.scopes) else ""  # noqa: E731

    def emit(equation, source, scope, origin) -> int:
        eqns.append(equation)
        sources.append(source)
        scopes.append(scope)
        origins.append(origin)
        return len(eqns) - 1

    def emit_small(jaxpr, atom, out: int, eqn, source, scope, origin) -> int:
        """``jaxpr``'s equations reading ``atom``, its result written to ``out``; the
        index of the last."""
        env = {jaxpr.invars[0]: atom}
        last = None
        for inner in jaxpr.eqns:
            outs = []
            for var in inner.outvars:
                if var is jaxpr.outvars[0]:
                    outs.append(out)
                else:
                    avals.append(var.aval)
                    outs.append(len(avals) - 1)
            for var, vid in zip(inner.outvars, outs, strict=True):
                env[var] = vid
            ins = tuple(env[a] if not hasattr(a, "val") else Literal(a.val) for a in inner.invars)
            last = emit(Equation(inner.primitive, dict(inner.params), ins, tuple(outs),
                                 eqn.source_info), source, scope, origin)
            origin = (origin[0] if origin[0] != "slice" else "entry",) + origin[1:]
        return last

    for e, eqn in enumerate(program.eqns):
        read = tuple(a if isinstance(a, Literal) else renamed.get(a, a) for a in eqn.inputs)
        if eqn.primitive.name != "scan":
            emit(Equation(eqn.primitive, eqn.params, read, eqn.outputs, eqn.source_info),
                 traced.sources[e], scope_of(e), ("program", e))
            continue
        i, params = len(loops), eqn.params
        n_consts, n_carry, length = params["num_consts"], params["num_carry"], params["length"]
        inner = traced_body(eqn)
        body = inner.program
        offset = len(avals)
        avals += body.avals
        constants += [(v + offset, c) for v, c in body.constants]
        entries, slices = [], []
        for k, atom in enumerate(read):
            made = body.invars[k] + offset
            if k < n_consts + n_carry:
                entries.append(emit(Equation(optimization_barrier_primitive(), {}, (atom,),
                                             (made,), eqn.source_info),
                                    traced.sources[e], scope_of(e), ("entry", i, k)))
                slices.append(None)
                continue
            aval = program.avals[atom] if not isinstance(atom, Literal) else \
                jax.ShapeDtypeStruct(jax.numpy.shape(atom.value), jax.numpy.result_type(atom.value))
            step = _step_of(tuple(aval.shape), aval.dtype)
            first = len(eqns)
            entries.append(emit_small(step, atom, made, eqn, traced.sources[e], scope_of(e),
                                      ("slice", i, k)))
            slices.append(first)
        start = len(eqns)
        for b, beqn in enumerate(body.eqns):
            emit(Equation(beqn.primitive, beqn.params,
                          tuple(a if isinstance(a, Literal) else a + offset for a in beqn.inputs),
                          tuple(v + offset for v in beqn.outputs), beqn.source_info),
                 inner.sources[b], inner.scopes[b] if b < len(inner.scopes) else scope_of(e),
                 ("body", i, b))
        stop = len(eqns)
        outs = [a if isinstance(a, Literal) else a + offset for a in body.outvars]
        carried = []
        for k in range(n_carry):
            renamed[eqn.outputs[k]] = outs[k]
            if not isinstance(outs[k], Literal):
                carried.append((outs[k], entries[n_consts + k]))
        stacks = []
        for j, y in enumerate(outs[n_carry:]):
            aval = program.avals[eqn.outputs[n_carry + j]]
            aval = jax.ShapeDtypeStruct(aval.shape[1:], aval.dtype)
            stacked = _stacked(tuple(aval.shape), aval.dtype, length)
            stacks.append(emit_small(stacked, y, eqn.outputs[n_carry + j], eqn,
                                     traced.sources[e], scope_of(e), ("stack", i, j)))
        unroll = params.get("unroll", 1)
        copies = length if unroll is True else max(1, min(int(unroll), length))
        loops.append(SplicedLoop(e, length, body, start, stop, offset, tuple(entries),
                                 tuple(slices), tuple(stacks), tuple(carried), copies))
    outvars = tuple(a if isinstance(a, Literal) else renamed.get(a, a) for a in program.outvars)
    view = Program(tuple(avals), program.invars, outvars, tuple(eqns), tuple(constants))
    return LoopView(dataclasses.replace(traced, program=view, sources=tuple(sources),
                                        scopes=tuple(scopes)),
                    program, tuple(loops), tuple(origins), renamed)
