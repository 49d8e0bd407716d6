"""Read nodes: a value read by several ops is resharded into one layout once, as XLA's
common-subexpression pass runs one collective for all of them."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoshard
from autoshard import ilp
from autoshard.api import _sharded as sharded_program
from autoshard.cost_model import MeshCostModel, cluster_preset
from autoshard.intra.following import follows_operand, group_followers, grouped_request
from autoshard.intra.graph import build_graph, use_cost_matrix
from autoshard.intra.memory_points import planned_peak_bytes
from autoshard.intra.plan_record import plan_record
from autoshard.intra.problem import build_problem
from autoshard.intra.shared_reads import READ, prefer_made_layouts, settle_reads, share_reads
from autoshard.ir import hlo
from autoshard.ir.trace import trace
from autoshard.plan.parts import operand_layouts
from examples.models import gpt


def _two_readers(x, w1, w2):
    h = jnp.tanh(x)              # an elementwise reader: follows x's layout, reads it directly
    return (h @ w1).sum() + (x @ w2).sum() + (x @ w1).sum()


def _graph(mesh_shape=(8,)):
    s = jax.ShapeDtypeStruct
    traced = trace(_two_readers, (s((64, 256), jnp.float32), s((256, 128), jnp.float32),
                                  s((256, 128), jnp.float32)))
    model = MeshCostModel(cluster_preset("host-cpu"), mesh_shape)
    return traced, model, build_graph(traced, model)


def test_values_read_by_two_ops_get_one_read_node():
    traced, model, graph = _graph()
    shared = share_reads(graph)
    reads = [v for v, node in enumerate(shared.nodes) if node.kind == READ]
    program = traced.program
    x, w1 = program.invars[0], program.invars[1]
    # x: read by two dots (tanh follows it and reads it directly); w1: by two dots;
    # w2 by one dot: no read node
    assert sorted(shared.nodes[v].outputs[0] for v in reads) == sorted([x, w1])
    for v in reads:
        into = [u for u in shared.uses if u.dst == v]
        out = [u for u in shared.uses if u.src == v]
        assert len(into) == 1 and shared.nodes[into[0].src].outputs[0] == shared.nodes[v].outputs[0]
        assert len(out) == 2 and all(shared.nodes[u.dst].name.startswith("dot") for u in out)
        assert v == into[0].src + 1   # right after its producer: program order kept
    tanh = next(v for v, n in enumerate(shared.nodes) if n.name.startswith("tanh"))
    assert [shared.nodes[u.src].kind for u in shared.uses if u.dst == tanh] == ["input"]
    assert len(shared.uses) == len(graph.uses) + len(reads)


@pytest.mark.parametrize("fn, mesh_shape, per_use", [
    (_two_readers, (2, 4), True),           # read nodes: the per-use problem on demand
    (_two_readers, (2, 2, 2), False),       # 3 axes: priced per use, nothing else to solve
    (lambda x, w1, w2: (x @ w1).sum() + jnp.tanh(w2).sum(), (2, 4), False),  # nothing shared
])
def test_the_per_use_problem_exists_only_beside_read_nodes(fn, mesh_shape, per_use):
    s = jax.ShapeDtypeStruct
    traced = trace(fn, (s((64, 256), jnp.float32), s((256, 128), jnp.float32),
                        s((256, 128), jnp.float32)))
    model = MeshCostModel(cluster_preset("host-cpu"), mesh_shape)
    problem = build_problem(traced, model, autoshard.ShardParallel(), batch_flat=(True, False, False),
                            axis_names=("data", "fsdp", "model")[-len(mesh_shape):])
    reads = [node for node in problem.graph.nodes if node.kind == READ]
    assert bool(reads) == per_use
    # (a 3-axis problem with a per-use twin was solved twice: 1.45x the planning time)
    assert (problem.per_use is not None) == per_use


def test_shared_layout_pays_one_resharding_and_settling_finds_it():
    # x made split by rows; both dots read it whole (gathered): per use that is two
    # all-gathers, through the read node one
    traced, model, graph = _graph()
    shared = share_reads(graph)
    grouping = group_followers(shared)
    matrices = [use_cost_matrix(shared, u, model) for u in shared.uses]
    request = grouped_request(shared, grouping, shared.uses, matrices, 10.0)
    position = {r: p for p, r in enumerate(grouping.roots)}
    program = traced.program
    x_node = shared.input_node(0)
    x_read = x_node + 1
    row_split = next(i for i, s in enumerate(shared.nodes[x_node].strategies)
                     if s.out_specs[0] == ((0,), ()))
    whole = ((), ())
    choices = [0] * len(grouping.roots)
    choices[position[x_node]] = row_split
    for u in shared.uses:  # every reader of the read node reads x whole
        if u.src == x_read:
            node = shared.nodes[u.dst]
            choices[position[grouping.root[u.dst]]] = next(
                i for i, s in enumerate(node.strategies) if s.in_specs[u.operand] == whole)
    read_strategies = shared.nodes[x_read].strategies
    choices[position[x_read]] = next(i for i, s in enumerate(read_strategies)
                                     if s.out_specs[0] == ((0,), ()))   # not shared yet
    before = ilp.evaluate(request, choices)
    settled = settle_reads(shared, grouping, request, choices)
    assert read_strategies[settled[position[x_read]]].out_specs[0] == whole
    after = ilp.evaluate(request, settled)
    gather = model.resharding((64, 256), 4, ((0,), ()), whole)
    assert gather > 0
    assert before.edge_cost - after.edge_cost == pytest.approx(gather)
    # the shared gathered copy lives from the first reader to the last
    expanded = grouping.expand(settled)
    peak = planned_peak_bytes(shared, model, expanded, donated=())
    assert peak >= 64 * 256 * 4 + 64 * 256 * 4 / 8
    assert program.invars[0] == shared.nodes[x_read].outputs[0]


def _bias_gradient(x, w):
    # x read by a dot (which wants it whole) and by a sum over its first two dims (a bias
    # gradient), both through one read node
    return (x @ w).sum() + (x.sum(axis=(0, 1)) ** 2).sum()


def _sum_of_the_read(graph) -> int:
    """The node of the bias gradient's sum, which reads x through the read node."""
    read = next(v for v, n in enumerate(graph.nodes) if n.kind == READ)
    return next(u.dst for u in graph.uses if u.src == read and
                graph.nodes[u.dst].name.startswith("reduce_sum"))


