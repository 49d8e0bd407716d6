"""Planning a pipeline: layers → stage candidates priced by the intra-op planner → stage DP
→ per-stage apply-gradient programs → a :class:`Plan` with ``stages``, and the pieces the
runtime needs (:class:`PipelineLayout`)."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time

import jax
import numpy as np
from jax.sharding import PartitionSpec

from . import ilp
from ._layers import Layering, assign_layers
from ._methods import PipeshardParallel
from ._pipeline_trace import SplitStep, split_step
from ._plan import Plan, PlanCost, SolverInfo, StageAssignment, StageCost
from ._planner import plan_traced
from ._stage_program import StageProgram, bytes_per_device, stage_program
from ._trace import TracedFunction
from .cost_model import Cluster
from .runtime import Literal, Program


@dataclasses.dataclass(frozen=True, eq=False)
class PlannedStage:
    program: StageProgram
    plan: Plan
    mesh_shape: tuple[int, ...]
    positions: tuple[int, ...]     # row-major indices into the full mesh
    cost: ilp.StageCost
    send_s: tuple[float, float]    # (activations forward, cotangents back) per micro-batch


@dataclasses.dataclass(frozen=True, eq=False)
class PlannedApply:
    """A once-per-step program over outer value ids, run on stage ``stage`` (-1: full mesh)."""

    stage: int
    program: Program
    plan: Plan
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class PipelineLayout:
    """Everything needed to build the runtime pipeline for a mesh."""

    split: SplitStep
    layering: Layering
    stages: tuple[PlannedStage, ...]
    pre: tuple[PlannedApply, ...]
    apply: tuple[PlannedApply, ...]
    method: PipeshardParallel
    axis_names: tuple[str, ...]
    mesh_shape: tuple[int, ...]


def _fingerprint(tree, static_repr, avals) -> str:
    text = "|".join([str(tree), static_repr] +
                    [f"{tuple(a.shape)}:{np.dtype(a.dtype).name}" for a in avals])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sub_traced(program: Program, sources, in_paths, out_paths) -> TracedFunction:
    leaves = lambda n: jax.tree_util.tree_structure((0,) * n)  # noqa: E731
    return TracedFunction(program, leaves(len(program.invars)), leaves(len(program.outvars)),
                          tuple(in_paths), tuple(out_paths), tuple(sources))


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


def plan_pipeline(fun, args, *, static_argnums, batch_flags, mesh_shape, axis_names,
                  cluster: Cluster, method: PipeshardParallel, memory_budget=None,
                  static_repr: str = "", device_ids=None) -> tuple[Plan, PipelineLayout]:
    start = time.perf_counter()
    B, schedule = method.num_microbatches, method.schedule
    split = split_step(fun, args, static_argnums, batch_flags, B)
    layering = assign_layers(split.forward.program, split.diff, split.batch, method.num_layers)
    L = layering.num_layers
    if method.num_stages is not None and method.num_stages > L:
        raise ValueError(f"num_stages={method.num_stages} but the loss has only {L} layer(s)"
                         f"{' (marked with autoshard.mark_layer_boundary)' if layering.user_boundaries else ''}"
                         f": ask for at most {L} stages, or for more layers (num_layers=...)")
    mesh_shape = tuple(mesh_shape)
    N = math.prod(mesh_shape)
    if method.num_stages is not None and method.num_stages > N:
        raise ValueError(f"num_stages={method.num_stages} but the mesh has only {N} devices: "
                         f"every stage needs at least one")
    shapes = ilp.submesh_shapes(mesh_shape)
    sizes = dict(zip(axis_names, mesh_shape))
    programs: dict = {}
    planned: dict = {}
    sends: dict = {}
    # stage-to-stage transfers go over the outermost (slowest) mesh axis's link
    link = cluster.links_for_mesh(mesh_shape)[0]
    F_outs = {a for a in layering.program.outvars if isinstance(a, int)}
    F_ins = set(layering.program.invars)
    costs: dict = {}
    for i, j, m in _candidates(L, shapes, N, method.num_stages):
        if (i, j) not in programs:
            programs[(i, j)] = stage_program(layering, i, j, split.diff, split.batch)
        sp = programs[(i, j)]
        P = sp.traced.program
        ct_batch = [len(P.avals[v].shape) > 0 for v in P.invars[len(sp.inputs):]]
        plan = plan_traced(sp.traced, mesh_shape=shapes[m], axis_names=axis_names,
                           cluster=cluster, method=method.stage_method,
                           batch_flat=list(sp.batch_in) + ct_batch)
        sub_sizes = dict(zip(axis_names, shapes[m]))
        pos = {v: k for k, v in enumerate(P.invars)}
        held = sum(bytes_per_device(P.avals[v], _spec_of(plan, v, pos), sub_sizes)
                   for v in sp.residuals)
        held += sum(bytes_per_device(P.avals[P.invars[k]], plan.flat_in_specs[k], sub_sizes)
                    for k in sp.backward_inputs if sp.batch_in[k])
        planned[(i, j, m)] = plan
        sends[(i, j, m)] = _send_seconds(sp, plan, link, sub_sizes, F_outs, F_ins)
        costs[(i, j, m)] = ilp.StageCost(plan.cost.total_s + sum(sends[(i, j, m)]),
                                         float(plan.cost.peak_memory_bytes), float(held))
    del sizes
    solution = ilp.solve_stages(L, [math.prod(s) for s in shapes], N, costs, B, schedule,
                                method.num_stages, memory_budget)
    chosen_shapes = [shapes[m] for _, _, m in solution.stages]
    positions = ilp.place_submeshes(mesh_shape, chosen_shapes)
    stages = tuple(PlannedStage(programs[(i, j)], planned[(i, j, m)], shapes[m], pos,
                                costs[(i, j, m)], sends[(i, j, m)])
                   for (i, j, m), pos in zip(solution.stages, positions))
    pre, apply = _plan_step_parts(split, stages, layering, mesh_shape, axis_names, cluster,
                                  method)
    layout = PipelineLayout(split, layering, stages, pre, apply, method, tuple(axis_names),
                            mesh_shape)
    plan = _make_plan(layout, solution, cluster, static_repr, device_ids,
                      time.perf_counter() - start, len(costs))
    return plan, layout


def _send_seconds(sp: StageProgram, plan: Plan, link, sizes, forward_outputs, forward_inputs
                  ) -> tuple[float, float]:
    """Seconds per micro-batch to send this stage's activations on and its activations'
    cotangents back: every device sends its shard, latency + bytes / bandwidth each."""
    P = sp.traced.program
    n_out = len(sp.outputs)
    fwd = sum(link.latency + bytes_per_device(P.avals[P.outvars[k]], plan.flat_out_specs[k],
                                              sizes) / link.bandwidth
              for k, v in enumerate(sp.outputs) if v not in forward_outputs)
    grads = [v for v, d in zip(sp.inputs, sp.diff_in) if d]
    bwd = sum(link.latency + bytes_per_device(P.avals[P.outvars[n_out + k]],
                                              plan.flat_out_specs[n_out + k], sizes)
              / link.bandwidth
              for k, v in enumerate(grads) if v not in forward_inputs)
    return float(fwd), float(bwd)


# ------------------------------------------------------------------ pre / apply programs
def _owners(split: SplitStep, stages) -> dict[int, int]:
    """Forward input index → the first stage reading it."""
    F = split.forward.program
    owner = {}
    for s, st in enumerate(stages):
        for v in st.program.inputs:
            if v in F.invars:
                owner.setdefault(F.invars.index(v), s)
    return owner


def _subprogram(O: Program, eqns, wanted_outputs) -> Program:
    made = {v for e in eqns for v in O.eqns[e].outputs}
    consts = dict(O.constants)
    inputs = []
    for e in eqns:
        for a in O.eqns[e].inputs:
            if isinstance(a, int) and a not in made and a not in consts and a not in inputs:
                inputs.append(a)
    used = {a for e in eqns for a in O.eqns[e].inputs if isinstance(a, int)}
    constants = tuple((v, c) for v, c in O.constants if v in used)
    return Program(O.avals, tuple(inputs), tuple(wanted_outputs),
                   tuple(O.eqns[e] for e in eqns), constants)


def _plan_step_parts(split: SplitStep, stages, layering, mesh_shape, axis_names, cluster,
                     method):
    traced = split.traced
    O = traced.program
    geqn = O.eqns[split.grad_eqn]
    in_path = {v: p for v, p in zip(O.invars, traced.in_paths)}
    out_path = {}
    for a, p in zip(O.outvars, traced.out_paths):
        if isinstance(a, int):
            out_path.setdefault(a, p)
    outvars = {a for a in O.outvars if isinstance(a, int)}

    def planned(stage, eqns, outputs, mesh):
        prog = _subprogram(O, eqns, outputs)
        sub = _sub_traced(prog, [traced.sources[e] for e in eqns],
                          [in_path.get(v, f"value{v}") for v in prog.invars],
                          [out_path.get(v, f"value{v}") for v in prog.outvars])
        plan = plan_traced(sub, mesh_shape=mesh, axis_names=axis_names, cluster=cluster,
                           method=method.stage_method, batch_flat=[False] * len(prog.invars))
        return PlannedApply(stage, prog, plan, prog.invars, tuple(outputs))

    pre = ()
    if split.pre:
        read_later = {a for e in split.post for a in O.eqns[e].inputs if isinstance(a, int)}
        read_later |= {a for a in geqn.inputs if isinstance(a, int)} | outvars
        outs = [v for e in split.pre for v in O.eqns[e].outputs if v in read_later]
        pre = (planned(-1, list(split.pre), outs, mesh_shape),)

    # label the post equations with the stage owning their gradients
    owner = _owners(split, stages)
    last = len(stages) - 1
    label: dict[int, int] = {geqn.outputs[0]: last}
    diff_idx = [k for k, d in enumerate(split.diff) if d]
    for g_out, k in zip(geqn.outputs[1:], diff_idx):
        label[g_out] = owner.get(k, 0)
    eqn_label: dict[int, int | None] = {}
    conflict = False
    for e in split.post:
        ls = {label[a] for a in O.eqns[e].inputs if isinstance(a, int) and a in label}
        if len(ls) > 1:
            conflict = True
            break
        eqn_label[e] = next(iter(ls)) if ls else None
        if ls:
            for v in O.eqns[e].outputs:
                label[v] = eqn_label[e]
    if not split.post:
        return pre, ()
    if conflict:  # an update mixing stages (e.g. global-norm clipping): one full-mesh program
        outs = [v for e in split.post for v in O.eqns[e].outputs if v in outvars]
        return pre, (planned(-1, list(split.post), list(dict.fromkeys(outs)), mesh_shape),)
    producer = {v: e for e in split.post for v in O.eqns[e].outputs}
    groups: dict[int, set] = {}
    for e, lab in eqn_label.items():
        if lab is not None:
            groups.setdefault(lab, set()).add(e)
    shared_outs = [a for a in outvars if a in producer and eqn_label[producer[a]] is None]
    if shared_outs:
        groups.setdefault(0, set()).update(producer[a] for a in shared_outs)
    apply = []
    for s in sorted(groups):
        eqns = set(groups[s])
        todo = list(eqns)
        while todo:  # pull in the shared (stage-less) equations these read
            e = todo.pop()
            for a in O.eqns[e].inputs:
                p = producer.get(a) if isinstance(a, int) else None
                if p is not None and p not in eqns:
                    eqns.add(p)
                    todo.append(p)
        order = sorted(eqns)
        outs = list(dict.fromkeys(v for e in order for v in O.eqns[e].outputs
                                  if v in outvars and (eqn_label[e] == s or
                                                       (s == 0 and eqn_label[e] is None))))
        if outs:
            apply.append(planned(s, order, outs, stages[s].mesh_shape))
    return pre, tuple(apply)


# ------------------------------------------------------------------ the Plan
def _scaled(cost: PlanCost, factor: float) -> list[float]:
    return [cost.compute_s * factor, cost.communication_s * factor, cost.resharding_s * factor]


def _make_plan(layout: PipelineLayout, solution, cluster, static_repr, device_ids,
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
        c = dataclasses.replace(st.plan.cost,
                                communication_s=st.plan.cost.communication_s + send_f + send_b)
        held = st.cost.fixed_bytes + (ilp.in_flight(schedule, s, S, B) - 1) * \
            st.cost.per_microbatch_bytes
        frac = st.program.forward_fraction
        work = st.plan.cost.total_s
        records.append(StageAssignment(
            layers=tuple(range(st.program.first, st.program.last + 1)),
            mesh_shape=tuple(st.mesh_shape), device_ids=tuple(int(ids[p]) for p in st.positions),
            cost=StageCost(c.compute_s, c.communication_s, c.resharding_s, int(held),
                           work * frac + send_f, work * (1 - frac) + send_b),
            num_microbatches=B, schedule=schedule, apply_cost=apply_by_stage.get(s)))
        parts.append(_scaled(c, 1.0 + ((B - 1) if s == slowest else 0)))
    comp = [sum(p[k] for p in parts) for k in range(3)]
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
        P = st.program.traced.program
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
        [f"apply on {'stage ' + str(a.stage) if a.stage >= 0 else 'the mesh'}"
         for a in layout.apply]
    collectives = tuple(dataclasses.replace(c, op=f"{n}: {c.op}")
                        for n, p in zip(names, plans) for c in p.collectives)
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
    unflat = lambda tree, flat: jax.tree_util.tree_unflatten(tree, list(flat))  # noqa: E731
    return Plan(method=repr(method), mesh_shape=tuple(layout.mesh_shape),
                axis_names=tuple(layout.axis_names), cluster=cluster,
                in_specs=unflat(traced.in_tree, flat_in),
                out_specs=unflat(traced.out_tree, flat_out), cost=cost, solver=solver,
                fingerprint=_fingerprint(traced.in_tree, static_repr, split.full_avals),
                in_paths=traced.in_paths, out_paths=traced.out_paths, flat_in_specs=flat_in,
                flat_out_specs=flat_out, collectives=collectives, top_ops=top_ops,
                warnings=warnings, stages=tuple(records))


def literal_value(atom):
    return atom.value if isinstance(atom, Literal) else None
