"""Which arguments of a pipelined step hold the batch, and which of their leaves split.

A batch argument's leaves are split into micro-batches on their leading dimension. A
leaf without one (a scalar: a temperature, a step count, a typed PRNG key) or a raw
PRNG key is not batch data: every micro-batch reads it whole, as the step reads it.
Without ``batch_argnums`` the batch arguments are inferred (:func:`infer_batch_argnums`).
"""
from __future__ import annotations

import jax
import numpy as np

from autoshard.ir.trace import TracedFunction, live_equations, trace

from .markers import GRAD_PRIMITIVE, pipeline_tracing
from .trace import loss_of

#: primitives that read a PRNG key: an argument feeding one is a key, never batch data
_KEY_PRIMITIVES = frozenset({"random_wrap", "random_seed", "random_bits", "random_split",
                             "random_fold_in", "threefry2x32"})


def is_prng_key(leaf) -> bool:
    """A typed PRNG key, or a raw one (``jax.random.PRNGKey``: ``uint32[2]``)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return np.shape(leaf) == (2,) and np.dtype(dtype) == np.uint32


def splits_into_microbatches(leaf) -> bool:
    """An array with a leading dimension, not a PRNG key: a batch argument's leaf that
    is split into micro-batches (the others are read whole by every micro-batch)."""
    return hasattr(leaf, "dtype") and np.ndim(leaf) >= 1 and not is_prng_key(leaf)


def _holds_data(leaves) -> bool:
    """Every leaf split into micro-batches (no scalar, no key)."""
    return bool(leaves) and all(splits_into_microbatches(x) for x in leaves)


def infer_batch_argnums(fun, args, static_argnums, declared: int) -> tuple[int, ...]:
    """The batch arguments of a pipelined step called without ``batch_argnums``.

    ``declared`` (the last non-static argument, ``batch_argnums``' default) holds the
    batch, unless it is a PRNG key or has a scalar leaf (lm1b's ``train_step(state,
    batch, dropout_rng)``, or ``train_step(batch, state)`` with a step count in the
    state): then the batch is the last non-static argument, from ``declared`` back, that
    the step does not differentiate and that has array leaves with a leading dimension:
    all of them, or (``declared`` itself) some, beside scalars. ``declared`` stays when
    there is none, and planning says what is wrong with it. Another non-static argument
    is batch data too when every leaf of it is an array whose leading dimension is that
    batch's, and the step reads it only inside the function given to the gradient
    (``jax.value_and_grad``, ``autoshard.value_and_grad``, ...), as data: not
    differentiated, not used before or after the gradient, not returned, not a PRNG key
    (``step(params, opt_state, x, y)``: ``x`` and ``y``). The step is traced once at full
    size to see this; when it cannot be traced, ``(declared,)`` (planning reports why).
    """
    static = set(static_argnums)
    dyn = [i for i in range(len(args)) if i not in static]
    leaves = {i: jax.tree_util.tree_leaves(args[i]) for i in dyn}
    starts = dict(zip(dyn, np.cumsum([0] + [len(leaves[i]) for i in dyn])))
    traced: list = []   # the step traced at full size, once, when needed

    def gradient():
        if not traced:
            try:
                with pipeline_tracing():
                    traced.append(trace(fun, args, static_argnums))
            except Exception:  # noqa: BLE001 - planning traces again and reports the error
                traced.append(None)
        if traced[0] is None:
            return None, None
        grads = [eqn for eqn in traced[0].program.eqns if eqn.primitive.name == GRAD_PRIMITIVE]
        return traced[0], (grads[0] if len(grads) == 1 else None)

    if not _holds_data(leaves[declared]):
        choices = [i for i in reversed(dyn) if i < declared and _holds_data(leaves[i])]
        if any(splits_into_microbatches(x) for x in leaves[declared]):
            choices.insert(0, declared)   # a batch with a scalar leaf, or a state
        step, geqn = gradient() if len(choices) > 1 else (None, None)
        if geqn is not None:
            differentiated = _differentiated_arguments(step, geqn, dyn, starts, leaves)
            choices = [i for i in choices if i not in differentiated] or choices
        declared = choices[0] if choices else declared
    leads = {np.shape(x)[0] for x in leaves[declared] if splits_into_microbatches(x)}
    if len(leads) != 1:
        return (declared,)
    lead = leads.pop()
    candidates = [i for i in dyn if i != declared and leaves[i] and
                  all(np.ndim(x) >= 1 and np.shape(x)[0] == lead and hasattr(x, "dtype")
                      for x in leaves[i])]
    if not candidates:
        return (declared,)
    step, geqn = gradient()
    if geqn is None:
        return (declared,)
    program = step.program
    read_elsewhere = {a for eqn in program.eqns if eqn is not geqn
                      for a in eqn.inputs if isinstance(a, int)}
    read_elsewhere |= {a for a in program.outvars if isinstance(a, int)}
    diff = geqn.params["diff"]
    forward = None
    inferred = []
    for i in candidates:
        vids = set(program.invars[starts[i]:starts[i] + len(leaves[i])])
        slots = [k for k, a in enumerate(geqn.inputs) if a in vids]
        if not slots or vids & read_elsewhere or any(diff[k] for k in slots):
            continue
        if forward is None:
            forward = _loss_program(step)
        keys = {forward.invars[k] for k in slots}
        if any(eqn.primitive.name in _KEY_PRIMITIVES and
               any(isinstance(a, int) and a in keys for a in eqn.inputs)
               for eqn in forward.eqns):
            continue
        inferred.append(i)
    return tuple(sorted([declared, *inferred]))


def _differentiated_arguments(step: TracedFunction, geqn, dyn, starts, leaves) -> set[int]:
    """The arguments a differentiated input of the gradient ``geqn`` is computed from
    (the parameters, whether passed as they are or cast first)."""
    program = step.program
    need = {a for a, d in zip(geqn.inputs, geqn.params["diff"]) if d and isinstance(a, int)}
    before = program.eqns[:next(e for e, eqn in enumerate(program.eqns) if eqn is geqn)]
    need |= {a for e in live_equations(before, need, set()) for a in before[e].inputs
             if isinstance(a, int)}
    return {i for i in dyn
            if need & set(program.invars[starts[i]:starts[i] + len(leaves[i])])}


def _loss_program(traced: TracedFunction):
    """The loss (the gradient marker's forward) of a step traced under pipeline tracing."""
    geqns = [eqn for eqn in traced.program.eqns if eqn.primitive.name == GRAD_PRIMITIVE]
    return loss_of(geqns[0]).program if len(geqns) == 1 else None