def _third_layout_plan():
    """(traced, model, problem, solved result, choices) of ``_bias_gradient`` on 8 devices
    with x made split over its batch, gathered whole for the dot (through the read node),
    and read split over the sequence by the sum."""
    s = jax.ShapeDtypeStruct
    traced = trace(_bias_gradient, (s((8, 64, 256), jnp.float32), s((256, 128), jnp.float32)))
    model = MeshCostModel(cluster_preset("host-cpu"), (8,))
    problem = build_problem(traced, model, autoshard.ShardParallel(), batch_flat=(True, False),
                            axis_names=("devices",))
    graph, grouping, request = problem.graph, problem.grouping, problem.request
    position = {r: p for p, r in enumerate(grouping.roots)}
    read = next(v for v, n in enumerate(graph.nodes) if n.kind == READ)
    x_node = next(u.src for u in graph.uses if u.dst == read)
    result = ilp.solve_intra_op(request)
    choices = list(result.choices)

    def pick(node, want):
        options = [i for i, j in enumerate(grouping.index[node]) if want(graph.nodes[node].strategies[j])]
        choices[position[grouping.root[node]]] = options[0]

    pick(x_node, lambda st: st.out_specs[0] == ((0,), (), ()))
    pick(read, lambda st: st.out_specs[0] == ((), (), ()))
    pick(_sum_of_the_read(graph), lambda st: st.in_specs[0] == ((), (0,), ()) and
         st.out_specs[0] == ((),))
    return traced, model, problem, result, choices


def test_a_reader_in_a_third_layout_moves_to_the_made_one_when_it_costs_no_more():
    # x made split over its batch and gathered whole for the dot: the sum may read it
    # split over the batch (as made) or over the sequence, both a free slice of the whole
    # copy in the model (and in the compiled program, which pins the sum's operand to the
    # copy first: the next test); the layout as made keeps nothing alive longer
    traced, model, problem, result, choices = _third_layout_plan()
    graph, grouping, request = problem.graph, problem.grouping, problem.request
    total = _sum_of_the_read(graph)
    split, whole = ((0,), (), ()), ((), (), ())
    before = ilp.evaluate(request, choices).objective
    after = prefer_made_layouts(graph, grouping, request, choices)
    strategy = graph.nodes[total].strategies[grouping.expand(after)[total]]
    assert strategy.in_specs[0] in (split, whole)      # as made, or as the shared copy
    assert ilp.evaluate(request, after).objective <= before * (1 + 1e-9)
    assert prefer_made_layouts(graph, grouping, request, after) == after


