"""The :class:`Plan` record of a pipeline: stage assignments, the pipelined cost, specs."""
from __future__ import annotations

import dataclasses
import math

from jax.sharding import PartitionSpec

from autoshard.cost_model import in_flight
from autoshard.ir.fingerprint import fingerprint
from autoshard.plan.parts import PlanCost, ProgramSpecs, SolverInfo, StageAssignment, StageCost
from autoshard.plan.record import Plan

from .layout import PipelineLayout, apply_name


def _scaled(cost: PlanCost, factor: float) -> list[float]:
    return [cost.compute_s * factor, cost.communication_s * factor, cost.resharding_s * factor]


def make_plan(layout: PipelineLayout, solution, cluster, static_repr, device_ids,
               planning_s, num_candidates) -> Plan:
    split, method = layout.split, layout.method
    B, schedule = method.num_microbatches, method.schedule
    traced = split.traced
    O = traced.program
    S = len(layout.stages)
    ids = list(device_ids) if device_ids is not None else list(range(math.prod(layout.mesh_shape)))
    records, parts = [], []
    slowest = max(range(S), key=lambda s: layout.stages[s].cost.seconds)
    apply_by_stage = {a.stage: a.plan.cost for a in layout.apply}
    for s, st in enumerate(layout.stages):
        send_f, send_b = st.send_s
        # the 1/B share of resharding gradients for their parameters that the stage plan
        # carries is work of the apply program, which prices it in its own cost
        pairing = st.pairing_s / B
        # the backward's deferred all-reduces run once per step, in the stage's gradient
        # reduction program
        saved = st.deferred.saved_s
        c = dataclasses.replace(
            st.plan.cost, communication_s=st.plan.cost.communication_s + send_f + send_b - saved,
            resharding_s=st.plan.cost.resharding_s - pairing)
        held = st.cost.fixed_bytes + (in_flight(schedule, s, S, B) - 1) * \
            st.cost.per_microbatch_bytes
        frac = st.program.forward_fraction
        work = st.plan.cost.total_s - pairing
        records.append(StageAssignment(
            layers=tuple(range(st.program.first, st.program.last + 1)),
            mesh_shape=tuple(st.mesh_shape), device_ids=tuple(int(ids[p]) for p in st.positions),
            cost=StageCost(c.compute_s, c.communication_s, c.resharding_s, int(held),
                           work * frac + send_f, work * (1 - frac) - saved + send_b),
            num_microbatches=B, schedule=schedule, apply_cost=apply_by_stage.get(s)))
        part = _scaled(c, 1.0 + ((B - 1) if s == slowest else 0))
        parts.append([part[0], part[1] + st.step_send_s, part[2]])
    comp = [sum(p[k] for p in parts) for k in range(3)]
    # the stages' gradient reductions run side by side, on disjoint devices
    comp[1] += max(st.deferred.step_s for st in layout.stages)
    extra = [a.plan.cost for a in layout.pre]
    if layout.apply:  # the apply programs run side by side: the slowest one counts
        extra.append(max((a.plan.cost for a in layout.apply), key=lambda c: c.total_s))
    for c in extra:
        comp = [x + y for x, y in zip(comp, _scaled(c, 1.0))]
    peak = max([r.cost.peak_memory_bytes for r in records] +
               [a.plan.cost.peak_memory_bytes for a in layout.pre + layout.apply])
    cost = PlanCost(comp[0], comp[1], comp[2], int(peak))

    # a spec per outer input / output: where the program that first reads / makes it has it
    F = split.forward
    geqn = O.eqns[split.grad_eqn]
    in_spec = {}
    for st in layout.stages:
        for k, v in enumerate(st.program.inputs):
            if v in F.program.invars:
                atom = geqn.inputs[F.program.invars.index(v)]
                if isinstance(atom, int):
                    in_spec.setdefault(atom, st.plan.flat_in_specs[k])
    out_spec = {}
    for part in layout.pre + layout.apply:
        for v, spec in zip(part.inputs, part.plan.flat_in_specs):
            in_spec.setdefault(v, spec)
        for v, spec in zip(part.outputs, part.plan.flat_out_specs):
            out_spec.setdefault(v, spec)
    flat_in = tuple(in_spec.get(v, PartitionSpec()) for v in O.invars)
    flat_out = tuple(out_spec.get(a, PartitionSpec()) if isinstance(a, int) else PartitionSpec()
                     for a in O.outvars)
    plans = [st.plan for st in layout.stages] + [a.plan for a in layout.pre + layout.apply]
    names = [f"stage {s}" for s in range(S)] + \
        ["pre-gradient" for _ in layout.pre] + \
        [apply_name(a.stage) for a in layout.apply]
    meshes = [tuple(st.mesh_shape) for st in layout.stages] + \
        [tuple(layout.mesh_shape) for _ in layout.pre] + \
        [tuple(layout.stages[a.stage].mesh_shape) if a.stage >= 0 else tuple(layout.mesh_shape)
         for a in layout.apply]
    deferred = {id(c) for st in layout.stages for c in st.deferred.deferred}
    collectives = tuple(dataclasses.replace(c, op=f"{n}: {c.op}")
                        for n, p in zip(names, plans) for c in p.collectives
                        if id(c) not in deferred)
    collectives += tuple(dataclasses.replace(c, op=f"stage {s}: {c.op} once per step")
                         for s, st in enumerate(layout.stages) for c in st.deferred.reductions)
    top_ops = tuple(sorted((dataclasses.replace(o, op=f"{n}: {o.op}")
                            for n, p in zip(names, plans) for o in p.top_ops),
                           key=lambda o: -o.seconds)[:20])
    warnings = tuple(dict.fromkeys(w for p in plans for w in p.warnings))
    solvers = [p.solver for p in plans if p.solver is not None]
    solver = SolverInfo(
        status=f"stage DP over {num_candidates} stage plans; stages "
               f"{', '.join(p.solver.status for p in plans[:S] if p.solver)}",
        objective_s=solution.objective_s, lower_bound_s=solution.objective_s, gap=0.0,
        solve_time_s=float(sum(s.solve_time_s for s in solvers)),
        num_nodes=sum(s.num_nodes for s in solvers),
        num_variables=sum(s.num_variables for s in solvers),
        num_constraints=sum(s.num_constraints for s in solvers), planning_time_s=planning_s)
    return Plan(method=method, mesh_shape=tuple(layout.mesh_shape),
                axis_names=tuple(layout.axis_names), cluster=cluster,
                in_specs=traced.input_tree(flat_in),
                out_specs=traced.output_tree(flat_out), cost=cost, solver=solver,
                fingerprint=fingerprint(traced, static_repr, argument_avals=split.full_avals),
                in_paths=traced.in_paths, out_paths=traced.out_paths, flat_in_specs=flat_in,
                flat_out_specs=flat_out, collectives=collectives, top_ops=top_ops,
                warnings=warnings, stages=tuple(records),
                programs=tuple(ProgramSpecs(n, p.flat_in_specs, p.flat_out_specs,
                                            p.value_specs, p.operand_specs, shape,
                                            p.cost.flops, p.cost.bytes_accessed)
                               for n, p, shape in zip(names, plans, meshes, strict=True)),
                in_shapes=tuple(tuple(int(d) for d in a.shape) for a in split.full_avals))


