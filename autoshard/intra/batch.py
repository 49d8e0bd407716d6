"""Which arguments hold the batch when the user does not say (``batch_argnums=None``).

The presets split the batch on its leading dim (data parallelism) and the search starts
from their plans, so a wrong guess costs a plan that does not split the data. A
training step's arguments are state (parameters, optimizer state: returned at the same
key path, or donated), PRNG keys, hyper-parameters (scalars) and data; the data are the
arguments left, those whose array leaves all share the leading dimension of the last of
them (``step(params, opt_state, x, y, key)``: ``x`` and ``y``; ``step(state, batch)``:
``batch``).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from autoshard.ir.trace import TracedFunction, argument_of

from .problem import carried_pairs


def default_batch_argnums(traced: TracedFunction, donated_flat: Sequence[bool] = ()
                          ) -> tuple[int, ...]:
    """The arguments taken as the batch (see the module docstring): not carried from
    input to output or donated, not a PRNG key, with no 0-d leaf; of those, the ones
    whose leaves all have the leading dimension of the last one's leaves."""
    program = traced.program
    state = {i for _, i in carried_pairs(traced, donated_flat)}
    state |= {i for i, donated in enumerate(donated_flat) if donated}
    leaves: dict[int, list[int]] = {}
    for k, path in enumerate(traced.in_paths):
        leaves.setdefault(argument_of(path), []).append(k)

    def is_data(flat: list[int]) -> bool:
        for k in flat:
            aval = program.avals[program.invars[k]]
            if k in state or not aval.shape or _is_key(aval):
                return False
        return True

    data = [a for a in sorted(leaves) if is_data(leaves[a])]
    if not data:
        return ()
    leads = {program.avals[program.invars[k]].shape[0] for k in leaves[data[-1]]}
    if len(leads) != 1:
        return (data[-1],)
    lead = leads.pop()
    return tuple(a for a in data
                 if all(program.avals[program.invars[k]].shape[0] == lead for k in leaves[a]))


def _is_key(aval) -> bool:
    """A typed PRNG key, or a raw one (``jax.random.PRNGKey``: ``uint32[2]``)."""
    if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
        return True
    return tuple(aval.shape) == (2,) and np.dtype(aval.dtype) == np.uint32