def test_a_reader_in_a_third_layout_reshards_the_shared_copy():
    # the plan of the test above before its layouts are preferred: x made split over its
    # batch, gathered whole for the dot, and read split over the sequence by the sum,
    # priced as a slice of the gathered copy. The program pins the sum's operand to the
    # shared layout first, so XLA slices the copy it gathered; pinned to its own layout
    # alone, XLA reshards x as made, an all-to-all the plan did not price.
    traced, model, problem, result, choices = _third_layout_plan()
    plan = plan_record(traced, problem, choices, dataclasses.replace(result, choices=tuple(choices)),
                       method=autoshard.ShardParallel(), model=model, cluster=model.cluster,
                       axis_names=("devices",), static_repr="", donated=(), start=0.0)
    reads, through = operand_layouts(plan.operand_specs)
    assert list(through.values()) == [(jax.sharding.PartitionSpec(),)]   # the gathered copy
    mesh = autoshard.make_mesh((8,), ("devices",))
    program = sharded_program(traced, plan, mesh, ())
    kinds = [c.kind for c in hlo.parse_collectives(program.lower().compile().as_text())]
    assert "all-to-all" not in kinds and kinds.count("all-gather") == 1
    x = jax.random.normal(jax.random.key(0), (8, 64, 256))
    w = jax.random.normal(jax.random.key(1), (256, 128))
    np.testing.assert_allclose(program([x, w])[0], jax.jit(_bias_gradient)(x, w), rtol=1e-5)


def test_gpt_plan_shares_gathers_and_audits_clean():
    # the benchmarks' gpt_large on 8 devices: its plan all-gathers activations that the
    # forward matmul and the weight gradient both read; priced per use, the audit found
    # twice the all-gather bytes XLA compiles (one collective after its CSE)
    w = gpt(num_layers=4, d_model=256, heads=8, seq=64, batch=8, vocab=256)
    step = autoshard.parallelize(w.fn, mesh=autoshard.make_mesh((8,), ("devices",)),
                                 cluster=autoshard.cluster_preset("host-cpu"))
    plan = step.plan(*w.args)
    shared = [c for c in plan.collectives if c.resharding and c.op.endswith(" read")]
    assert any(c.kind == "all-gather" for c in shared)
    report = step.audit(*w.args)
    assert report.ok, report.summary()
    # adamw divides by sqrt(v): where a gradient is near zero, the float32 sums' order
    # (sharded or not) moves an updated weight by up to ~1e-4
    for got, want in zip(jax.tree.leaves(step(*w.args)), jax.tree.leaves(jax.jit(w.fn)(*w.args))):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_a_follower_that_cannot_read_every_made_layout_reads_through_the_read_node():
    # gathers and reduce-scatters make layouts that split one dim over two axes in reverse
    # mesh order, which elementwise ops do not take: such a follower is not grouped with
    # the producer and reshards on its own, and XLA shares that resharding with the other
    # readers' (the GPT d256 on 8x8 audited an all-gather priced for two readers, run once)
    w = gpt(num_layers=1, d_model=64, heads=4, seq=16, batch=8, vocab=64, abstract=True)
    traced = trace(w.fn, w.args)
    graph = build_graph(traced, MeshCostModel(cluster_preset("host-cpu"), (2, 4)))
    shared = share_reads(graph)
    read_of = {(u.src, u.src_output): u.dst for u in shared.uses
               if shared.nodes[u.dst].kind == READ}
    direct = [u for u in shared.uses if (u.src, u.src_output) in read_of and u.operand >= 0
              and shared.nodes[u.dst].kind == "op"]
    assert direct, "no follower reads a shared value directly: nothing checked"
    for use in direct:   # those left reading the value as made follow every layout of it
        made = {s.out_specs[use.src_output] for s in shared.nodes[use.src].strategies}
        assert made <= {s.in_specs[use.operand] for s in shared.nodes[use.dst].strategies}
    # and some followers that cannot do so read through it (the embedding sum among them)
    assert any(shared.nodes[u.src].kind == READ and
               follows_operand(traced.program, shared.nodes[u.dst], u.operand)
               for u in shared.uses if u.operand >= 0)


