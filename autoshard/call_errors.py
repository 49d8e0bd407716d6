"""Errors a call of a parallelized step raises about its arguments, in the words of the call:
its argument paths, ``donate_argnums`` / ``donate_argnames`` as the call passed them."""
from __future__ import annotations

from collections.abc import Sequence

import jax

from autoshard.errors import InfeasiblePlanError
from autoshard.ir.call import BoundCall
from autoshard.pipeline.trace import flat_paths
from autoshard.runtime import typed_sharding


def check_untyped_tracers(call: BoundCall, flat: Sequence) -> None:
    """A step called under the caller's ``jax.jit`` (or another transformation) takes
    its arguments as they are typed there: one whose type carries a sharding (a mesh of
    ``Explicit`` axes) cannot be laid out on the plan's mesh inside that trace."""
    typed = [k for k, a in enumerate(flat)
             if isinstance(a, jax.core.Tracer) and typed_sharding(jax.typeof(a))]
    if not typed:
        return
    _, paths, _ = flat_paths(call.args, call.static)
    shown = ", ".join(f"{paths[k]} ({jax.typeof(flat[k]).sharding.spec})" for k in typed[:4])
    more = f" and {len(typed) - 4} more" if len(typed) > 4 else ""
    raise TypeError(
        f"the parallelized step was called inside jax.jit (or another transformation) with "
        f"arguments whose type carries a sharding over a mesh of Explicit axes: "
        f"{shown}{more}. autoshard lays out every value on its own mesh of Auto axes, which "
        f"it cannot do inside that trace: call the step outside jax.jit (it is compiled "
        f"already; arrays on any mesh are moved to the plan's layouts), or make the mesh "
        f"with Auto axes (autoshard.make_mesh, or jax.make_mesh(..., axis_types=(jax.sharding."
        f"AxisType.Auto,) * rank))")


def with_donation_hint(err: InfeasiblePlanError, undonated, call: BoundCall
                        ) -> InfeasiblePlanError:
    """``err`` naming the arguments the step returns updated without donating them (their
    old and new values both held), and the ``donate_argnums`` (``donate_argnames`` for
    those ``call`` passes by keyword) that hold one of each."""
    if not undonated:
        return err
    paths = [p for p, _ in undonated]
    shown = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
    argnums = sorted({a for _, a in undonated})
    positional = tuple(a for a in argnums if a < call.num_positional)
    keywords = tuple(call.keywords[a - call.num_positional] for a in argnums
                     if a >= call.num_positional)
    ways = ([f"donate_argnums={positional!r}"] if positional else []) + \
        ([f"donate_argnames={keywords!r}"] if keywords else [])
    advice = f"donate them ({', '.join(ways)}) to hold one of each"
    return InfeasiblePlanError(
        f"{err}. {shown} {'is' if len(paths) == 1 else 'are'} returned updated but not "
        f"donated, so the old and the new values are both held while the step runs: "
        f"{advice}", err.min_peak_bytes, err.memory_budget)
