"""The intra-op problem of a traced function on a mesh: its sharding graph, the price of
every strategy and tensor use, and the ILP request over them (plain data for ``ilp``)."""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from jax.sharding import PartitionSpec

from autoshard import ilp
from autoshard.cost_model import MeshCostModel
from autoshard.ir import trace as _trace
from autoshard.ir.loop_view import LoopView
from autoshard.ir.program import Literal
from autoshard.ir.specs import Spec, enumerate_specs, from_partition_spec, spec_is_valid
from autoshard.ir.trace import TracedFunction, argument_of
from autoshard.ir.user_frames import user_stacklevel
from autoshard.methods import PRESETS, Annotated, DataParallel, Megatron, ShardParallel, ZeRO3
from autoshard.plan.parts import Alternative

from .carried_axes import carried_options, fixed_axes, layout_axes
from .combining import MergedAllReduce, combine_all_reduces
from .following import Grouping, group_followers, grouped_request
from .graph import ShardingGraph, Use, build_graph, use_cost_matrix
from .op_rules import INDEXED_REDUCTIONS
from .presets import preset_layouts
from .propagated_strategies import preset_propagation, propagated_options, resharded_followers
from .shared_reads import reads_following_producers, regrouped, settle_reads, share_reads
from .xla_propagation import ProgramFactors, Propagated, broadcast_operand, program_factors

_log = logging.getLogger("autoshard")

#: ILP nodes above which repeated layers are tied by default (``ShardParallel.tie_repeats``).
TIE_REPEATS_ABOVE = 600
#: ... when tying leaves at most this fraction of them. Tying that shrinks a problem less
#: ties few layers, or none: mostly alike ops within a layer (q, k and v projections,
#: optimizer updates of equal shapes), whose one shared choice costs more than the smaller
#: problem saves. Measured on the equinox ViT example (2 blocks, 683 nodes, 555 classes on
#: 2x4): tied, 10.4 s for 1.833 ms per step; untied, 6.3 s for the optimum, 1.798 ms. A
#: 3-layer GPT (652 nodes, 394 classes) ties: on 8x8, 3.4 s against 24.1 s untied, within
#: 0.01 % of the untied plan's cost.
TIE_REPEATS_SHRINK = 0.75


@dataclasses.dataclass(frozen=True)
class StartingPlans:
    """Plans to start a search from (one strategy per ILP node each): ``hint`` is the
    cheapest of ``seeds`` (every one considered: another may be the cheapest that fits a
    memory budget); ``alternatives``: the presets' plans priced by the same model, for a
    search's summary."""

    hint: tuple[int, ...] | None
    alternatives: tuple[Alternative, ...]
    seeds: tuple[tuple[int, ...], ...]

    def __repr__(self):
        return (f"StartingPlans({len(self.seeds)} seeds, alternatives: "
                f"{[a.method for a in self.alternatives]})")


@dataclasses.dataclass(frozen=True, eq=False)
class ShardingProblem:
    """Everything priced for one planning call. ``uses[k]`` is priced by ``matrices[k]``
    (seconds, [src strategy, dst strategy]); ``request`` is the ILP over ``grouping``'s
    roots; ``warnings`` name the equations that run replicated for want of a rule."""

    graph: ShardingGraph
    grouping: Grouping
    uses: tuple[Use, ...]
    matrices: tuple[np.ndarray, ...]
    merged: tuple[MergedAllReduce, ...]
    request: ilp.IntraOpRequest
    warnings: tuple[str, ...]
    #: the solver's starting plans, made at the first call (the planner makes them while
    #: the LP relaxation runs: ``ilp.solve_intra_op(starting_plan=...)``); ``request``
    #: carries no hint
    starting_plans: Callable[[], StartingPlans]
    carried: tuple[tuple[int, int], ...] = ()  # (flat output, flat input) priced as carried
    #: prices the same graph without read nodes when called: (request, grouping); None
    #: when the graph has no read nodes or the method searches nothing
    per_use: Callable[[], tuple[ilp.IntraOpRequest, Grouping]] | None = None
    #: a preset's: XLA's propagation of its fixed layouts (``preset_propagation``)
    propagated: Propagated | None = None

    def __repr__(self):
        return (f"ShardingProblem({len(self.graph.nodes)} nodes, {len(self.grouping.roots)} "
                f"ILP nodes, {len(self.request.edges)} edges)")