def plain_pipeline_plan(plain: Plan, pipelined: Plan, method, num_layers: int,
                        device_ids) -> Plan:
    """A :class:`PipeshardParallel` plan that keeps plain intra-op parallelism: ``plain``
    (one program, whole batch, whole mesh) as one stage of every layer, cheaper than
    ``pipelined`` (whose stage DP's report it keeps); its forward/backward split is the
    usual 1:2."""
    cost = plain.cost
    ids = device_ids if device_ids is not None else range(math.prod(plain.mesh_shape))
    stage = StageAssignment(
        layers=tuple(range(num_layers)), mesh_shape=tuple(plain.mesh_shape),
        device_ids=tuple(int(i) for i in ids),
        cost=StageCost(cost.compute_s, cost.communication_s, cost.resharding_s,
                       cost.peak_memory_bytes, cost.total_s / 3, 2 * cost.total_s / 3),
        num_microbatches=1, schedule=method.schedule)
    how = "its ILP " + plain.solver.status if plain.solver is not None else "a fixed layout"
    solver = dataclasses.replace(
        pipelined.solver, status=f"{pipelined.solver.status}; one program ({how}) is cheaper",
        objective_s=cost.total_s, lower_bound_s=cost.total_s)
    return dataclasses.replace(plain, method=method, stages=(stage,), solver=solver)