def test_read_nodes_keep_the_search_no_worse_than_per_use_pricing():
    traced, model, graph = _graph((2, 4))
    for g in (graph, share_reads(graph)):
        grouping = group_followers(g)
        matrices = [use_cost_matrix(g, u, model) for u in g.uses]
        request = grouped_request(g, grouping, g.uses, matrices, 10.0)
        result = ilp.solve_intra_op(request)
        assert result.status == "OPTIMAL"
        if g is graph:
            per_use = result.objective
    assert result.objective <= per_use + 1e-12
    assert np.isfinite(per_use)


@pytest.mark.parametrize("method", [autoshard.DataParallel(), autoshard.ZeRO3(), autoshard.Megatron()],
                         ids=lambda m: type(m).__name__)
def test_presets_propagate_as_before_and_then_share(method, monkeypatch):
    # a preset is priced by propagating its input layouts as XLA does, each reader
    # resharding for itself; read nodes then only share what XLA's CSE shares, so the
    # propagated plan is the per-use one, priced no dearer
    from autoshard.intra import problem as problem_module

    w = gpt(num_layers=1, d_model=64, heads=4, seq=16, batch=8, vocab=128, abstract=True)
    traced = trace(w.fn, w.args)
    model = MeshCostModel(cluster_preset("h100-80gb"), (2, 2, 2))
    batch = [False] * len(traced.program.invars)
    batch[-2:] = [True, True]   # tokens, targets

    def priced():
        problem = problem_module.build_problem(traced, model, method, batch_flat=batch,
                                               axis_names=("data", "fsdp", "model"))
        choices = problem_module.propagated_choices(problem, model.mesh_shape)
        expanded = problem.grouping.expand(choices)
        ops = {n.name: n.strategies[c].name for n, c in zip(problem.graph.nodes, expanded)
               if n.kind == "op"}
        return ilp.evaluate(problem.request, choices).objective, ops

    shared_cost, shared_ops = priced()
    monkeypatch.setattr(problem_module, "share_reads", lambda graph: graph)
    per_use_cost, per_use_ops = priced()
    assert shared_ops == per_use_ops
    assert shared_cost <= per_use_cost * (1 + 1e-12)


def test_fractional_shared_lp_falls_back_to_the_per_use_optimum(monkeypatch):
    # Where read nodes make the shared LP fractional, its rounding may be poor (seen on a
    # 4-layer GPT on 8x8: 10.4 ms against 7.6 ms per use). Simulate that: the shared solve
    # returns the starting plan as a fractional-LP warm start. The planner must then solve
    # the per-use problem and return its optimum, shared: no dearer than per use, and not
    # claimed optimal.
    from autoshard.intra import planner

    real = planner.ilp.solve_intra_op
    calls = []

    def solve(request, starting_plan=None):
        calls.append(request.search)
        result = real(request, starting_plan=starting_plan)
        if request.search:
            return result
        hint = starting_plan() if starting_plan is not None else request.hint
        stats = dataclasses.replace(result.stats, lp_integral=False, solver_status="NO_SEARCH")
        return dataclasses.replace(result, choices=hint, status="FEASIBLE", stats=stats,
                                   objective=ilp.evaluate(request, hint).objective)

    from autoshard.intra import problem as problem_module

    w = gpt(num_layers=1, d_model=64, heads=4, seq=16, batch=8, vocab=128, abstract=True)
    mesh = autoshard.abstract_mesh((2, 4), ("data", "model"))
    plan = lambda: autoshard.parallelize(w.fn, mesh=mesh).plan(*w.args)  # noqa: E731
    shared_optimum = plan().cost.total_s
    with monkeypatch.context() as patch:
        patch.setattr(problem_module, "share_reads", lambda graph: graph)
        per_use_optimum = plan().cost.total_s
    monkeypatch.setattr(planner.ilp, "solve_intra_op", solve)
    plan = plan()
    assert calls[0] is False and True in calls[1:]   # the shared LP, then the per-use solve
    assert plan.solver.status == "FEASIBLE"
    assert shared_optimum * (1 - 1e-9) <= plan.cost.total_s <= per_use_optimum * (1 + 1e-9)
