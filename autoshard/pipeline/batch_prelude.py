"""Work on the batch written before the function a step differentiates, moved into it.

``inputs, targets = tokens[:, :-1], tokens[:, 1:]`` or ``weights = jnp.where(targets > 0,
1.0, 0.0)`` before ``jax.value_and_grad(loss_fn)``, the loss closing over the results: a
pipeline splits the batch into micro-batches only inside the loss, so these equations
become the loss's first equations, reading the batch arguments themselves (and whatever
else they read, undifferentiated, as they were outside the gradient). Each micro-batch then
computes them on its rows; whether the loss's outputs still combine into ``jax.jit``'s is
decided on the loss with them (``microbatch_outputs``): a count of the weights
(``weights.sum()``), moved in, is a sum over the batch like any other.

Equations whose results only these read move with them (a random draw they add to the
batch: made per micro-batch as the loss's own draws are, ``random_rows``). Nothing moves
when a value computed from the batch is returned, or read after the gradient by work that
does not move into the loss itself (``batch_epilogue``): the step is then refused as
before, naming the equation.
"""
from __future__ import annotations

import dataclasses

import jax

from autoshard.ir.program import Equation, Literal, Program
from autoshard.ir.trace import TracedFunction

#: primitives whose results are random values (not keys)
_DRAWS = frozenset({"random_bits", "threefry2x32"})


@dataclasses.dataclass(frozen=True)
class LossOutputs:
    """The step and its loss after work on the batch moved into it: ``program`` (the step,
    its gradient marker at ``grad_eqn``), ``sources`` (per equation), ``forward`` (the
    loss), ``diff`` and ``batch`` (per loss input), ``aux_paths`` (per aux leaf, how
    errors name it)."""

    program: Program
    sources: tuple[str, ...]
    grad_eqn: int
    forward: TracedFunction
    diff: tuple[bool, ...]
    batch: tuple[bool, ...]
    aux_paths: tuple[str, ...]


def kept_aux_paths(aux_paths, keep) -> tuple[str, ...]:
    """The paths of the aux leaves a rewritten loss keeps: ``keep``, their places among the
    old loss's outputs (1 is the first aux leaf)."""
    return tuple(aux_paths[k - 1] if k - 1 < len(aux_paths) else f" leaf {k - 1}" for k in keep)


def moved_into_loss(program: Program, sources, grad_eqn: int, batch_vids,
                    forward: TracedFunction, diff, batch, in_paths,
                    aux_paths=()) -> LossOutputs | None:
    """``program`` with the equations before ``grad_eqn`` that read the batch (``batch_vids``)
    moved into ``forward`` (module doc); ``None`` when none do, or when they cannot move."""
    eqns = program.eqns
    geqn = eqns[grad_eqn]
    moved, derived = set(), set(batch_vids)
    for e, eqn in enumerate(eqns):
        if e != grad_eqn and any(a in derived for a in eqn.inputs if isinstance(a, int)):
            if e > grad_eqn:
                return None   # read after the gradient: refused by the caller
            moved.add(e)
            derived.update(eqn.outputs)
    if not moved:
        return None
    readers: dict[int, set] = {}
    for e, eqn in enumerate(eqns):
        for a in eqn.inputs:
            if isinstance(a, int):
                readers.setdefault(a, set()).add(e)
    outvars = {a for a in program.outvars if isinstance(a, int)}
    made_by = {v: e for e, eqn in enumerate(eqns) for v in eqn.outputs}
    for e in range(grad_eqn - 1, -1, -1):   # what only the moved equations read moves too
        if e not in moved and eqns[e].outputs and all(
                v not in outvars and readers.get(v) and readers[v] <= moved
                for v in eqns[e].outputs):
            moved.add(e)
    order = sorted(moved)
    results = {v for e in order for v in eqns[e].outputs}
    if any(v in outvars or (readers.get(v, set()) - moved - {grad_eqn}) for v in results):
        return None   # a result read elsewhere than by the loss: refused by the caller
    if any(d and isinstance(a, int) and a in results for a, d in zip(geqn.inputs, diff)):
        return None   # differentiated with respect to: refused by the caller
    outside = list(dict.fromkeys(a for e in order for a in eqns[e].inputs
                                 if isinstance(a, int) and a not in results))
    if any(_drawn(program, made_by, a) for a in outside if a not in batch_vids):
        return None   # random values shaped like a micro-batch, the same in each one
    F = forward.program
    avals = list(F.avals)
    ids = {}
    for v in outside + [v for e in order for v in eqns[e].outputs]:
        ids[v] = len(avals)
        avals.append(program.avals[v])
    kept = [k for k, a in enumerate(geqn.inputs) if not (isinstance(a, int) and a in results)]
    rename = {F.invars[k]: ids[a] for k, a in enumerate(geqn.inputs)
              if isinstance(a, int) and a in results}
    swap = lambda a: a if isinstance(a, Literal) else rename.get(a, a)  # noqa: E731
    first = tuple(Equation(eqns[e].primitive, eqns[e].params,
                           tuple(a if isinstance(a, Literal) else ids[a] for a in eqns[e].inputs),
                           tuple(ids[v] for v in eqns[e].outputs), eqns[e].source_info)
                  for e in order)
    rest = tuple(Equation(eqn.primitive, eqn.params, tuple(swap(a) for a in eqn.inputs),
                          eqn.outputs, eqn.source_info) for eqn in F.eqns)
    invars = tuple(F.invars[k] for k in kept) + tuple(ids[v] for v in outside)
    F2 = Program(tuple(avals), invars, tuple(swap(a) for a in F.outvars), first + rest,
                 F.constants)
    path = dict(zip(program.invars, in_paths))
    forward2 = dataclasses.replace(
        forward, program=F2, in_tree=jax.tree_util.tree_structure((0,) * len(invars)),
        in_paths=tuple(forward.in_paths[k] for k in kept) +
        tuple(path.get(v, f"value{v}") for v in outside),
        sources=tuple(sources[e] for e in order) + tuple(forward.sources),
        scopes=("",) * len(order) + tuple(forward.scopes) if forward.scopes else ())
    diff2 = tuple(diff[k] for k in kept) + (False,) * len(outside)
    batch2 = tuple(batch[k] for k in kept) + tuple(v in batch_vids for v in outside)
    geqn2 = Equation(geqn.primitive, {**geqn.params, "diff": diff2},
                     tuple(geqn.inputs[k] for k in kept) + tuple(outside), geqn.outputs,
                     geqn.source_info)
    left = [e for e in range(len(eqns)) if e not in moved]
    program2 = Program(program.avals, program.invars, program.outvars,
                       tuple(geqn2 if e == grad_eqn else eqns[e] for e in left),
                       program.constants)
    return LossOutputs(program2, tuple(sources[e] for e in left), left.index(grad_eqn),
                       forward2, diff2, batch2, tuple(aux_paths))


def _drawn(program: Program, made_by, value: int) -> bool:
    """Whether ``value`` is computed from a random draw."""
    seen, todo = set(), [value]
    while todo:
        v = todo.pop()
        e = made_by.get(v)
        if e is None or e in seen:
            continue
        seen.add(e)
        if program.eqns[e].primitive.name in _DRAWS:
            return True
        todo.extend(a for a in program.eqns[e].inputs if isinstance(a, int))
    return False
