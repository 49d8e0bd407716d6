"""Planning a pipeline: layers → stage candidates priced by the intra-op planner → stage DP
→ per-stage apply-gradient programs → a :class:`Plan` with ``stages``, and the pieces the
runtime needs (:class:`PipelineLayout`)."""
from __future__ import annotations

import dataclasses
import math
import time

from jax.sharding import PartitionSpec

from autoshard import ilp
from autoshard.cost_model import Cluster, MeshCostModel, format_bytes, in_flight
from autoshard.errors import InfeasiblePlanError
from autoshard.intra.planner import plan_traced
from autoshard.ir.fingerprint import fingerprint
from autoshard.ir.specs import from_partition_spec
from autoshard.ir.trace import TracedFunction, trace
from autoshard.methods import PipeshardParallel, ShardParallel
from autoshard.plan.parts import operand_layouts
from autoshard.plan.record import Plan

from .apply import plan_step_parts, stage_update_seconds, whole_update_seconds
from .assemble import make_plan, plain_pipeline_plan
from .layers import assign_layers
from .layout import PipelineLayout, PlannedStage
from .partial_grads import deferred_reduction, stage_partial_gradients
from .stage_program import StageProgram, bytes_per_device, residual_layouts, stage_program
from .trace import split_step


def _candidates(L, shapes, N, num_stages):
    for i in range(L):
        for j in range(i, L):
            whole = i == 0 and j == L - 1
            for m, shape in enumerate(shapes):
                n = math.prod(shape)
                if num_stages is not None:
                    S = num_stages
                    if (j - i + 1) > L - S + 1 or n > N - (S - 1) or (S == 1) != whole:
                        continue
                if (n == N) != whole:
                    continue
                yield i, j, m


def _spec_of(plan: Plan, vid, invar_pos: dict) -> PartitionSpec:
    if vid in invar_pos:
        return plan.flat_in_specs[invar_pos[vid]]
    return dict(plan.value_specs).get(vid, PartitionSpec())


@dataclasses.dataclass(frozen=True, eq=False)
class PlannedStep:
    """What :func:`plan_pipeline_step` chose: the plan, the traced step it runs, and the
    pipeline's layout (``None`` when plain intra-op parallelism was cheaper)."""

    plan: Plan
    traced: TracedFunction
    layout: PipelineLayout | None


def plan_pipeline_step(fun, args, *, static_argnums, batch_flags, donated_flags, mesh_shape,
                       axis_names, cluster: Cluster, method: PipeshardParallel,
                       memory_budget=None, static_repr: str = "", device_ids=None
                       ) -> PlannedStep:
    """Plan ``fun`` as a pipeline; with ``num_stages=None`` also as one program (plain
    intra-op parallelism: whole batch, whole mesh, ``stage_method``) and keep that when it
    is cheaper and fits ``memory_budget``."""
    plan, layout = plan_pipeline(
        fun, args, static_argnums=static_argnums, batch_flags=batch_flags,
        mesh_shape=mesh_shape, axis_names=axis_names, cluster=cluster, method=method,
        memory_budget=memory_budget, static_repr=static_repr, device_ids=device_ids)
    if method.num_stages is None:
        traced = trace(fun, args, static_argnums)
        whole_method = method.stage_method
        if isinstance(whole_method, ShardParallel):  # one solve: at least the default time
            whole_method = ShardParallel(time_limit_s=max(whole_method.time_limit_s,
                                                          ShardParallel().time_limit_s))
        plain = plan_traced(traced, mesh_shape=mesh_shape, axis_names=axis_names,
                            cluster=cluster, method=whole_method, batch_flat=batch_flags,
                            static_repr=static_repr, donated_flat=donated_flags)
        fits = memory_budget is None or plain.cost.peak_memory_bytes <= memory_budget
        if fits and plain.cost.total_s < plan.cost.total_s:
            plain = plain_pipeline_plan(plain, plan, method, layout.layering.num_layers,
                                        device_ids)
            return PlannedStep(plain, traced, None)
    return PlannedStep(plan, layout.split.traced, layout)


def _check_no_manual_regions(traced, method: PipeshardParallel) -> None:
    """``ValueError`` naming the step's first ``jax.shard_map`` when the pipeline may cut
    the mesh into stages: a region is written for the whole mesh (its body traced for its
    shards), and a stage runs on a sub-mesh."""
    if method.num_stages == 1:
        return
    found = [e for e, eqn in enumerate(traced.program.eqns) if eqn.primitive.name == "shard_map"]
    if found:
        raise ValueError(
            f"the step calls jax.shard_map (at {traced.sources[found[0]]}), whose body is "
            f"written for the whole mesh, but PipeshardParallel(num_stages="
            f"{method.num_stages}) runs stages on sub-meshes of it: use "
            "method=autoshard.ShardParallel() (it plans the region as written), or "
            "PipeshardParallel(num_stages=1)")