def build_problem(traced: TracedFunction, model: MeshCostModel, method, *,
                  batch_flat: Sequence[bool], axis_names: Sequence[str],
                  donated_flat: Sequence[bool] = (),
                  in_layouts: Mapping[int, PartitionSpec] | None = None,
                  carried: Sequence[tuple[int, int]] = (), carried_weight: float = 1.0,
                  annotations: Sequence[Spec] | None = None,
                  view: LoopView | None = None) -> ShardingProblem:
    """Strategies of every equation, their prices and the ILP request (see
    :func:`autoshard.intra.planner.plan_traced` for the arguments; ``view``: ``traced`` is
    that view of a program's loops, ``loop_plans``)."""
    start = time.perf_counter()
    program = traced.program
    fixed = _fixed_inputs(program, in_layouts or {}, model.mesh_shape, tuple(axis_names))
    preset = preset_layouts(method, program, model.mesh_shape, batch_flat, annotations) \
        if isinstance(method, PRESETS) else None

    def input_specs(i, shape):
        if i in fixed:
            return [fixed[i]]
        if preset is not None:  # a hand-written layout: exactly one
            return [preset[i]]
        return enumerate_specs(shape, model.mesh_shape)

    per_use_graph = build_graph(traced, model, input_specs, axis_names,
                                donated=[i for i, d in enumerate(donated_flat) if d],
                                view=view)
    # (a preset is priced per reader: XLA's partitioner reshards a value for each reader,
    # sharing only equal reshardings; read nodes model the copies a search may share)
    graph = share_reads(per_use_graph) if len(model.mesh_shape) <= SHARED_READS_MAX_AXES \
        and not isinstance(method, PRESETS) else per_use_graph
    has_read_nodes = graph is not per_use_graph  # (pricing makes a new graph below)
    messages = _warn_unsupported(graph)
    by_key_path = tuple(sorted(carried_pairs(traced, donated_flat)))
    extra = tuple(sorted(set(carried) - set(by_key_path)))
    pairs = tuple(sorted(by_key_path + extra))
    time_limit = getattr(method, "time_limit_s", ShardParallel().time_limit_s)
    # a preset's op that XLA computes in another layout than the operand it would follow
    # is priced as computed so: on its own, that operand resharded for it
    propagated = preset_propagation(graph, _input_layouts(graph), model.mesh_shape, pairs) \
        if isinstance(method, PRESETS) else None
    apart = frozenset() if propagated is None else resharded_followers(graph, propagated)
    priced = functools.partial(_priced_problem, model=model, pairs=pairs, fixed=frozenset(fixed),
                               donated=frozenset(i for i, d in enumerate(donated_flat) if d),
                               extra=extra, by_key_path=by_key_path,
                               carried_weight=carried_weight, time_limit=time_limit,
                               apart=apart, memo={})
    graph, merged, uses, matrices, grouping, request = priced(graph)
    per_use = None
    if has_read_nodes and isinstance(method, ShardParallel):
        # the same problem priced per use, when the planner asks (read nodes made the
        # shared problem's LP fractional): its LP is much stronger
        per_use = functools.partial(_per_use_problem, priced, per_use_graph)
    tie = getattr(method, "tie_repeats", None)
    if tie is None:  # (a preset solves nothing: its repeats are not looked for)
        tie = isinstance(method, ShardParallel) and request.num_nodes > TIE_REPEATS_ABOVE \
            and request.repeats.num_classes <= TIE_REPEATS_SHRINK * request.num_nodes
    else:
        tie = bool(tie)
    gap = getattr(method, "gap_limit", None)
    request = request.with_options(tie_repeats=tie,
                                   gap_limit=(0.01 if tie else 0.0) if gap is None else gap)

    @functools.cache
    def starting_plans() -> StartingPlans:
        propagation = _propagation(graph, grouping, uses, matrices, time_limit, merged) \
            if isinstance(method, ShardParallel) else None
        plans = _seed(graph, grouping, request, propagation, model, method, batch_flat,
                      annotations, uses=uses, matrices=matrices, pairs=pairs)
        _log.info("starting plan: %.4g s per step, the cheapest of %d", ilp.evaluate(
            request, plans.hint).objective if plans.hint else float("nan"), len(plans.seeds))
        return plans

    _log.info("strategies and costs: %d nodes, %d ILP nodes after following, %d edges "
              "(%.2f s)", len(graph.nodes), len(grouping.roots), len(request.edges),
              time.perf_counter() - start)
    return ShardingProblem(graph, grouping, uses, tuple(matrices), merged, request, messages,
                           starting_plans, pairs, per_use, propagated)


