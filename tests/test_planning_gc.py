"""Planning pauses Python's cyclic garbage collector (``api.cyclic_gc_paused``) and leaves it
as it found it."""
import gc

import jax.numpy as jnp
import pytest

import autoshard
from autoshard import api
from examples.models import mlp


@pytest.fixture
def collector_state_seen_by_the_planner(monkeypatch):
    seen = []
    real = api.plan_traced

    def plan_traced(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "plan_traced", plan_traced)
    return seen


@pytest.mark.parametrize("enabled_before", [True, False])
def test_planning_pauses_the_collector_and_restores_its_state(
        collector_state_seen_by_the_planner, enabled_before):
    workload = mlp(num_layers=2, batch=8, hidden=16, abstract=True)
    mesh = autoshard.abstract_mesh((2,), ("data",))
    (gc.enable if enabled_before else gc.disable)()
    try:
        autoshard.parallelize(workload.fn, mesh=mesh).plan(*workload.args)
        assert gc.isenabled() == enabled_before
    finally:
        gc.enable()
    assert collector_state_seen_by_the_planner == [False]


def test_the_collector_runs_again_after_planning_fails(collector_state_seen_by_the_planner):
    mesh = autoshard.abstract_mesh((2,), ("data",))

    def step(x):
        return jnp.sum(x @ x)

    with pytest.raises(autoshard.InfeasiblePlanError):
        autoshard.parallelize(step, mesh=mesh, memory_budget=1).plan(jnp.ones((64, 64)))
    assert collector_state_seen_by_the_planner == [False] and gc.isenabled()