def plan_pipeline(fun, args, *, static_argnums, batch_flags, mesh_shape, axis_names,
                  cluster: Cluster, method: PipeshardParallel, memory_budget=None,
                  static_repr: str = "", device_ids=None) -> tuple[Plan, PipelineLayout]:
    start = time.perf_counter()
    B, schedule = method.num_microbatches, method.schedule
    split = split_step(fun, args, static_argnums, batch_flags, B, schedule)
    for part in (split.forward, split.traced):  # the loss, and the step around it
        _check_no_manual_regions(part, method)
    layering = assign_layers(split.forward.program, split.layer_anchors(), split.batch,
                             method.num_layers, split.forward_only)
    L = layering.num_layers
    if method.num_stages is not None and method.num_stages > L:
        raise ValueError(f"num_stages={method.num_stages} but the loss has only {L} layer(s)"
                         f"{' (marked with autoshard.mark_layer_boundary)' if layering.user_boundaries else ''}"
                         f": ask for at most {L} stages, or for more layers (num_layers=...); "
                         f"a lax.scan over layers is unrolled into one copy per layer unless it "
                         f"exceeds autoshard.ir.trace.MAX_UNROLLED_EQUATIONS")
    mesh_shape = tuple(mesh_shape)
    N = math.prod(mesh_shape)
    if method.num_stages is not None and method.num_stages > N:
        raise ValueError(f"num_stages={method.num_stages} but the mesh has only {N} devices: "
                         f"every stage needs at least one")
    shapes = ilp.submesh_shapes(mesh_shape)
    programs: dict = {}
    planned: dict = {}
    sends: dict = {}
    # stage-to-stage transfers go over the outermost (slowest) mesh axis's link
    link = cluster.links_for_mesh(mesh_shape)[0]
    F_outs = {a for a in layering.program.outvars if isinstance(a, int)}
    F_ins = set(layering.program.invars)
    costs: dict = {}
    pairing: dict = {}
    step_sends: dict = {}
    deferred: dict = {}
    first_layer = _first_layers(layering)
    forward_index = {v: k for k, v in enumerate(layering.program.invars)}
    from_pre = _made_before_gradient(split)
    whole_update = None
    stage_plans: dict = {}
    for i, j, m in _candidates(L, shapes, N, method.num_stages):
        if (i, j) not in programs:
            programs[(i, j)] = stage_program(layering, i, j, split.diff, split.batch,
                                             split.heads)
        sp = programs[(i, j)]
        P = sp.traced.program
        ct_batch = [len(P.avals[v].shape) > 0 for v in P.invars[len(sp.inputs):]]
        pairs = _gradient_pairs(sp, F_ins)
        # layer ranges of identical repeated layers make the same program: planned once
        key = (fingerprint(sp.traced, ""), m, tuple(sp.batch_in), tuple(ct_batch), pairs)
        if key not in stage_plans:
            stage_plans[key] = plan_traced(sp.traced, mesh_shape=shapes[m],
                                           axis_names=axis_names, cluster=cluster,
                                           method=method.stage_method,
                                           batch_flat=list(sp.batch_in) + ct_batch,
                                           carried=pairs, carried_weight=1.0 / B)
        plan = stage_plans[key]
        sub_sizes = dict(zip(axis_names, shapes[m]))
        pos = {v: k for k, v in enumerate(P.invars)}
        handed = residual_layouts(sp, *operand_layouts(plan.operand_specs))
        held = sum(bytes_per_device(P.avals[v], handed.get(v, _spec_of(plan, v, pos)),
                                    sub_sizes) for v in sp.residuals)
        held += sum(bytes_per_device(P.avals[P.invars[k]], plan.flat_in_specs[k], sub_sizes)
                    for k in sp.backward_inputs if sp.batch_in[k])
        planned[(i, j, m)] = plan
        sends[(i, j, m)] = _send_seconds(sp, plan, link, sub_sizes, F_outs, F_ins)
        # the gradients' resharding into their parameters' layouts runs once per step, in
        # the apply program, which prices it; the stage plan carries 1/B of it per
        # micro-batch so that its layouts see it
        pairing[(i, j, m)] = _pairing_seconds(P, plan, pairs, MeshCostModel(cluster, shapes[m]),
                                              axis_names)
        whole = (i, j) == (0, L - 1) and math.prod(shapes[m]) == N
        step_sends[(i, j, m)] = 0.0 if whole else _step_send_seconds(
            sp, plan, link, sub_sizes, forward_index, first_layer, from_pre)
        candidate = PlannedStage(sp, plan, shapes[m], tuple(range(math.prod(shapes[m]))),
                                 None, sends[(i, j, m)])
        update = stage_update_seconds(split, candidate, first_layer, L, mesh_shape,
                                      axis_names, cluster, method)
        if update is None:  # the update runs as one full-mesh program: charged once
            if whole_update is None:
                whole_update = whole_update_seconds(split, mesh_shape, axis_names, cluster,
                                                    method)
            update = whole_update if i == 0 else 0.0
        # gradients whose batch reduction waits for the last micro-batch (partial_grads)
        partials = stage_partial_gradients(sp, plan, axis_names, shapes[m], B, F_ins)
        deferred[(i, j, m)] = deferred_reduction(sp, plan, partials,
                                                 MeshCostModel(cluster, shapes[m]), axis_names)
        d = deferred[(i, j, m)]
        costs[(i, j, m)] = ilp.StageCost(plan.cost.total_s - pairing[(i, j, m)] / B
                                         - d.saved_s + sum(sends[(i, j, m)]),
                                         float(plan.cost.peak_memory_bytes), float(held),
                                         per_step_s=update + step_sends[(i, j, m)] + d.step_s)
    # the DP adds the stages' once-per-step work; their apply programs run side by side on
    # disjoint devices, so that sum bounds what a step spends on them (the plan reports
    # the slowest)
    devices = [math.prod(s) for s in shapes]
    try:
        solution = ilp.solve_stages(L, devices, N, costs, B, schedule, method.num_stages,
                                    memory_budget)
    except ilp.InfeasibleError:
        _raise_infeasible(L, devices, N, costs, method, memory_budget, mesh_shape)
    chosen_shapes = [shapes[m] for _, _, m in solution.stages]
    positions = ilp.place_submeshes(mesh_shape, chosen_shapes)
    stages = tuple(PlannedStage(programs[(i, j)], planned[(i, j, m)], shapes[m], pos,
                                costs[(i, j, m)], sends[(i, j, m)], step_sends[(i, j, m)],
                                pairing[(i, j, m)], deferred[(i, j, m)])
                   for (i, j, m), pos in zip(solution.stages, positions))
    pre, apply = plan_step_parts(split, stages, layering, mesh_shape, axis_names, cluster,
                                  method)
    layout = PipelineLayout(split, layering, stages, pre, apply, method, tuple(axis_names),
                            mesh_shape)
    plan = make_plan(layout, solution, cluster, static_repr, device_ids,
                      time.perf_counter() - start, len(costs))
    return plan, layout