def _priced_problem(graph: ShardingGraph, *, model: MeshCostModel, pairs, fixed: frozenset,
                    donated: frozenset, extra, by_key_path, carried_weight: float,
                    time_limit: float, memo: dict, apart: frozenset = frozenset()):
    """(graph, merged all-reduces, uses, cost matrices, grouping, request) of ``graph``
    priced: fed inputs, inputs returned as they came, combined all-reduces (a loop's body's
    among themselves), carried uses (weighted; and a loop's carries, ``graph.view``),
    followers grouped (but the nodes ``apart``)."""
    view = graph.view
    graph = _price_returned_inputs(_price_fed_inputs(graph, model, pairs, fixed), model, donated)
    in_loops = {}  # a loop body's node -> (its loop, how many times the body runs per call)
    for v, node in enumerate(graph.nodes if view is not None else ()):
        origin = view.origins[node.eqn] if node.kind == "op" else ()
        if origin[:1] == ("body",):
            in_loops[v] = (origin[1], view.loops[origin[1]].runs)
    graph, merged = combine_all_reduces(graph, model, in_loops)
    weighted = _carried_uses(graph, extra)
    looped = () if view is None else tuple(_loop_carried_uses(graph, view))
    uses = tuple(graph.uses) + looped + tuple(_carried_uses(graph, by_key_path)) + \
        tuple(weighted)
    matrices = [use_cost_matrix(graph, u, model, memo) * u.weight if u.weight != 1.0
                else use_cost_matrix(graph, u, model, memo) for u in uses]
    if carried_weight != 1.0:  # the weighted carried uses come last
        first = len(uses) - len(weighted)
        matrices[first:] = [m * carried_weight for m in matrices[first:]]
    grouping = group_followers(graph, apart)
    request = grouped_request(graph, grouping, uses, matrices, time_limit, merged,
                              mesh_shape=model.mesh_shape)
    return graph, merged, uses, matrices, grouping, request


def _per_use_problem(priced, graph: ShardingGraph) -> tuple[ilp.IntraOpRequest, Grouping]:
    """(request, grouping) of ``graph`` (no read nodes) priced as ``priced`` prices."""
    _, _, _, _, grouping, request = priced(graph)
    return request, grouping


#: meshes with at most this many axes price a value's reshardings shared by its readers
#: (read nodes, ``shared_reads``). 3-axis meshes are priced per use: their problems are
#: solved over neighbourhoods of a plan, twice with read nodes (per use, then shared), and
#: on the ``planning_time --scale`` rows that took 1.3-1.7x the planning time for modelled
#: costs within -3% to +5% of the per-use plans (LLaMA-7B-shaped on 8x8x8: 36.5 s for
#: 285.5 ms per step, against 21.2 s for 289.8).
SHARED_READS_MAX_AXES = 2


#: how much dearer a resharding second is than any other when a preset's fixed layout is
#: propagated through its program: XLA's propagation computes each op in the layouts its
#: operands arrive in (with the collective that implies, such as the all-reduce of a
#: split contraction) and reshards an operand only where no such strategy exists
PROPAGATION_RESHARDING_WEIGHT = 1e3


def propagated_choices(problem: ShardingProblem, mesh_shape: Sequence[int]
                       ) -> tuple[int, ...]:
    """A strategy per ILP node for a preset, whose arguments each have one layout: each
    op makes its values in the layouts XLA's propagation gives them
    (``xla_propagation``), and, in program order, takes the cheapest such strategy that
    reads its operands as they were made (resharding only where none does), as XLA's
    partitioner does; nothing is searched."""
    graph = problem.graph
    propagation = _propagation(graph, problem.grouping, problem.uses, problem.matrices,
                               problem.request.time_limit_s, problem.merged)
    return _shared(graph, problem.grouping, problem.request, propagation,
                   ilp.greedy_assignment(propagation[0], _preset_options(
                       graph, propagation[1], _input_layouts(graph), {}, mesh_shape,
                       problem.carried, propagated=problem.propagated)))


def _input_layouts(graph: ShardingGraph) -> list[Spec]:
    """Each flat input's layout in a graph whose inputs have one strategy each (fixed)."""
    return [graph.nodes[graph.input_node(i)].strategies[0].out_specs[0]
            for i in range(len(graph.traced.program.invars))]


