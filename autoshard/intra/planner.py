"""From a traced function to a Plan: strategies → costs → ILP → specs."""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

from autoshard import ilp
from autoshard.cost_model import Cluster, MeshCostModel, format_bytes
from autoshard.errors import InfeasiblePlanError
from autoshard.ir import trace as _trace
from autoshard.ir.fingerprint import fingerprint
from autoshard.ir.specs import Spec, from_partition_spec, spec_is_valid, to_partition_spec
from autoshard.ir.trace import TracedFunction
from autoshard.ir.user_frames import user_stacklevel
from autoshard.methods import DataParallel, Megatron, ShardParallel, ZeRO3
from autoshard.plan.parts import Collective, OpCost, PlanCost, SolverInfo
from autoshard.plan.record import Plan

from .combining import combine_all_reduces
from .following import group_followers, grouped_request
from .graph import ShardingGraph, Use, build_graph, use_cost_matrix
from .liveness import live_ranges
from .memory_points import candidate_steps, memory_terms, planned_peak_bytes, steps_over, tensor_bytes

_log = logging.getLogger("autoshard")

#: ILP nodes above which repeated layers are tied by default (``ShardParallel.tie_repeats``).
TIE_REPEATS_ABOVE = 600


def carried_pairs(traced: TracedFunction, donated_flat: Sequence[bool] = ()
                  ) -> tuple[tuple[int, int], ...]:
    """(flat output, flat input) pairs carried from one step to the next.

    An output mirrors an input when it sits at the same key path of the output
    tuple as the argument (``out[0]['w']`` ↔ ``args[0]['w']``) with the same shape
    and dtype — the ``(params, opt_state, batch) → (params, opt_state, loss)``
    convention — or, for donated arguments, when jax would alias them (first
    unused output of equal shape and dtype, in order).
    """
    program = traced.program
    aval = lambda v: (tuple(program.avals[v].shape), program.avals[v].dtype)  # noqa: E731
    by_path = {p: i for i, p in enumerate(traced.in_paths)}
    pairs, used_in, used_out = [], set(), set()
    for o, (path, atom) in enumerate(zip(traced.out_paths, program.outvars)):
        i = by_path.get("args" + path)
        if i is not None and isinstance(atom, int) and aval(atom) == aval(program.invars[i]):
            pairs.append((o, i))
            used_in.add(i)
            used_out.add(o)
    for i, donated in enumerate(donated_flat):
        if not donated or i in used_in:
            continue
        for o, atom in enumerate(program.outvars):
            if o not in used_out and isinstance(atom, int) and \
                    aval(atom) == aval(program.invars[i]):
                pairs.append((o, i))
                used_out.add(o)
                break
    return tuple(sorted(pairs))


def _carried_uses(graph: ShardingGraph, pairs) -> list[Use]:
    """Loop-carried tensor uses: output producer → the input node it feeds next step."""
    program = graph.traced.program
    uses = []
    for o, i in pairs:
        src, k = graph.producer[program.outvars[o]]
        dst = graph.input_node(i)
        if src != dst:
            uses.append(Use(src, k, dst, -1))
    return uses


def _price_fed_inputs(graph: ShardingGraph, model: MeshCostModel, pairs,
                      on_device=frozenset()) -> ShardingGraph:
    """Arguments not carried from the previous step (the batch) arrive from the host every
    call: each device copies in its shard, ``bytes per device / memory bandwidth``. Those in
    ``on_device`` (flat indices: made by another program on these devices) copy nothing."""
    program = graph.traced.program
    carried = {i for _, i in pairs}
    nodes = list(graph.nodes)
    for i, vid in enumerate(program.invars):
        if i in carried or i in on_device:
            continue
        n = graph.input_node(i)
        aval = program.avals[vid]
        shape, itemsize = tuple(aval.shape), aval.dtype.itemsize
        nodes[n] = dataclasses.replace(nodes[n], strategies=tuple(
            dataclasses.replace(s, communication_s=model.bytes_per_device(
                shape, itemsize, s.out_specs[0]) / model.cluster.memory_bandwidth)
            for s in nodes[n].strategies))
    return dataclasses.replace(graph, nodes=tuple(nodes))


