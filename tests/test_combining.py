"""Merged all-reduces: XLA runs independent all-reduces as one collective, and the plan
pays their latency once (``autoshard.intra.combining``)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoshard
from autoshard.cost_model import MeshCostModel, cluster_preset
from autoshard.intra.combining import terminal_nodes
from autoshard.intra.graph import build_graph
from autoshard.ir.hlo import collective_stats, parse_collectives
from autoshard.ir.trace import trace
from examples.models import mlp

MERGED = "merged all-reduce"


@pytest.fixture(scope="module")
def workload():
    return mlp(num_layers=4, batch=64, hidden=32)


def test_gradient_all_reduces_are_terminal_and_activation_ones_are_not(workload):
    traced = trace(workload.fn, workload.args, ())
    graph = build_graph(traced, MeshCostModel(cluster_preset("host-cpu"), (8,)))
    terminal = terminal_nodes(graph)
    program = traced.program
    dots = [v for v, node in enumerate(graph.nodes)
            if node.kind == "op" and program.eqns[node.eqn].primitive.name == "dot_general"]
    # forward: one dot per layer, each feeding the rest of the network
    assert not any(terminal[v] for v in dots[:4])
    # the last weight gradient feeds only its SGD update, which feeds only an output
    assert terminal[dots[-1]]


@pytest.mark.parametrize("per_operand", [False, True], ids=["merged", "per-array"])
def test_data_parallel_step_pays_the_latency_of_the_one_all_reduce_xla_runs(workload,
                                                                             per_operand):
    # XLA merges every gradient's all-reduce into one; a GPU runs it as one collective (one
    # latency), XLA's CPU collectives array by array (Cluster.all_reduce_per_operand, as
    # autoshard.calibrate measures it on a CPU: each gradient keeps its whole latency)
    cluster = dataclasses.replace(cluster_preset("host-cpu"), all_reduce_per_operand=per_operand)
    mesh = autoshard.make_mesh((8,), ("data",))
    step = autoshard.parallelize(workload.fn, mesh=mesh, method=autoshard.DataParallel(),
                                 cluster=cluster)
    plan = step.plan(*workload.args)
    merged = [c for c in plan.collectives if c.op.startswith(MERGED)]
    gradients = [c for c in plan.collectives if c.kind == "all-reduce" and c not in merged]
    assert len(gradients) >= 8  # 4 weights + 4 biases
    (combined,) = [c for c in parse_collectives(step.lower(*workload.args).compile().as_text())
                   if c.kind == "all-reduce"]  # XLA merged every gradient's all-reduce
    assert combined.operands == len(gradients)
    # the ILP's objective counts the latencies exactly as the plan's cost does
    searched = autoshard.parallelize(workload.fn, mesh=mesh, cluster=cluster).plan(
        *workload.args)
    assert searched.solver.objective_s == pytest.approx(searched.cost.total_s, rel=1e-9)
    latency = MeshCostModel(cluster, (8,)).all_reduce_latency((0,))
    if cluster.all_reduce_per_operand:
        assert not merged and all(c.seconds >= latency for c in gradients)
    else:  # each kept only its bandwidth and a byte share of the latency
        assert len(merged) == 1 and merged[0].seconds == pytest.approx(latency)
        assert all(c.seconds < latency for c in gradients)
    out, ref = step(*workload.args), jax.jit(workload.fn)(*workload.args)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("second,merges", [(jnp.sum, True), (jnp.max, False)])
def test_independent_all_reduces_inside_the_step_share_one_latency(second, merges):
    # x split on the reduced dim: its sum and a second reduction of tanh(x) are partial
    # results of independent all-reduces (equal communication depth); XLA runs two sums as
    # one all-reduce, a sum and a max as two (another reduction operation); the product of
    # the two needs both, so it comes after
    from autoshard.intra.combining import combine_all_reduces, communication_depth
    from autoshard.intra.planner import plan_traced

    def f(x):
        return jnp.sum(jnp.sum(x, axis=1) * second(jnp.tanh(x), axis=1))

    x = jax.ShapeDtypeStruct((64, 512), jnp.float32)
    cluster = cluster_preset("h100-80gb")
    traced = trace(f, (x,), ())
    graph = build_graph(traced, MeshCostModel(cluster, (8,)))
    depth = communication_depth(graph)
    reductions = [v for v, n in enumerate(graph.nodes) if n.name.startswith("reduce_")][:2]
    assert depth[reductions[0]] == depth[reductions[1]]
    _, merged = combine_all_reduces(graph, MeshCostModel(cluster, (8,)))
    together = [g for g in merged if {v for v, _ in g.members} >= set(reductions)]
    assert bool(together) == merges and not any(g.terminal for g in together)
    # what the compiled program runs
    plan = plan_traced(traced, mesh_shape=(8,), axis_names=("data",), cluster=cluster,
                       method=autoshard.ShardParallel(), batch_flat=[False], static_repr="()",
                       in_layouts={0: jax.sharding.PartitionSpec(None, "data")})
    step = autoshard.parallelize(f, mesh=autoshard.make_mesh((8,), ("data",)), plan=plan,
                                 cluster=cluster)
    stats = collective_stats(step.lower(np.zeros((64, 512), np.float32)).compile().as_text())
    paid = [c for c in plan.collectives if c.op.startswith(MERGED)]
    assert stats["all-reduce"]["count"] == len(paid)  # one latency per all-reduce run


def test_a_scanned_steps_all_reduces_merge_with_each_other_every_step():
    # layers scanned over stacked weights, trained data-parallel (params donated, the
    # learning rate a keyword argument): XLA merges each step's weight and bias gradient
    # all-reduces into one inside the loop's body, run every step
    # (never merged with those outside the loop); the plan pays one latency per step for
    # them (before: each gradient's whole latency every step, 2x the DP step's
    # communication on a 4-layer GPT's scan under h100-80gb)
    layers, hidden = 4, 32
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(keys[0], (layers, hidden, hidden)) / hidden ** 0.5,
              "b": jnp.zeros((layers, hidden)),
              "head": jax.random.normal(keys[1], (hidden, 4)) / hidden ** 0.5}
    x = jax.random.normal(keys[2], (64, hidden))

    def step(params, x, lr=0.1):
        def loss(params):
            def layer(h, p):
                return jnp.tanh(h @ p["w"] + p["b"]), None
            h, _ = jax.lax.scan(layer, x, {"w": params["w"], "b": params["b"]})
            return jnp.mean((h @ params["head"]) ** 2)
        grads = jax.grad(loss)(params)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads)

    cluster = cluster_preset("h100-80gb")
    mesh = autoshard.make_mesh((8,), ("data",))
    parallel = autoshard.parallelize(step, mesh=mesh, method=autoshard.DataParallel(),
                                     cluster=cluster, batch_argnums=1, donate_argnums=0)
    plan = parallel.plan(params, x, lr=0.05)
    latency = MeshCostModel(cluster, (8,)).all_reduce_latency((0,))
    merged = sorted((c.seconds, c.op) for c in plan.collectives if c.op.startswith(MERGED))
    assert [seconds for seconds, _ in merged] == [pytest.approx(latency),  # after the loop
                                                   pytest.approx(layers * latency)]  # in it
    assert merged[1][1].endswith(f"in a loop's body ({layers} runs)")
    text = parallel.lower(params, x, lr=0.05).compile().as_text()
    assert "while" in text and len([c for c in parse_collectives(text)
                                    if c.kind == "all-reduce"]) == 2
    expected = jax.jit(step)(params, x, lr=0.05)
    got = parallel(jax.tree.map(jnp.copy, params), x, lr=0.05)  # (params donated)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
