"""Planning runs Python's cyclic garbage collector rarely (``planning_gc.rare_cycle_collection``) and
leaves its thresholds as it found them."""
import gc

import jax.numpy as jnp
import pytest

import autoshard
from autoshard import api, planning_gc
from examples.models import mlp


@pytest.fixture
def thresholds_seen_by_the_planner(monkeypatch):
    seen = []
    real = api.plan_traced

    def plan_traced(*args, **kwargs):
        seen.append(gc.get_threshold())
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "plan_traced", plan_traced)
    return seen


@pytest.mark.parametrize("first", [700, 200_000])
def test_planning_collects_cycles_rarely_and_restores_the_thresholds(
        thresholds_seen_by_the_planner, first):
    workload = mlp(num_layers=2, batch=8, hidden=16, abstract=True)
    mesh = autoshard.abstract_mesh((2,), ("data",))
    before = gc.get_threshold()
    gc.set_threshold(first, *before[1:])
    try:
        autoshard.parallelize(workload.fn, mesh=mesh).plan(*workload.args)
        assert gc.get_threshold() == (first, *before[1:]) and gc.isenabled()
    finally:
        gc.set_threshold(*before)
    # a user's own larger thresholds are kept
    older = tuple(max(t, planning_gc.PLANNING_GC_OLDER_PASSES) for t in before[1:])
    assert thresholds_seen_by_the_planner == [(max(first, planning_gc.PLANNING_GC_ALLOCATIONS),
                                               *older)]


def test_the_thresholds_come_back_after_planning_fails(thresholds_seen_by_the_planner):
    mesh = autoshard.abstract_mesh((2,), ("data",))
    before = gc.get_threshold()

    def step(x):
        return jnp.sum(x @ x)

    with pytest.raises(autoshard.InfeasiblePlanError):
        autoshard.parallelize(step, mesh=mesh, memory_budget=1).plan(jnp.ones((64, 64)))
    assert thresholds_seen_by_the_planner[0][0] == max(before[0], planning_gc.PLANNING_GC_ALLOCATIONS)
    assert gc.get_threshold() == before