def _smallest_budget(L, devices, N, costs, method: PipeshardParallel) -> float | None:
    """The smallest memory budget under which the stage DP finds a slicing (what stage
    ``p`` of ``S`` holds is one of finitely many values: search them), or ``None``."""
    B, schedule = method.num_microbatches, method.schedule
    counts = range(1, L + 1) if method.num_stages is None else (method.num_stages,)
    held = sorted({c.fixed_bytes + (in_flight(schedule, p, S, B) - 1) * c.per_microbatch_bytes
                   for c in costs.values() for S in counts for p in range(S)})

    def fits(budget) -> bool:
        try:
            ilp.solve_stages(L, devices, N, costs, B, schedule, method.num_stages, budget)
        except ilp.InfeasibleError:
            return False
        return True

    if not held or not fits(held[-1]):
        return None
    lo, hi = 0, len(held) - 1   # held[hi] fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(held[mid]):
            hi = mid
        else:
            lo = mid + 1
    return held[hi]


def _raise_infeasible(L, devices, N, costs, method: PipeshardParallel, memory_budget,
                      mesh_shape):
    """The stage DP found no slicing within ``memory_budget``: an InfeasiblePlanError
    giving the smallest budget that one fits."""
    need = _smallest_budget(L, devices, N, costs, method)
    lowest = min((c.fixed_bytes for c in costs.values()), default=0.0)
    stages = "any number of" if method.num_stages is None else str(method.num_stages)
    where = (f"no way to cut the loss's {L} layer(s) into {stages} pipeline stage(s) on the "
             f"{tuple(mesh_shape)} mesh fits memory_budget="
             f"{format_bytes(memory_budget or 0)} per device with "
             f"num_microbatches={method.num_microbatches} and schedule={method.schedule!r}")
    hint = "schedule='1f1b' (fewer micro-batches in flight), " \
        if method.schedule == "gpipe" else ""
    if need is None:
        raise InfeasiblePlanError(f"{where}; no slicing fits any budget", lowest,
                                  float(memory_budget or 0)) from None
    raise InfeasiblePlanError(
        f"{where}: the smallest budget a stage slicing fits is about {format_bytes(need)} "
        f"per device ({need:.0f} bytes, the stages' estimated peaks). Give memory_budget >= "
        f"{format_bytes(need)}, use more devices, {hint}or shrink the model or batch", need,
        float(memory_budget or 0)) from None