def _seed(graph: ShardingGraph, grouping, request: ilp.IntraOpRequest, model: MeshCostModel,
          method, batch_flat: Sequence[bool]) -> tuple[int, ...] | None:
    """The solver's starting plan: the cheapest of greedy plans laid out like each preset
    (inputs restricted to its layouts) and one unrestricted, so that a search stopped by
    its time limit is never worse than the hand-written plans."""
    styles = [None]
    if isinstance(method, ShardParallel):
        styles += [DataParallel(), ZeRO3(), Megatron()]
    program = graph.traced.program
    position = {r: p for p, r in enumerate(grouping.roots)}
    candidates = []
    for style in styles:
        allowed = {}
        for i, vid in enumerate(program.invars):
            v = graph.input_node(i)
            if style is None or grouping.root[v] != v:
                continue
            wanted = style.input_specs(tuple(program.avals[vid].shape), model.mesh_shape,
                                       bool(batch_flat[i]))
            options = [j for j, s in enumerate(graph.nodes[v].strategies)
                       if s.out_specs[0] in wanted]
            if options:
                allowed[position[v]] = options
        candidates.append(ilp.greedy_assignment(request, allowed))
    return ilp.best_assignment(request, candidates)


def _fixed_inputs(program, in_layouts: Mapping[int, PartitionSpec], mesh_shape, axis_names
                  ) -> dict[int, Spec]:
    """``in_layouts`` as internal specs, each checked against its input's shape and the mesh."""
    fixed = {}
    for i, pspec in in_layouts.items():
        if not 0 <= i < len(program.invars):
            raise ValueError(f"in_layouts names input {i} of a program with "
                             f"{len(program.invars)} inputs")
        shape = tuple(program.avals[program.invars[i]].shape)
        spec = from_partition_spec(pspec, len(shape), axis_names)
        if not spec_is_valid(shape, spec, mesh_shape):
            raise ValueError(f"in_layouts gives input {i} (shape {shape}) the layout {pspec}, "
                             f"which a {'x'.join(map(str, mesh_shape))} mesh cannot hold")
        fixed[i] = spec
    return fixed


def _solve_within_budget(request: ilp.IntraOpRequest, graph: ShardingGraph, grouping, model,
                         donated, budget: float | None, mesh_shape) -> ilp.IntraOpResult:
    """Solve; with a budget, first without it (repeated layers tied, often one LP): a plan
    whose whole liveness profile fits is optimal under the budget too. Otherwise constrain
    the candidate peak steps, then check the plan's whole liveness profile and add the
    steps it overflows, until none does (at most 8 solves)."""
    free = ilp.solve_intra_op(request)
    if budget is None:
        return free
    program = graph.traced.program
    tensors = tensor_bytes(graph, grouping, model, live_ranges(program, donated))
    if not steps_over(tensors, free.choices, len(program.eqns), budget):
        return free
    steps = candidate_steps(tensors, len(program.eqns))
    for _ in range(8):
        constrained = dataclasses.replace(request, memory_terms=memory_terms(tensors, steps),
                                          memory_budget=float(budget))
        try:
            result = ilp.solve_intra_op(constrained)
        except ilp.InfeasibleError as err:
            raise InfeasiblePlanError(
                f"memory_budget={format_bytes(budget)} per device cannot be met on a "
                f"{'x'.join(map(str, mesh_shape))} mesh: the smallest peak any plan reaches is "
                f"about {format_bytes(err.min_peak_bytes)} per device (liveness estimate). "
                f"Give memory_budget >= {format_bytes(err.min_peak_bytes)}, use more devices, "
                f"or shrink the model or batch", err.min_peak_bytes, budget) from None
        missed = set(steps_over(tensors, result.choices, len(program.eqns), budget)) - set(steps)
        if not missed:
            return result
        steps = sorted(set(steps) | missed)
    return result


def _warn_unsupported(graph: ShardingGraph) -> tuple[str, ...]:
    messages = []
    for kind, items in (("no sharding rule for", graph.unsupported),
                        ("control flow", graph.control_flow)):
        names = sorted({p for p, _ in items})
        for name in names:
            where = next(src for p, src in items if p == name)
            count = sum(p == name for p, _ in items)
            msg = (f"autoshard: {kind} primitive '{name}' ({count} use(s), first at {where}); "
                   "it runs replicated on every device")
            if name == "scan":
                msg += (f" (a lax.scan is unrolled and sharded when its steps add up to at most "
                        f"autoshard.ir.trace.MAX_UNROLLED_EQUATIONS = {_trace.MAX_UNROLLED_EQUATIONS} "
                        "equations; this one has more)")
            messages.append(msg)
            warnings.warn(msg, stacklevel=user_stacklevel())
    return tuple(messages)


