"""Deep models: repeated layers tied in the ILP keep the plan's cost, and planning logs progress."""
from __future__ import annotations

import logging

import pytest

import autoshard
from examples.models import gpt


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