def _gradient_pairs(sp: StageProgram, forward_inputs) -> tuple[tuple[int, int], ...]:
    """(flat output, flat input) of the stage program: each parameter's gradient and the
    parameter. The apply-gradient program reads both in the layouts the stage has them
    (:mod:`._pipeline_apply`), so a gradient laid out unlike its parameter is resharded
    there: priced here as a value carried into the parameter."""
    n_out = len(sp.outputs)
    outvars = sp.traced.program.outvars
    diff = [k for k, d in enumerate(sp.diff_in) if d]   # the first inputs, in order
    return tuple((n_out + j, k) for j, k in enumerate(diff)
                 if sp.inputs[k] in forward_inputs and isinstance(outvars[n_out + j], int))


def _pairing_seconds(P, plan: Plan, pairs, model: MeshCostModel, axis_names) -> float:
    """Seconds to reshard each paired gradient (stage output) into its parameter's layout
    (stage input), as :func:`plan_traced` prices a carried value, at full weight."""
    total = 0.0
    for o, i in pairs:
        aval = P.avals[P.outvars[o]]
        rank = len(aval.shape)
        total += model.resharding(tuple(aval.shape), aval.dtype.itemsize,
                                  from_partition_spec(plan.flat_out_specs[o], rank, axis_names),
                                  from_partition_spec(plan.flat_in_specs[i], rank, axis_names))
    return float(total)


def _transfer_seconds(link, aval, spec, sizes) -> float:
    """Seconds to send a value laid out ``spec`` to another sub-mesh: every device sends its
    shard, latency + bytes / bandwidth."""
    return link.latency + bytes_per_device(aval, spec, sizes) / link.bandwidth


def _send_seconds(sp: StageProgram, plan: Plan, link, sizes, forward_outputs, forward_inputs
                  ) -> tuple[float, float]:
    """Seconds per micro-batch to send this stage's activations on and its activations'
    cotangents back (:func:`_transfer_seconds` each; a cotangent that is a literal zero,
    of an input no gradient flows through such as an ``argmax``-based metric, is free)."""
    P = sp.traced.program
    n_out = len(sp.outputs)
    fwd = sum(_transfer_seconds(link, P.avals[P.outvars[k]], plan.flat_out_specs[k], sizes)
              for k, v in enumerate(sp.outputs) if v not in forward_outputs)
    grads = [v for v, d in zip(sp.inputs, sp.diff_in) if d]
    bwd = sum(_transfer_seconds(link, P.avals[P.outvars[n_out + k]],
                                plan.flat_out_specs[n_out + k], sizes)
              for k, v in enumerate(grads)
              if v not in forward_inputs and isinstance(P.outvars[n_out + k], int))
    return float(fwd), float(bwd)


def _first_layers(layering) -> dict[int, int]:
    """Forward input index → the first layer reading it (the stage owning a parameter)."""
    F = layering.program
    index = {v: k for k, v in enumerate(F.invars)}
    first: dict[int, int] = {}
    for e, layer in enumerate(layering.layer_of):
        for a in F.eqns[e].inputs:
            if isinstance(a, int) and a in index:
                first[index[a]] = min(first.get(index[a], layer), layer)
    return first


def _made_before_gradient(split) -> frozenset:
    """Forward input indices whose value the pre-gradient program makes (on the full mesh)."""
    O = split.traced.program
    made = {v for e in split.pre for v in O.eqns[e].outputs}
    geqn = O.eqns[split.grad_eqn]
    return frozenset(k for k, a in enumerate(geqn.inputs[:len(split.diff)])
                     if isinstance(a, int) and a in made)


def _step_send_seconds(sp: StageProgram, plan: Plan, link, sizes, forward_index, first_layer,
                       from_pre) -> float:
    """Seconds per step to bring this stage the step-level values kept elsewhere: a
    parameter an earlier stage owns (a tied embedding; its gradient goes back to the owner
    once per step, summed there) and a value the pre-gradient program makes on the full
    mesh. ``forward_index``: forward value id → its forward input index, the key of
    ``first_layer`` and ``from_pre``. Each is one :func:`_transfer_seconds`."""
    P = sp.traced.program
    n_out = len(sp.outputs)
    diff = [k for k, d in enumerate(sp.diff_in) if d]
    total = 0.0
    for k, v in enumerate(sp.inputs):
        f = forward_index.get(v)
        if sp.batch_in[k] or f is None:
            continue
        shared = first_layer.get(f, 0) < sp.first
        if not (shared or f in from_pre):
            continue
        total += _transfer_seconds(link, P.avals[P.invars[k]], plan.flat_in_specs[k], sizes)
        if shared and sp.diff_in[k]:
            g = n_out + diff.index(k)   # the parameter's gradient, unless a literal zero
            if isinstance(P.outvars[g], int):
                total += _transfer_seconds(link, P.avals[P.outvars[g]],
                                           plan.flat_out_specs[g], sizes)
    return float(total)
