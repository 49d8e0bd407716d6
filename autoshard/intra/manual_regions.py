"""``jax.shard_map`` regions inside a step: layouts the user fixed, priced as written.

A ``shard_map`` runs its body per device on the shards its ``in_specs`` name and
returns results laid out as its ``out_specs`` say, whatever the plan around it; the
runtime replays it as written. So it is one strategy: those layouts, the body's
arithmetic and memory traffic on the local shards, and the collectives the body calls
(``psum`` an all-reduce, ``all_gather``, ``psum_scatter`` a reduce-scatter,
``all_to_all``, ``ppermute`` a collective-permute) over the mesh axes it names, each
priced as the cost model prices that collective. Reading its operands in the layouts
it takes is priced on their uses, as for any op.

A region left automatic over some axes (``axis_names`` naming the manual ones) is read
whole over the others: its operands and results unsplit over them, the body priced
replicated over them, which is what XLA compiles when its operands come so. Regions on
another mesh than the plan's (of its names and sizes; a pipeline stage's sub-mesh) and
specs naming a dim's axes out of mesh order are left to the caller, which runs them
replicated with a warning. The body's own intermediates are not counted in the plan's
peak memory.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from autoshard.cost_model import CollectiveStep, MeshCostModel
from autoshard.ir.specs import Spec, from_partition_spec

from .flops import COLLECTIVES, body_flops, body_traffic, inner_jaxprs, value_bytes
from .strategies import Strategy


def shard_map_strategies(params: dict, in_avals: Sequence, out_avals: Sequence,
                         model: MeshCostModel, axis_names: Sequence[str]
                         ) -> tuple[Strategy, ...] | None:
    """The one strategy of a ``shard_map`` equation (``params``, global ``in_avals`` and
    ``out_avals``) on ``model``'s mesh of ``axis_names``; None when it is not read so
    (see the module docstring)."""
    mesh, names = params["mesh"], tuple(axis_names)
    if tuple(mesh.axis_names) != names or tuple(mesh.axis_sizes) != model.mesh_shape:
        return None
    specs = []
    for pspecs, avals in ((params["in_specs"], in_avals), (params["out_specs"], out_avals)):
        found = [_spec(p, a, names, model) for p, a in zip(pspecs, avals, strict=True)]
        if any(s is None and a is not None for s, a in zip(found, avals)):
            return None
        specs.append(tuple(found))  # (None for a literal operand, as Strategy has it)
    in_specs, out_specs = specs
    body = params["jaxpr"]
    flops = body_flops(body)
    region = sum(model.bytes_per_device(tuple(a.shape), a.dtype.itemsize, s)
                 for a, s in zip([*in_avals, *out_avals], [*in_specs, *out_specs])
                 if a is not None)
    nbytes = max(region, body_traffic(body))
    steps = tuple(_collectives(body, names, model))
    dtype = next((a.dtype.name for a in in_avals
                  if a is not None and np.issubdtype(a.dtype, np.floating)), "float32")
    return (Strategy("shard_map", out_specs, in_specs, model.compute(flops, nbytes, dtype),
                     sum(s.seconds for s in steps), flops=flops, bytes_accessed=nbytes,
                     collectives=steps),)


def _spec(pspec, aval, names, model: MeshCostModel) -> Spec | None:
    """``pspec`` as the planner's spec (axes of size 1 left out); None for a literal
    operand (``aval`` None), or when it names a dim's axes out of mesh order or the axes
    do not divide the dim."""
    if aval is None:
        return None
    try:
        spec = tuple(tuple(a for a in axes if model.mesh_shape[a] > 1)
                     for axes in from_partition_spec(pspec, len(aval.shape), names))
    except ValueError:  # an unknown axis or too many entries: jax would not have traced it
        return None
    if any(list(axes) != sorted(axes) for axes in spec) or \
            not model.is_valid_spec(tuple(aval.shape), spec):
        return None
    return spec


def _collectives(jaxpr, names: Sequence[str], model: MeshCostModel):
    """The body's collectives, priced: (kind, mesh axes, result bytes per device)."""
    for eqn in jaxpr.eqns:
        for inner in inner_jaxprs(eqn):
            yield from _collectives(inner, names, model)
        found = COLLECTIVES.get(eqn.primitive.name)
        if found is None:
            continue
        kind, param = found
        named = eqn.params[param]
        named = (named,) if isinstance(named, str) else tuple(named)
        axes = tuple(sorted(names.index(n) for n in named if n in names
                            and model.mesh_shape[names.index(n)] > 1))
        if not axes:
            continue
        nbytes = sum(value_bytes(v.aval) for v in eqn.outvars)  # a psum of several: one
        if kind == "all-reduce":
            seconds = model.all_reduce(nbytes, axes)
        elif kind == "all-gather":
            seconds = model.all_gather(nbytes, axes)
        elif kind == "reduce-scatter":  # priced on its input, the scattered output named
            # (as an all-reduce where the cluster says the backend lowers the partitioner's
            # so: XLA's CPU compiler runs a manual one as a reduce-scatter, a little less)
            n = math.prod(model.mesh_shape[a] for a in axes)
            seconds = model.reduce_scatter(nbytes * n, axes)
        elif kind == "all-to-all":
            seconds = model.all_to_all(nbytes, axes)
        else:
            seconds = model.collective_permute(nbytes, axes)
        yield CollectiveStep(kind, axes, nbytes, seconds)
