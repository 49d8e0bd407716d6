"""The call path of a step called again with the signature of the call before: straight
to ``jax.jit``'s C++ dispatch, no autoshard code on the way."""
from __future__ import annotations

import jax

from autoshard.ir.call import BoundCall, dynamic_arguments

from .sharded import SignatureChanged, outside_other_meshes

#: what :class:`FastCall` returns when the arguments are not for its program
MISSED = object()


class FastCall:
    """The program of the last call, called with the arguments as they come: jax's C++
    dispatch checks their trees, shapes, dtypes, static values and shardings (and moves
    host values onto the mesh), as under ``jax.jit``. Arguments it was not made for
    (another signature, an array committed to other devices) are a miss, found before
    anything runs; the call then takes the full path, which plans or looks up their
    program and places them."""

    def __init__(self):
        self.call, self.num_args, self.keywords, self.mesh = None, 0, (), None
        self.misses = self.hits = 0

    def aim(self, call, num_args: int, keywords: tuple[str, ...], mesh) -> None:
        """Try ``call`` (a :meth:`ShardedProgram.for_call` of a program on ``mesh``) first
        from now on, unless most calls miss (say, two signatures alternating: each miss
        costs a trace attempt)."""
        if call is not self.call:
            keep = self.misses < 8 or self.misses * 16 < self.hits
            self.call, self.num_args, self.keywords = (call if keep else None), num_args, \
                keywords
            self.mesh = mesh

    def __call__(self, args: tuple, kwargs: dict):
        if self.call is None or len(args) != self.num_args or \
                len(kwargs) != len(self.keywords):
            return MISSED
        try:
            with outside_other_meshes(self.mesh):
                outs = self.call(*args, *(kwargs[k] for k in self.keywords))
        except (SignatureChanged, KeyError, ValueError, TypeError):
            # jax raised before running: another signature or keyword, an argument
            # committed elsewhere, or one jax cannot take (the full path says what)
            self.misses += 1
            return MISSED
        self.hits += 1
        return outs


def with_leaves(call: BoundCall, leaves: list) -> list:
    """``call.args`` with the flat leaves of its non-static arguments replaced."""
    dynamic = dynamic_arguments(call.args, call.static)
    dynamic = iter(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(dynamic), leaves))
    return [a if i in call.static else next(dynamic) for i, a in enumerate(call.args)]
