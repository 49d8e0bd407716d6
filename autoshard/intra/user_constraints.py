"""The user's own ``jax.lax.with_sharding_constraint`` calls inside the step.

Traced, a constraint is a ``sharding_constraint`` equation, and the runtime replays it
as written, so XLA lays its value out as the user asked whatever the plan says. The
plan therefore takes the constraint as given, as ``jax.jit`` does (and XLA's own
auto-sharding with its user shardings kept): the equation's strategies are cut to those
laying its value out so, on every dim the constraint does not leave unconstrained; a
resharding into it is priced on its use, as any other. ``jax.sharding.reshard`` is one
too where its mesh has other than Auto axes; on Auto axes it lowers to nothing (jax's
gradient of a loss under a constraint seeds it with one) and stays free.

A constraint is honoured when its ``NamedSharding`` is on a mesh of the plan's axis
names: the whole mesh, or for a pipeline stage, the sub-mesh of those names it runs on
(the runtime moves the constraint there: ``runtime.execute``; an axis of size 1 there
splits nothing). One no strategy meets (axes named out of mesh order on one dim, a dim
the axes do not divide) is left free, with a warning naming it.
"""
from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import NamedSharding, PartitionSpec

from .strategies import Strategy

#: the primitives that constrain their value's layout
CONSTRAINTS = frozenset({"sharding_constraint", "reshard", "device_put"})

#: per dim, the mesh axis indices the constraint splits it by (major first), or None
#: where the dim is unconstrained
Required = tuple[tuple[int, ...] | None, ...]


def required_layout(params: dict, rank: int, axis_names: Sequence[str],
                    mesh_shape: Sequence[int]) -> Required | None:
    """What a ``CONSTRAINTS`` equation's ``params`` require of its value on a mesh of
    ``axis_names`` and ``mesh_shape``; None when it names other axes or constrains
    nothing."""
    sharding = _sharding(params)
    if not isinstance(sharding, NamedSharding):
        return None
    mesh = sharding.mesh
    if tuple(mesh.axis_names) != tuple(axis_names):
        return None
    if "dst_sharding" in params and (mesh.empty or mesh.are_all_axes_auto):
        return None  # a reshard on Auto axes: lowered to nothing
    free = set(params.get("unconstrained_dims") or ())
    entries = tuple(sharding.spec) + (None,) * (rank - len(sharding.spec))
    required: list[tuple[int, ...] | None] = []
    for d, entry in enumerate(entries[:rank]):
        if d in free or entry is PartitionSpec.UNCONSTRAINED:
            required.append(None)
            continue
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        # axes of size 1 split nothing: the planner's specs leave them out
        required.append(tuple(axis_names.index(n) for n in names
                              if mesh_shape[axis_names.index(n)] > 1))
    return tuple(required)


def constraint_text(params: dict) -> str:
    """The constraint's sharding as the user wrote it, for messages."""
    sharding = _sharding(params)
    return str(getattr(sharding, "spec", sharding))


def _sharding(params: dict):
    """The constraint's sharding: a ``device_put``'s of one array (a pytree's leaves, or
    one leaf put on devices rather than a sharding, constrain nothing here)."""
    if "devices" in params:
        return params["devices"][0] if len(params["devices"]) == 1 else None
    return params.get("sharding", params.get("dst_sharding"))


def honouring(strategies: Sequence[Strategy], required: Required) -> tuple[Strategy, ...]:
    """The strategies laying the constrained value (output 0) out as ``required``."""
    return tuple(s for s in strategies
                 if all(want is None or have == want
                        for have, want in zip(s.out_specs[0], required, strict=True)))
