"""A solved :class:`~autoshard.intra.problem.ShardingProblem` as a :class:`Plan`: the layout
of every input, output and pinned intermediate, the collectives the plan pays for, its
modelled cost and the solver's statistics."""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from autoshard import ilp
from autoshard.cost_model import Cluster, MeshCostModel
from autoshard.ir.fingerprint import fingerprint
from autoshard.ir.specs import Spec, to_partition_spec
from autoshard.ir.trace import TracedFunction
from autoshard.plan.parts import Collective, OpCost, PlanCost, SolverInfo
from autoshard.plan.record import Plan

from .graph import unfused_ends, unfused_traffic
from .memory_points import planned_peak_bytes
from .problem import ShardingProblem, index_reshardings, repeated_reshardings
from .shared_reads import READ


def plan_record(traced: TracedFunction, problem: ShardingProblem, root_choices: Sequence[int],
                result: ilp.IntraOpResult | None, *, method, model: MeshCostModel,
                cluster: Cluster, axis_names: Sequence[str], static_repr: str,
                donated: Sequence[int], start: float, peak_bytes: int | None = None) -> Plan:
    """The plan of ``root_choices`` (a strategy per ILP node); ``result``: the solver's
    report (``None`` for a preset, whose intermediates are left to XLA: the plan pins
    none, its carried outputs take their inputs' layouts, and ``root_choices`` is the
    propagation it is priced by); ``start``: ``time.perf_counter()`` when planning began
    (for ``SolverInfo.planning_time_s``); ``peak_bytes``: the plan's reported peak when the
    caller has it (``memory_points.planned_peak_bytes`` of these choices)."""
    program = traced.program
    graph, grouping, uses, matrices = problem.graph, problem.grouping, problem.uses, \
        problem.matrices
    invar_index = {v: i for i, v in enumerate(program.invars)}
    choices = grouping.expand(root_choices)
    chosen = [n.strategies[c] for n, c in zip(graph.nodes, choices)]

    # Layout of every value under the chosen strategies.
    value_spec = {}
    for node, strat in zip(graph.nodes, chosen):
        if node.kind == READ:  # the layout its readers share, not the value's own
            continue
        for vid, spec in zip(node.outputs, strat.out_specs):
            value_spec[vid] = spec
    P = lambda spec: to_partition_spec(spec, axis_names)  # noqa: E731
    names = lambda axes: tuple(axis_names[a] for a in axes)  # noqa: E731
    flat_in = tuple(P(value_spec[v]) for v in program.invars)
    flat_out = [P(value_spec[a]) if isinstance(a, int) else P(()) for a in program.outvars]
    if result is None:  # hand-written: a carried output is laid out like its input
        for o, i in problem.carried:
            flat_out[o] = flat_in[i]
    flat_out = tuple(flat_out)
    value_specs, operand_specs, collectives = [], [], []
    for node, strat in zip(graph.nodes, chosen):
        if node.kind != "op":
            continue
        for vid, spec in zip(node.outputs, strat.out_specs):
            if len(spec) and vid not in invar_index and result is not None:
                value_specs += [(vid, P(s)) for s in _made_layouts(program, node.eqn, strat, spec)]
        for step in strat.collectives:
            collectives.append(Collective(node.name, step.kind, step.seconds, step.nbytes,
                                          names(step.axes)))

    def resharded(where: str, shape, itemsize: int, src: Spec, dst: Spec):
        """List the collectives XLA reshards a ``shape`` value from ``src`` to ``dst`` by."""
        for step in model.resharding_steps(shape, itemsize, src, dst):
            collectives.append(Collective(where, step.kind, step.seconds, step.nbytes,
                                          names(step.axes), resharding=True))

    resharding, copies = 0.0, 0
    # XLA's CSE runs those once
    repeated = repeated_reshardings(graph, uses, chosen, per_broadcast=result is None)
    for k, (use, matrix) in enumerate(zip(uses, matrices)):
        cost = float(matrix[choices[use.src], choices[use.dst]])
        if use.operand < 0:  # loop-carried: the next step's input layout
            resharding += cost
            # a preset returns it in that layout: the program reshards; a loop's carry
            # (into its entry, an op: ``loop_plans``) is resharded at the end of its body
            if result is None or graph.nodes[use.dst].kind == "op":
                aval = program.avals[graph.nodes[use.src].outputs[use.src_output]]
                resharded(f"{graph.nodes[use.src].name}→output", tuple(aval.shape),
                          aval.dtype.itemsize, chosen[use.src].out_specs[use.src_output],
                          chosen[use.dst].out_specs[0])
            continue
        vid = graph.nodes[use.src].outputs[use.src_output]
        src_spec = chosen[use.src].out_specs[use.src_output]
        dst_spec = chosen[use.dst].in_specs[use.operand]
        if result is not None and graph.nodes[use.dst].kind == "op" \
                and dst_spec != value_spec[vid]:  # read in another layout than made in
            eqn, shape = graph.nodes[use.dst].eqn, tuple(program.avals[vid].shape)
            operand_specs += [(eqn, use.operand, P(spec)) for spec in _route_layouts(
                model, shape, value_spec[vid], src_spec, dst_spec,
                shared=graph.nodes[use.src].kind == READ)]
        if k in repeated:
            continue  # another reader's resharding, the very same: XLA runs it once
        if src_spec != dst_spec:
            aval = program.avals[vid]
            copies += model.resharding_traffic(tuple(aval.shape), aval.dtype.itemsize,
                                               src_spec, dst_spec) + unfused_traffic(
                model, tuple(aval.shape), aval.dtype.itemsize, src_spec, dst_spec,
                unfused_ends(graph, use))
            resharded(f"{graph.nodes[use.src].name}→{graph.nodes[use.dst].name}",
                      tuple(aval.shape), aval.dtype.itemsize, src_spec, dst_spec)
        resharding += cost
    if result is None:  # the indices an argmax reads with its values, resharded with them
        for n, shape, itemsize, made, read in index_reshardings(graph, chosen):
            resharding += model.resharding(shape, itemsize, made, read)
            copies += model.resharding_traffic(shape, itemsize, made, read)
            resharded(f"{graph.nodes[n].name} indices", shape, itemsize, made, read)

    merged_latency = 0.0
    for group in problem.merged:  # latency of each merged all-reduce that runs, once
        if any(choices[v] == i for v, i in group.members):
            merged_latency += group.latency_s
            where = "" if group.runs == 1 else f", in a loop's body ({group.runs:g} runs)"
            collectives.append(Collective(f"merged all-reduce over mesh axes {group.axes}{where}",
                                          "all-reduce", group.latency_s, 0, names(group.axes)))
    peak = planned_peak_bytes(graph, model, choices, donated, problem.merged) \
        if peak_bytes is None else peak_bytes
    ops = [s for n, s in zip(graph.nodes, chosen) if n.kind == "op"]
    fed = [s for n, s in zip(graph.nodes, chosen) if n.kind in ("input", "constant")]
    # (an input's compute and traffic: its copy into an output it is returned as)
    cost = PlanCost(compute_s=float(sum(s.compute_s for s in chosen)),
                    communication_s=float(sum(s.communication_s for s in ops)) + merged_latency,
                    resharding_s=resharding, peak_memory_bytes=peak,
                    input_s=float(sum(s.communication_s for s in fed)),
                    flops=float(sum(s.flops for s in ops)),
                    bytes_accessed=float(sum(s.bytes_accessed for s in chosen) + copies))
    top = sorted(((n, s) for n, s in zip(graph.nodes, chosen) if n.kind == "op"),
                 key=lambda ns: -ns[1].cost_s)[:20]
    scope = lambda e: traced.scopes[e] if e < len(traced.scopes) else ""  # noqa: E731
    top_ops = tuple(OpCost(n.name, traced.sources[n.eqn], s.name, s.cost_s, scope(n.eqn))
                    for n, s in top)
    solver = None if result is None else SolverInfo(
        status=result.status, objective_s=result.objective, lower_bound_s=result.lower_bound,
        gap=result.gap, solve_time_s=result.solve_time_s, num_nodes=len(grouping.roots),
        num_variables=result.num_variables, num_constraints=result.num_constraints,
        planning_time_s=time.perf_counter() - start, tied_classes=result.stats.tied_classes,
        tied_gap=result.stats.tied_gap, solver_status=result.stats.solver_status,
        neighbourhood_rounds=result.stats.neighbourhood_rounds)
    in_specs = traced.input_tree(flat_in)
    out_specs = traced.output_tree(flat_out)
    return Plan(method=method, mesh_shape=model.mesh_shape,
                axis_names=tuple(axis_names), cluster=cluster, in_specs=in_specs,
                out_specs=out_specs, cost=cost, solver=solver,
                fingerprint=fingerprint(traced, static_repr), in_paths=traced.in_paths,
                out_paths=traced.out_paths, flat_in_specs=flat_in, flat_out_specs=flat_out,
                value_specs=tuple(value_specs), operand_specs=tuple(operand_specs),
                collectives=tuple(collectives), top_ops=top_ops, warnings=problem.warnings,
                alternatives=problem.starting_plans().alternatives if result is not None else (),
                in_shapes=tuple(_shape(program, v) for v in program.invars),
                out_shapes=tuple(_shape(program, a) for a in program.outvars))


