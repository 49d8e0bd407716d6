"""The step outside its loss computed at the whole batch's sizes, not one micro-batch's.

A pipeline traces the step at micro-batch shapes; the work outside the loss (the update,
the outputs) runs once per step, on whole-batch values. Where it reads the batch's size
(``examples_seen + x.shape[0]``, ``loss * x.shape[0]``, a metric's count of
``labels.size``), the trace wrote one micro-batch's size into it as a literal, and the
step would count one micro-batch. The step traced at the whole batch's shapes tells them
apart: its equations are the same, and a literal that differs is a size; it is taken from
there. A value outside the loss whose shape follows the batch
(``jnp.zeros(x.shape[0])``) is refused: the work outside the loss never sees the batch.
"""
from __future__ import annotations

import numpy as np

from autoshard.ir.program import Equation, Literal, Program


def with_whole_batch_sizes(program: Program, whole: Program, grad_eqn: int, batch_vids,
                           sources, name: str) -> Program:
    """``program`` (the step at micro-batch shapes) with the literals of its equations
    outside the loss that read nothing computed from the batch (``batch_vids``) taken from
    ``whole`` (the step at the whole batch's shapes), and its literal outputs too. Where
    the two programs are not the same equations, ``program`` as it is. Raises ValueError
    naming the equation that makes a value whose shape follows the batch there."""
    if not _aligned(program, whole):
        return program
    derived = set(batch_vids)
    eqns = list(program.eqns)
    for e, (eqn, other) in enumerate(zip(program.eqns, whole.eqns)):
        if e == grad_eqn:
            continue
        if any(a in derived for a in eqn.inputs if isinstance(a, int)):
            derived.update(eqn.outputs)   # work on the batch: the loss's (or refused)
            continue
        for v, w in zip(eqn.outputs, other.outputs):
            if tuple(program.avals[v].shape) != tuple(whole.avals[w].shape):
                raise ValueError(
                    f"PipeshardParallel in {name}: {eqn.primitive.name} at {sources[e]} makes "
                    f"a value whose shape follows the batch's size ({program.avals[v].shape} "
                    f"for one micro-batch, {whole.avals[w].shape} for the batch) outside the "
                    f"function it differentiates, which runs once per step and never sees the "
                    f"batch. Compute it inside the loss function, or use num_microbatches=1")
        inputs = tuple(_sized(a, b) for a, b in zip(eqn.inputs, other.inputs))
        if inputs != tuple(eqn.inputs):
            eqns[e] = Equation(eqn.primitive, eqn.params, inputs, eqn.outputs, eqn.source_info)
    outvars = tuple(_sized(a, b) for a, b in zip(program.outvars, whole.outvars))
    return Program(program.avals, program.invars, outvars, tuple(eqns), program.constants)


def _sized(micro, whole):
    """``whole``'s literal where both operands are literals of different values."""
    if isinstance(micro, Literal) and isinstance(whole, Literal) and \
            not np.array_equal(np.asarray(micro.value), np.asarray(whole.value)):
        return whole
    return micro


def _aligned(program: Program, whole: Program) -> bool:
    return len(program.eqns) == len(whole.eqns) and \
        len(program.invars) == len(whole.invars) and \
        len(program.outvars) == len(whole.outvars) and all(
            a.primitive.name == b.primitive.name and len(a.inputs) == len(b.inputs)
            and len(a.outputs) == len(b.outputs) for a, b in zip(program.eqns, whole.eqns))