def _preset_options(graph: ShardingGraph, grouping: Grouping, layouts: Sequence[Spec],
                    restrictions: Mapping[int, list[int]], mesh_shape: Sequence[int],
                    pairs: Sequence[tuple[int, int]], factors: ProgramFactors | None = None,
                    propagated: Propagated | None = None) -> dict[int, list[int]]:
    """``restrictions`` (ILP node position -> strategies, over ``grouping``) with every
    node kept to the axes XLA's propagation can use (``_carried``) and to the strategies
    closest to its layouts (``propagated_strategies.propagated_options``) where it has
    such strategies; a node's own restriction wins where they leave it nothing."""
    merged = _carried(graph, grouping, layouts, restrictions, mesh_shape)
    for position, options in propagated_options(graph, grouping, layouts, mesh_shape,
                                                pairs, factors, propagated).items():
        before = merged.get(position)
        kept = set(options if before is None else before)
        merged[position] = [j for j in options if j in kept] or list(before)
    return merged


def _carried(graph: ShardingGraph, grouping: Grouping, layouts: Sequence[Spec],
             restrictions: Mapping[int, list[int]], mesh_shape: Sequence[int] | None = None
             ) -> dict[int, list[int]]:
    """``restrictions`` (ILP node position -> strategies, over ``grouping``) with every
    node kept to the mesh axes the inputs' fixed ``layouts`` and the program's sharding
    constraints use (``fixed_axes``: the axes XLA's propagation can split ops over); a
    node's own restriction wins where both leave it nothing. Given ``mesh_shape``, layouts
    that use every axis of it (the common case) restrict nothing, found without a pass."""
    if mesh_shape is not None and \
            {a for a, size in enumerate(mesh_shape) if size > 1} <= layout_axes(layouts):
        return {position: list(options) for position, options in restrictions.items()}
    carried = carried_options(graph, grouping, fixed_axes(graph, layouts))
    merged = dict(carried)
    for position, options in restrictions.items():
        kept = set(carried.get(position, options))
        merged[position] = [j for j in options if j in kept] or list(options)
    return merged


def _propagation(graph, grouping, uses, matrices, time_limit, merged):
    """(request, grouping) that XLA's propagation of fixed layouts is modelled by:
    resharding dearer than anything else, and every reader of a value resharding it for
    itself (read nodes follow their producer: ``shared_reads.reads_following_producers``)."""
    following = reads_following_producers(graph, grouping)
    return grouped_request(graph, following, uses, matrices, time_limit, merged,
                           resharding_weight=PROPAGATION_RESHARDING_WEIGHT), following


def _shared(graph, grouping, request, propagation, choices) -> tuple[int, ...]:
    """Choices over ``propagation``'s nodes as choices over ``request``'s, each read node
    then moved to the layout its readers share best (as XLA's CSE shares a resharding)."""
    return settle_reads(graph, grouping, request, regrouped(choices, propagation[1], grouping))


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


def undonated_updates(traced: TracedFunction, donated_flat: Sequence[bool]
                      ) -> tuple[tuple[str, int], ...]:
    """(key path, argument number) of each flat input the function returns updated at the
    same key path (:func:`carried_pairs`) that the call does not donate: its old and new
    values are both held while the step runs."""
    return tuple((traced.in_paths[i], argument_of(traced.in_paths[i]))
                 for _, i in carried_pairs(traced)
                 if not (i < len(donated_flat) and donated_flat[i]))


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


def _loop_carried_uses(graph: ShardingGraph, view: LoopView) -> list[Use]:
    """Each loop's carries, from the body that makes them back into their entries, every
    step (``loop_plans``)."""
    node_of = {n.eqn: i for i, n in enumerate(graph.nodes) if n.kind == "op"}
    uses = []
    for loop in view.loops:
        for value, entry in loop.carried:
            src, k = graph.producer[value]
            if src != node_of[entry]:
                uses.append(Use(src, k, node_of[entry], -1, float(loop.length)))
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


