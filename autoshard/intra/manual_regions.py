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
whole over the others (its operands and results unsplit over them, the body priced
replicated over them, which is what XLA compiles when its operands come so), or with one
operand dim its specs leave unsplit split over some of them where the body follows that
split, as control flow's bodies are read (``control_flow.body_split``; its collectives
pass a split of a dim they do not gather or scatter); XLA's partitioner splits the body
so when the operands come so. Regions on
another mesh than the plan's (of its names and sizes; a pipeline stage's sub-mesh) and
specs naming a dim's axes out of mesh order are left to the caller, which runs them
replicated with a warning. The body's own intermediates are not counted in the plan's
peak memory.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from autoshard.cost_model import CollectiveStep, MeshCostModel
from autoshard.ir.specs import Spec, from_partition_spec

from .control_flow import axis_sets, body_split, with_split
from .flops import COLLECTIVES, body_flops, body_traffic, inner_jaxprs, value_bytes
from .strategies import Strategy, dtype_name, held_bytes


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
    nbytes = max(held_bytes(model, [*in_avals, *out_avals], [*in_specs, *out_specs]),
                 body_traffic(body))
    steps = tuple(_collectives(body, names, model))
    base = Strategy("shard_map", out_specs, in_specs,
                    model.compute(flops, nbytes, dtype_name(in_avals)),
                    sum(s.seconds for s in steps), flops=flops, bytes_accessed=nbytes,
                    collectives=steps)
    return (base, *_free_axis_splits(base, params, in_avals, out_avals, model, names))


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
        step = _collective_step(eqn, names, model)
        if step is not None:
            yield step


def _collective_step(eqn, names: Sequence[str], model: MeshCostModel,
                     divide: int = 1) -> CollectiveStep | None:
    """``eqn``'s collective priced (None when it is none, or over no axis of more than one
    device), its results ``divide``-d (split over axes the region leaves automatic)."""
    found = COLLECTIVES.get(eqn.primitive.name)
    if found is None:
        return None
    kind, param = found
    named = eqn.params[param]
    named = (named,) if isinstance(named, str) else tuple(named)
    axes = tuple(sorted(names.index(n) for n in named if n in names
                        and model.mesh_shape[names.index(n)] > 1))
    if not axes:
        return None
    nbytes = sum(value_bytes(v.aval) for v in eqn.outvars) // divide  # a psum of several: one
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
    return CollectiveStep(kind, axes, nbytes, seconds)


def _gathering_dims(eqn) -> tuple[int, ...]:
    """The dims a collective of a body gathers, scatters or exchanges (a split of them
    over the axes left automatic would interleave the shards)."""
    p = eqn.params
    return tuple(p[k] for k in ("axis", "all_gather_dimension", "scatter_dimension",
                                "split_axis", "concat_axis") if isinstance(p.get(k), int))


def _free_axis_splits(base: Strategy, params: dict, in_avals, out_avals,
                      model: MeshCostModel, names: Sequence[str]) -> list[Strategy]:
    """Strategies of a region left automatic over some axes: ``base`` (whole over them)
    with one operand dim its specs leave unsplit split over some of those axes, where the
    body follows that split (``control_flow.body_split``)."""
    manual = set(params.get("newly_manual_axes", names))
    free = [a for a, n in enumerate(names) if n not in manual and model.mesh_shape[a] > 1]
    body, found, cache = params["jaxpr"], {}, {}
    for axes in axis_sets(free):
        n = math.prod(model.mesh_shape[a] for a in axes)

        def collective(eqn, ins, n=n):
            dim = next((d for d in ins if d is not None), None)
            if dim is not None and dim in _gathering_dims(eqn):
                return None
            step = _collective_step(eqn, names, model, 1 if dim is None else n)
            return [dim] * len(eqn.outvars), step

        for k, local in enumerate(body.invars):
            spec = base.in_specs[k]
            for d in range(len(getattr(local.aval, "shape", ()))):
                if spec is None or spec[d] or local.aval.shape[d] % n or \
                        any(s.in_specs[k][d] == axes for s in found.values()):
                    continue
                split = body_split(body, {k: d}, axes, model, cache, collective)
                if split is None:
                    continue
                outs, tally = split
                if any(dim is not None and base.out_specs[i][dim]
                       for i, dim in enumerate(outs)):
                    continue  # a result dim split over manual axes too
                in_specs = tuple(None if s is None else with_split(s, d if i == k else None, axes)
                                 for i, s in enumerate(base.in_specs))
                out_specs = tuple(with_split(s, dim, axes)
                                  for s, dim in zip(base.out_specs, outs))
                if (in_specs, out_specs) in found:
                    continue
                nbytes = max(held_bytes(model, [*in_avals, *out_avals], [*in_specs, *out_specs]),
                             tally.traffic)
                found[(in_specs, out_specs)] = dataclasses.replace(
                    base, name=f"shard_map split {axes}", in_specs=in_specs,
                    out_specs=out_specs, flops=tally.flops, bytes_accessed=nbytes,
                    compute_s=model.compute(tally.flops, nbytes, dtype_name(in_avals)),
                    communication_s=tally.communication_s, collectives=tuple(tally.steps))
    return list(found.values())