def _made_layouts(program, eqn: int, strategy, spec) -> list:
    """The layouts an op's output is pinned to in turn, ``spec`` (the planned one) last.

    A gather whose partial sums (its table split on the indexed dim) are reduce-scattered
    is first pinned to the summed layout, the scattered axes left out: asked for the
    scattered layout directly, XLA's gather partitioner propagates it into the indices
    and moves them and the rows with all-to-alls and a permute (a GPT's embedding on 8x8:
    two all-to-alls over "data", an all-reduce and a permute); asked for the summed one, it
    all-reduces the partial rows, and the slice to ``spec`` is local (XLA's GPUs merge the
    two into the reduce-scatter priced; its CPUs run them as they stand, and are priced
    so: the scattered axes are those splitting both the result and the table's indexed
    dim, whatever collectives the backend's pricing names)."""
    equation = program.eqns[eqn]
    if equation.primitive.name != "gather" or not strategy.scatters:
        return [spec]
    table = strategy.in_specs[0]
    scattered = {a for d in equation.params["dimension_numbers"].start_index_map
                 for a in table[d]}
    summed = tuple(tuple(a for a in axes if a not in scattered) for axes in spec)
    return [summed, spec]


def _route_layouts(model: MeshCostModel, shape, made, src, dst, *, shared: bool) -> list:
    """The layouts an operand is pinned to in turn, ``dst`` last: the waypoints of each
    resharding priced (``made`` -> ``src`` -> ``dst`` when ``src`` is the layout a read node
    shares, else ``src`` -> ``dst``), so that XLA runs the priced collectives: from its
    readers' shared copy, not from the value as made, and one move at a time."""
    layouts: list = []
    if shared and src != made:
        layouts += [*model.resharding_waypoints(shape, made, src), src]
    if src != dst:
        layouts += [*model.resharding_waypoints(shape, src, dst), dst]
    return layouts


def _shape(program, atom) -> tuple[int, ...]:
    """The global shape of a program input or output (a value id or a literal)."""
    if isinstance(atom, int):
        return tuple(int(d) for d in program.avals[atom].shape)
    return tuple(int(d) for d in np.shape(atom.value))