def _price_returned_inputs(graph: ShardingGraph, model: MeshCostModel,
                           donated: frozenset) -> ShardingGraph:
    """An argument the function returns unchanged and the call does not donate is copied
    into the output's buffer by the compiled program: its input node's strategies read and
    write its bytes per device once per time it is returned (``compute_s``,
    ``bytes_accessed``; measured: a returned [128, 128] f32 argument adds its bytes twice
    to ``cost_analysis``'s). A donated one is the output's buffer already."""
    program = graph.traced.program
    position = {v: i for i, v in enumerate(program.invars)}
    returned = [position[a] for a in program.outvars
                if not isinstance(a, Literal) and a in position and position[a] not in donated]
    if not returned:
        return graph
    nodes = list(graph.nodes)
    for i in returned:
        n = graph.input_node(i)
        aval = program.avals[program.invars[i]]
        shape, itemsize = tuple(aval.shape), aval.dtype.itemsize

        def copied(s):
            nbytes = 2 * model.bytes_per_device(shape, itemsize, s.out_specs[0])
            return dataclasses.replace(
                s, compute_s=s.compute_s + model.compute(0.0, nbytes, aval.dtype.name),
                bytes_accessed=s.bytes_accessed + nbytes)
        nodes[n] = dataclasses.replace(nodes[n], strategies=tuple(
            copied(s) for s in nodes[n].strategies))
    return dataclasses.replace(graph, nodes=tuple(nodes))


def _seed(graph: ShardingGraph, grouping, request: ilp.IntraOpRequest,
          propagation: tuple[ilp.IntraOpRequest, Grouping] | None, model: MeshCostModel,
          method, batch_flat: Sequence[bool], annotations: Sequence[Spec] | None, *,
          uses: Sequence[Use], matrices: Sequence[np.ndarray],
          pairs: Sequence[tuple[int, int]]) -> StartingPlans:
    """The solver's starting plan: the cheapest of the presets' own plans (their input
    layouts propagated as XLA does, over ``propagation``: see :func:`propagated_choices`;
    the model's own annotations among them when the arguments carry some), greedy plans
    with inputs laid out like each preset, and one unrestricted greedy plan; so a search
    stopped by its time limit is never worse than the hand-written plans. Also the
    presets' plans, priced (for the summary of a search), and every candidate."""
    styles = [None]
    if isinstance(method, ShardParallel):
        styles += [DataParallel(), ZeRO3(), Megatron()]
        if annotations is not None:
            styles.append(Annotated())
    program = graph.traced.program
    position = {r: p for p, r in enumerate(grouping.roots)}
    if propagation is not None:
        propagated_position = {r: p for p, r in enumerate(propagation[1].roots)}
    restrictions = []  # per style: input node -> the strategies laying it out so
    fixed = []         # per style: every input's layout
    factors = program_factors(program, graph.traced.signatures, graph.per_step_copies) \
        if propagation is not None and len(styles) > 1 else None
    for style in styles:
        allowed = {}
        layouts = () if style is None else \
            preset_layouts(style, program, model.mesh_shape, batch_flat, annotations)
        fixed.append(layouts)
        for i, spec in enumerate(layouts):
            v = graph.input_node(i)
            if grouping.root[v] != v:
                continue
            options = [j for j, s in enumerate(graph.nodes[v].strategies)
                       if s.out_specs[0] == spec]
            if options:
                allowed[v] = options
        restrictions.append(allowed)
    greedy = ilp.greedy_assignments(request, [{position[v]: options for v, options
                                               in allowed.items()} for allowed in restrictions])
    candidates, alternatives = [], []
    for style, allowed, layouts, plan in zip(styles, restrictions, fixed, greedy):
        candidates.append(plan)
        if style is not None and propagation is not None:
            propagated = ilp.greedy_assignment(propagation[0], _preset_options(
                graph, propagation[1], layouts,
                {propagated_position[v]: options for v, options in allowed.items()},
                model.mesh_shape, pairs, factors), improve=False)
            candidates.append(_shared(graph, grouping, request, propagation, propagated))
            alternatives.append(_priced(graph, grouping, request, candidates[-1],
                                        type(style).__name__, uses, matrices, model))
    return StartingPlans(ilp.best_assignment(request, candidates), tuple(alternatives),
                         tuple(tuple(int(c) for c in candidate) for candidate in candidates))