def plan_traced(traced: TracedFunction, *, mesh_shape: tuple[int, ...],
                axis_names: tuple[str, ...], cluster: Cluster, method,
                batch_flat: Sequence[bool], static_repr: str = "",
                donated_flat: Sequence[bool] = (), memory_budget: float | None = None,
                in_layouts: Mapping[int, PartitionSpec] | None = None,
                carried: Sequence[tuple[int, int]] = (), carried_weight: float = 1.0) -> Plan:
    """Plan ``traced`` on a mesh of ``mesh_shape`` with ``method``; with ``memory_budget``
    (bytes per device) the estimated peak memory of the plan stays within it.

    ``in_layouts``: flat input index → the layout that input already has on this mesh
    (another program, run before on the same devices, made it or reads it so). The plan
    reads it in that layout, whatever ``method`` allows, and prices no copy from the host
    for it; a pipeline uses this so that its programs agree at their boundaries.

    ``carried``: (flat output, flat input) pairs priced as carried (the output is read
    in that input's layout later), besides those :func:`carried_pairs` finds by key path;
    a pipeline stage pairs each parameter's gradient with the parameter, which the
    apply-gradient program reads in the stage's layout. Their resharding is priced at
    ``carried_weight`` times its cost (a stage that runs B times per step pays it once:
    1/B)."""
    start = time.perf_counter()
    model = MeshCostModel(cluster, tuple(mesh_shape))
    program = traced.program
    invar_index = {v: i for i, v in enumerate(program.invars)}
    fixed = _fixed_inputs(program, in_layouts or {}, tuple(mesh_shape), tuple(axis_names))

    def input_specs(i, shape):
        if i in fixed:
            return [fixed[i]]
        return method.input_specs(shape, model.mesh_shape, bool(batch_flat[i]))

    _log.info("planning %r on mesh %s: %d equations", method,
              "x".join(map(str, mesh_shape)), len(program.eqns))
    graph = build_graph(traced, model, input_specs)
    messages = _warn_unsupported(graph)
    time_limit = getattr(method, "time_limit_s", ShardParallel().time_limit_s)
    by_key_path = tuple(sorted(carried_pairs(traced, donated_flat)))
    extra = tuple(sorted(set(carried) - set(by_key_path)))
    pairs = tuple(sorted(by_key_path + extra))
    graph = _price_fed_inputs(graph, model, pairs, frozenset(fixed))
    graph, merged = combine_all_reduces(graph, model)
    weighted = _carried_uses(graph, extra)
    uses = tuple(graph.uses) + tuple(_carried_uses(graph, by_key_path)) + tuple(weighted)
    memo: dict = {}
    matrices = [use_cost_matrix(graph, u, model, memo) for u in uses]
    if carried_weight != 1.0:
        matrices[len(uses) - len(weighted):] = [m * carried_weight
                                                for m in matrices[len(uses) - len(weighted):]]
    grouping = group_followers(graph)
    request = grouped_request(graph, grouping, uses, matrices, time_limit, merged)
    _log.info("strategies and costs: %d nodes, %d ILP nodes after following, %d edges "
              "(%.2f s)", len(graph.nodes), len(grouping.roots), len(request.edges),
              time.perf_counter() - start)
    tie = getattr(method, "tie_repeats", None)
    tie = len(grouping.roots) > TIE_REPEATS_ABOVE if tie is None else bool(tie)
    gap = getattr(method, "gap_limit", None)
    request = dataclasses.replace(
        request, hint=_seed(graph, grouping, request, model, method, batch_flat),
        tie_repeats=tie, gap_limit=(0.01 if tie else 0.0) if gap is None else gap)
    donated = [v for v, d in zip(program.invars, donated_flat) if d]
    _log.info("solving: starting plan %.4g s per step, time limit %g s%s%s",
              ilp.evaluate(request, request.hint).objective if request.hint else float("nan"),
              time_limit, ", repeated layers tied" if request.tie_repeats else "",
              f", memory budget {format_bytes(memory_budget)}" if memory_budget else "")
    result = _solve_within_budget(request, graph, grouping, model, donated, memory_budget,
                                  mesh_shape)
    _log.info("solved: %s (%s), %.4g s per step, gap %.2f%%, %d variables (%.2f s, LP %.2f s)",
              result.status, result.stats.solver_status, result.objective, 100 * result.gap,
              result.num_variables, result.solve_time_s, result.stats.lp_time_s)
    choices = grouping.expand(result.choices)
    chosen = [n.strategies[c] for n, c in zip(graph.nodes, choices)]

    # Layout of every value under the chosen strategies.
    value_spec = {}
    for node, strat in zip(graph.nodes, chosen):
        for vid, spec in zip(node.outputs, strat.out_specs):
            value_spec[vid] = spec
    P = lambda spec: to_partition_spec(spec, axis_names)  # noqa: E731
    flat_in = tuple(P(value_spec[v]) for v in program.invars)
    flat_out = tuple(P(value_spec[a]) if isinstance(a, int) else P(())
                     for a in program.outvars)
    value_specs, operand_specs, collectives = [], [], []
    for node, strat in zip(graph.nodes, chosen):
        if node.kind != "op":
            continue
        for vid, spec in zip(node.outputs, strat.out_specs):
            if len(spec) and vid not in invar_index:
                value_specs.append((vid, P(spec)))
        if strat.communication_s > 0:
            kind = "reduce-scatter" if "reduce-scatter" in strat.name else "all-reduce"
            collectives.append(Collective(node.name, kind, strat.communication_s))
    resharding = 0.0
    for use, matrix in zip(uses, matrices):
        cost = float(matrix[choices[use.src], choices[use.dst]])
        if use.operand < 0:  # loop-carried: the next step's input layout
            resharding += cost
            continue
        src_spec = chosen[use.src].out_specs[use.src_output]
        dst_spec = chosen[use.dst].in_specs[use.operand]
        if src_spec != dst_spec:
            operand_specs.append((graph.nodes[use.dst].eqn, use.operand, P(dst_spec)))
            if cost > 0:
                collectives.append(Collective(f"{graph.nodes[use.src].name}→"
                                              f"{graph.nodes[use.dst].name}", "resharding", cost))
        resharding += cost

    merged_latency = 0.0
    for group in merged:  # latency of each merged all-reduce that runs, once
        if any(choices[v] == i for v, i in group.members):
            merged_latency += group.latency_s
            collectives.append(Collective(f"merged all-reduce over mesh axes {group.axes}",
                                          "all-reduce", group.latency_s))
    peak = planned_peak_bytes(graph, model, chosen, donated)
    cost = PlanCost(compute_s=float(sum(s.compute_s for s in chosen)),
                    communication_s=float(sum(s.communication_s for s in chosen)) + merged_latency,
                    resharding_s=resharding, peak_memory_bytes=peak)
    top = sorted(((n, s) for n, s in zip(graph.nodes, chosen) if n.kind == "op"),
                 key=lambda ns: -ns[1].cost_s)[:20]
    top_ops = tuple(OpCost(n.name, traced.sources[n.eqn], s.name, s.cost_s) for n, s in top)
    solver = SolverInfo(status=result.status, objective_s=result.objective,
                        lower_bound_s=result.lower_bound, gap=result.gap,
                        solve_time_s=result.solve_time_s, num_nodes=len(grouping.roots),
                        num_variables=result.num_variables,
                        num_constraints=result.num_constraints,
                        planning_time_s=time.perf_counter() - start,
                        tied_classes=result.stats.tied_classes, tied_gap=result.stats.tied_gap)
    in_specs = traced.input_tree(flat_in)
    out_specs = traced.output_tree(flat_out)
    return Plan(method=method, mesh_shape=tuple(mesh_shape),
                axis_names=tuple(axis_names), cluster=cluster, in_specs=in_specs,
                out_specs=out_specs, cost=cost, solver=solver,
                fingerprint=fingerprint(traced, static_repr), in_paths=traced.in_paths,
                out_paths=traced.out_paths, flat_in_specs=flat_in, flat_out_specs=flat_out,
                value_specs=tuple(value_specs), operand_specs=tuple(operand_specs),
                collectives=tuple(collectives), top_ops=top_ops, warnings=messages)
