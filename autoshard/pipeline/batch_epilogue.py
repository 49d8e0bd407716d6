"""Work on the batch written after the gradient, moved into the loss; aux leaves nothing
reads, dropped.

``(loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)`` then
``accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)``, as flax's examples compute
their metrics: the logits are the whole batch's, one micro-batch's in a pipeline. The
equations after the gradient that read the batch (and the loss's aux leaves, and what
they compute) become the loss's last equations, and the values the step reads from them
its new aux leaves; whether those combine into ``jax.jit``'s values over the micro-batches
is decided on the loss with them (``microbatch_outputs``: the accuracy is a mean). Aux
leaves the step then never reads (the logits) are no longer outputs of the loss.

Nothing moves when those equations read a gradient or a value computed after the gradient
from something else (an optimizer's): the step is then refused as before, naming the
equation.
"""
from __future__ import annotations

import dataclasses

import jax

from autoshard.ir.program import Equation, Literal, Program
from autoshard.ir.trace import TracedFunction

from .batch_prelude import LossOutputs, kept_aux_paths


def moved_after_loss(program: Program, sources, grad_eqn: int, batch_vids,
                     forward: TracedFunction, diff, batch, aux_paths) -> LossOutputs | None:
    """``program`` with the equations after ``grad_eqn`` that read the batch moved into
    ``forward`` (module doc); ``None`` when none do, or when they cannot move."""
    eqns, geqn, F = program.eqns, program.eqns[grad_eqn], forward.program
    values = geqn.outputs[:len(F.outvars)]
    # equations after the gradient that read no gradient (nor anything computed from one)
    # may move; those that read the batch move, with what they read that may move too
    tainted = set(geqn.outputs[len(values):])
    movable = []
    for e in range(grad_eqn + 1, len(eqns)):
        if any(a in tainted for a in eqns[e].inputs if isinstance(a, int)):
            tainted.update(eqns[e].outputs)
        else:
            movable.append(e)
    reads_batch, moved = set(batch_vids), set()
    for e in range(grad_eqn):   # (values computed from the batch before: a sliced target)
        if any(a in reads_batch for a in eqns[e].inputs if isinstance(a, int)):
            reads_batch.update(eqns[e].outputs)
    for e in movable:
        if any(a in reads_batch for a in eqns[e].inputs if isinstance(a, int)):
            reads_batch.update(eqns[e].outputs)
            moved.add(e)
    wanted = {a for e in moved for a in eqns[e].inputs if isinstance(a, int)}
    for e in reversed(movable):
        if e not in moved and wanted & set(eqns[e].outputs):
            moved.add(e)
            wanted.update(a for a in eqns[e].inputs if isinstance(a, int))
    moved = sorted(moved)
    if not moved:
        return None
    made = {v for e in moved for v in eqns[e].outputs}
    outside = list(dict.fromkeys(a for e in moved for a in eqns[e].inputs
                                 if isinstance(a, int) and a not in made))
    outvars = {a for a in program.outvars if isinstance(a, int)}
    kept = [e for e in range(len(eqns)) if e not in set(moved)]
    read = {a for e in kept for a in eqns[e].inputs if isinstance(a, int)} | outvars
    exports = [v for e in moved for v in eqns[e].outputs if v in read]
    avals, invars = list(F.avals), list(F.invars)
    inputs, diff, batch = list(geqn.inputs), list(diff), list(batch)
    ids = {v: F.outvars[k] for k, v in enumerate(values)}
    for k, a in enumerate(geqn.inputs):
        if isinstance(a, int):
            ids.setdefault(a, F.invars[k])
    paths = list(forward.in_paths)
    for a in outside:
        if a not in ids:   # another input of the loss, not differentiated
            ids[a] = len(avals)
            avals.append(program.avals[a])
            invars.append(ids[a])
            inputs.append(a)
            diff.append(False)
            batch.append(a in batch_vids)
            paths.append(f"value{a}")
    for e in moved:
        for v in eqns[e].outputs:
            ids[v] = len(avals)
            avals.append(program.avals[v])
    after = tuple(Equation(eqns[e].primitive, eqns[e].params,
                           tuple(a if isinstance(a, Literal) else ids[a] for a in eqns[e].inputs),
                           tuple(ids[v] for v in eqns[e].outputs), eqns[e].source_info)
                  for e in moved)
    producer = {v: e for e in moved for v in eqns[e].outputs}
    F2 = Program(tuple(avals), tuple(invars), tuple(F.outvars) + tuple(ids[v] for v in exports),
                 tuple(F.eqns) + after, F.constants)
    named = tuple(f" (computed from the batch after the gradient, at {sources[producer[v]]})"
                  for v in exports)
    forward2 = dataclasses.replace(
        forward, program=F2, in_tree=jax.tree_util.tree_structure((0,) * len(invars)),
        out_tree=jax.tree_util.tree_structure((0,) * len(F2.outvars)), in_paths=tuple(paths),
        out_paths=tuple(forward.out_paths) + tuple(f"aux{p}" for p in named),
        sources=tuple(forward.sources) + tuple(sources[e] for e in moved),
        scopes=tuple(forward.scopes) + ("",) * len(moved) if forward.scopes else ())
    geqn2 = Equation(geqn.primitive, {**geqn.params, "diff": tuple(diff)}, tuple(inputs),
                     tuple(values) + tuple(exports) + tuple(geqn.outputs[len(values):]),
                     geqn.source_info)
    program2 = Program(program.avals, program.invars, program.outvars,
                       tuple(geqn2 if e == grad_eqn else eqns[e] for e in kept),
                       program.constants)
    return LossOutputs(program2, tuple(sources[e] for e in kept), kept.index(grad_eqn),
                       forward2, tuple(diff), tuple(batch), tuple(aux_paths) + named)


def unread_aux_dropped(program: Program, grad_eqn: int, forward: TracedFunction,
                       aux_paths) -> tuple[Program, TracedFunction, tuple[str, ...]] | None:
    """``program`` and its loss without the aux leaves no equation reads and the step does
    not return (the logits its metrics were computed from); ``None`` when there are none."""
    geqn, F = program.eqns[grad_eqn], forward.program
    read = {a for e, eqn in enumerate(program.eqns) if e != grad_eqn
            for a in eqn.inputs if isinstance(a, int)}
    read |= {a for a in program.outvars if isinstance(a, int)}
    n_val = len(F.outvars)
    keep = [0] + [k for k in range(1, n_val) if geqn.outputs[k] in read]
    if len(keep) == n_val:
        return None
    F2 = Program(F.avals, F.invars, tuple(F.outvars[k] for k in keep), F.eqns, F.constants)
    forward2 = dataclasses.replace(
        forward, program=F2, out_tree=jax.tree_util.tree_structure((0,) * len(keep)),
        out_paths=tuple(forward.out_paths[k] for k in keep))
    geqn2 = Equation(geqn.primitive, geqn.params, geqn.inputs,
                     tuple(geqn.outputs[k] for k in keep) + tuple(geqn.outputs[n_val:]),
                     geqn.source_info)
    program2 = Program(program.avals, program.invars, program.outvars,
                       tuple(geqn2 if e == grad_eqn else eqn
                             for e, eqn in enumerate(program.eqns)), program.constants)
    return program2, forward2, kept_aux_paths(aux_paths, keep[1:])