def _priced(graph: ShardingGraph, grouping: Grouping, request: ilp.IntraOpRequest,
            choices: Sequence[int], name: str, uses: Sequence[Use],
            matrices: Sequence[np.ndarray], model: MeshCostModel) -> Alternative:
    """The preset plan of ``choices`` (one per ILP node) priced part by part, as
    ``PlanCost``; a resharding that several readers of a value share counted once, as
    :func:`~autoshard.intra.plan_record.plan_record` counts it (``repeated_reshardings`` of
    ``uses``), and the indices an ``argmax`` reshards with its values
    (``index_reshardings``) counted too."""
    compute = communication = fed = 0.0
    per_node = grouping.expand(choices)
    for node, c in zip(graph.nodes, per_node):
        strategy = node.strategies[c]
        compute += strategy.compute_s  # (an input's: copied into an output, if returned)
        if node.kind == "op":
            communication += strategy.communication_s
        else:
            fed += strategy.communication_s
    priced = ilp.evaluate(request, choices)
    chosen = [n.strategies[c] for n, c in zip(graph.nodes, per_node)]
    repeated = sum(float(matrices[k][per_node[uses[k].src], per_node[uses[k].dst]])
                   for k in repeated_reshardings(graph, uses, chosen)
                   if grouping.root[uses[k].src] != grouping.root[uses[k].dst])
    indices = sum(model.resharding(shape, itemsize, made, read)
                  for _, shape, itemsize, made, read in index_reshardings(graph, chosen))
    return Alternative(name, float(compute), float(communication + priced.shared_cost),
                       float(priced.edge_cost) - repeated + indices, float(fed))


def repeated_reshardings(graph: ShardingGraph, uses: Sequence[Use], chosen,
                         per_broadcast: bool = False) -> set[int]:
    """Indices of the ``uses`` whose resharding (``chosen``: a strategy per graph node)
    repeats an earlier use's: the same value, from the same layout to the same one. XLA's
    CSE runs such a resharding once for all its readers; a search without read nodes (a
    3-axis mesh's) prices it per reader. Loop-carried uses are never repeats. With
    ``per_broadcast`` (a preset's program: XLA's propagation places every resharding),
    neither is the read of an elementwise op that broadcasts the value (a bias, a norm's
    scale): jax broadcasts it for each such reader, and each broadcast's operand is
    resharded on its own (measured: a Wide-ResNet block's ZeRO-3 program gathers a norm's
    scale twice, for its forward and backward products)."""
    program = graph.traced.program
    seen, repeated = set(), set()
    for k, use in enumerate(uses):
        if use.operand < 0:
            continue
        src = chosen[use.src].out_specs[use.src_output]
        dst = chosen[use.dst].in_specs[use.operand]
        if src == dst:
            continue
        vid = graph.nodes[use.src].outputs[use.src_output]
        if per_broadcast and graph.nodes[use.dst].kind == "op" and \
                broadcast_operand(program, program.eqns[graph.nodes[use.dst].eqn], vid):
            continue
        key = (vid, src, dst)
        if key in seen:
            repeated.add(k)
        seen.add(key)
    return repeated


def index_reshardings(graph: ShardingGraph, chosen) -> list[tuple[int, tuple, int, Spec, Spec]]:
    """(node, shape, index itemsize, made layout, read layout) of each ``argmax`` or
    ``argmin`` (``chosen``: a strategy per graph node) that reads its operand in another
    layout than the operand is made in, in a preset's program (XLA's propagation places
    every resharding). jax lowers it as one reduce of the values and of an iota of their
    indices: the propagation gives the iota the values' layout, and the partitioner
    reshards it as it reshards them (measured: the MoE's Megatron program all-gathers the
    top-1 expert's indices beside the gate's probabilities)."""
    program = graph.traced.program
    found = []
    for n, node in enumerate(graph.nodes):
        eqn = program.eqns[node.eqn] if node.kind == "op" else None
        if eqn is None or eqn.primitive.name not in INDEXED_REDUCTIONS:
            continue
        src, k = graph.producer[eqn.inputs[0]]
        made, read = chosen[src].out_specs[k], chosen[n].in_specs[0]
        if made != read:
            found.append((n, tuple(program.avals[eqn.inputs[0]].shape),
                          np.dtype(eqn.params["index_dtype"]).itemsize, made, read))
    return found


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
                msg += (f" (a lax.scan is unrolled and sharded when it has at most "
                        f"autoshard.ir.trace.MAX_UNROLLED_STEPS = {_trace.MAX_UNROLLED_STEPS} "
                        f"steps adding up to at most autoshard.ir.trace.MAX_UNROLLED_EQUATIONS = "
                        f"{_trace.MAX_UNROLLED_EQUATIONS} equations; this one has more)")
            messages.append(msg)
            warnings.warn(msg, stacklevel=user_stacklevel())
    for spec, where in graph.unmet_constraints:
        msg = (f"autoshard: the sharding constraint {spec} at {where} matches no layout "
               "the mesh can hold (a dim's axes named out of mesh order, or a dim they do "
               "not divide); the plan leaves that value free, and the resharding XLA makes "
               "for the constraint is not priced")
        messages.append(msg)
        warnings.warn(msg, stacklevel=user_stacklevel())
    return tuple(messages)
