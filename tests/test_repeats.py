"""Deep models: repeated layers tied in the ILP keep the plan's cost, and planning logs progress."""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import pytest

import autoshard
from examples.models import gpt
from tests.recurrences import rnn_train_step


@pytest.mark.parametrize("layers", [3, 4])
def test_tied_plan_costs_what_the_untied_optimum_costs(layers):
    # On a 1-D mesh the untied ILP is solved to optimality in seconds, so it is the
    # reference: tying the repeated layers must stay within 1% of it.
    workload = gpt(num_layers=layers, d_model=32, heads=4, seq=8, abstract=True)
    mesh = autoshard.abstract_mesh((4,), ("model",))

    def plan(tie):
        method = autoshard.ShardParallel(tie_repeats=tie)
        return autoshard.parallelize(workload.fn, mesh=mesh, method=method).plan(*workload.args)

    exact, tied = plan(False), plan(True)
    assert exact.solver.status == "OPTIMAL" and exact.solver.tied_classes == 0
    assert 0 < tied.solver.tied_classes < tied.solver.num_nodes
    assert tied.cost.total_s <= exact.cost.total_s * 1.01


def test_planning_logs_its_phases(caplog):
    workload = gpt(num_layers=1, d_model=32, heads=4, seq=8, abstract=True)
    mesh = autoshard.abstract_mesh((2,), ("model",))
    with caplog.at_level(logging.INFO, logger="autoshard"):
        autoshard.parallelize(workload.fn, mesh=mesh).plan(*workload.args)
    text = caplog.text
    for phase in ("equations", "ILP nodes after following", "starting plan", "solved: OPTIMAL"):
        assert phase in text


def _repeat_class_count(fn, args) -> int:
    """Repeat classes of ``fn``'s ShardParallel request on a 2x4 h100-80gb mesh."""
    from autoshard import ilp
    from autoshard.cost_model import MeshCostModel, cluster_preset
    from autoshard.intra.problem import build_problem
    from autoshard.ir.trace import trace

    traced = trace(fn, args)
    model = MeshCostModel(cluster_preset("h100-80gb"), (2, 4))
    problem = build_problem(traced, model, autoshard.ShardParallel(),
                            batch_flat=(False,) * len(traced.in_paths),
                            axis_names=("data", "model"))
    return ilp._repeat_classes.repeat_classes(problem.request).num_classes


def test_repeat_classes_do_not_grow_with_depth():
    # Identical blocks tie into the same classes however many there are, so that the
    # tied problem (and its solve time) stays flat in depth. XLA duplicates a block's
    # residual add (and the bias broadcast read there) into more fusions the more blocks
    # follow it, so the same op costs more in an early block; compared exactly, those
    # costs kept every block's bias, its moments and their neighbours apart: 5 or 6 more
    # classes per block (70B-shaped GPT on 8x8x8: 556 classes at 40 layers, 796 at 80).
    def classes(layers):
        w = gpt(num_layers=layers, d_model=64, heads=4, seq=16, batch=8, vocab=128,
                abstract=True)
        return _repeat_class_count(w.fn, w.args)

    assert classes(4) == classes(8)


def _branchy_mlp(layers: int):
    """A train step whose layers all differ (widths 32, 40, ...), each the sum of three
    alike branches ``tanh(h @ w)``: many ILP nodes, few of them repeats."""
    widths = [32 + 8 * i for i in range(layers + 1)]
    params = [[jax.ShapeDtypeStruct((a, b), jnp.float32)] * 3 for a, b in zip(widths, widths[1:])]
    x = jax.ShapeDtypeStruct((64, widths[0]), jnp.float32)

    def loss(params, x):
        for branches in params:
            x = sum(jnp.tanh(x @ w) for w in branches)
        return jnp.mean(x ** 2)

    def step(params, x):
        value, grads = jax.value_and_grad(loss)(params, x)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value

    return step, (params, x)


def test_many_nodes_that_tying_barely_shrinks_are_solved_whole():
    # 22 layers, all different: over 600 ILP nodes, but tying finds only the alike
    # branches within a layer (members alternate between two classes, so one branch in
    # three joins another): about 0.9 of the nodes stay classes. By default that problem
    # is solved whole (TIE_REPEATS_SHRINK); a 4-layer GPT (834 nodes, 385 classes) is tied.
    from autoshard.intra.problem import TIE_REPEATS_ABOVE, TIE_REPEATS_SHRINK

    mesh = autoshard.abstract_mesh((2, 4), ("data", "model"))

    def plan(fn, args, tie):
        method = autoshard.ShardParallel(tie_repeats=tie)
        return autoshard.parallelize(fn, mesh=mesh, method=method).plan(*args)

    step, args = _branchy_mlp(22)
    default, tied = plan(step, args, None), plan(step, args, True)
    assert default.solver.num_nodes > TIE_REPEATS_ABOVE
    assert default.solver.tied_classes == 0 and default.solver.status == "OPTIMAL"
    assert TIE_REPEATS_SHRINK * tied.solver.num_nodes < tied.solver.tied_classes \
        < tied.solver.num_nodes
    workload = gpt(num_layers=4, d_model=32, heads=4, seq=8, abstract=True)
    deep = plan(workload.fn, workload.args, None)
    assert deep.solver.num_nodes > TIE_REPEATS_ABOVE
    assert 0 < deep.solver.tied_classes <= TIE_REPEATS_SHRINK * deep.solver.num_nodes


def test_scan_steps_tie_into_classes_that_do_not_grow_with_length():
    # An unrolled lax.scan slices each step's row of the stacked inputs (and its backward
    # each step's residuals) at its own start: told apart by where they start, those
    # slices made a class per step (a 100-step RNN: 671 classes of 1919 nodes, and an LP
    # that ran for minutes). Slices of equal extent play the same role in every step.
    def classes(length):
        w = {"h": jax.ShapeDtypeStruct((32, 32), jnp.float32),
             "x": jax.ShapeDtypeStruct((16, 32), jnp.float32)}
        xs = jax.ShapeDtypeStruct((length, 8, 16), jnp.float32)
        return _repeat_class_count(rnn_train_step, (w, xs))

    assert classes(12) == classes(24)
