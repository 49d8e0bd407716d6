"""CP-SAT's search in deterministic rounds (``ilp/_search_rounds.py``)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from ortools.sat.python import cp_model

from autoshard.ilp import _search_rounds
from autoshard.ilp._clock import Deadline, Progress
from autoshard.ilp._search_rounds import STALL_UNITS, hint_objective, round_units, search_in_rounds


def test_a_round_gets_what_the_rounds_before_used_and_at_least_the_stall_units():
    # with a plan to improve: max(STALL_UNITS, used), never past what is left
    assert round_units(0.0, 20.0, incumbent=True) == STALL_UNITS
    assert round_units(5.0, 20.0, incumbent=True) == 5.0
    assert round_units(15.0, 20.0, incumbent=True) == 5.0
    assert round_units(21.0, 20.0, incumbent=True) == 0.0
    # without one, another round would repeat the first one's work: all that is left
    assert round_units(0.0, 20.0, incumbent=False) == 20.0


def _subset_sum(n: int = 60):
    """Minimise Σ a_i x_i + 5 subject to Σ a_i x_i >= half the total + 7; hinted with
    every x_i = 1 (a valid plan, priced Σ a_i + 5)."""
    a = np.random.default_rng(0).integers(1000, 100000, size=n).tolist()
    model = cp_model.CpModel()
    xs = [model.new_bool_var(f"x{i}") for i in range(n)]
    model.add(sum(ai * x for ai, x in zip(a, xs)) >= sum(a) // 2 + 7)
    model.minimize(sum(ai * x for ai, x in zip(a, xs)) + 5)
    for x in xs:
        model.add_hint(x, True)
    return model, a


def _search(model, deadline=None, gap_limit=0.0):
    deadline = deadline or Deadline.of(None, 60.0)
    return search_in_rounds(model, time_limit_s=60.0, gap_limit=gap_limit, deadline=deadline,
                            hint_is_plan=True,
                            progress=lambda: Progress("search", deadline, scale=1.0))


def test_the_hints_objective_is_cp_sats():
    model, a = _subset_sum()
    assert hint_objective(model) == sum(a) + 5
    # a negated literal in the objective counts 1 - its value
    negated = cp_model.CpModel()
    x, y = negated.new_bool_var("x"), negated.new_bool_var("y")
    negated.minimize(3 * x + 4 * ~y + 2)
    negated.add_hint(x, True)
    negated.add_hint(y, False)
    assert hint_objective(negated) == 3 + 4 + 2


@pytest.mark.parametrize("stall_units", [1e-4, STALL_UNITS])
def test_each_round_starts_from_the_best_plan_and_the_search_is_reproducible(
        monkeypatch, stall_units):
    # short rounds (1e-4 units) end and restart from their best plan until one proves it
    # optimal; long ones prove it in the first. Either way every run finds the same plan
    # with the same work, with or without a wall-clock deadline (which ends nothing here)
    monkeypatch.setattr(_search_rounds, "STALL_UNITS", stall_units)
    runs = [_search(_subset_sum()[0]), _search(_subset_sum()[0]),
            _search(_subset_sum()[0], Deadline.of(600.0, 60.0))]
    model, a = _subset_sum()
    first = runs[0]
    assert first.status == cp_model.OPTIMAL and not first.stalled
    assert first.objective == first.bound < hint_objective(model)
    assert sum(ai * v for ai, v in zip(a, first.solution)) + 5 == first.objective
    assert (first.rounds > 1) == (stall_units < STALL_UNITS)
    drop = lambda r: dataclasses.replace(r, wall_time=0.0)  # noqa: E731
    assert all(drop(r) == drop(first) for r in runs[1:])


def test_a_round_that_finds_nothing_better_ends_the_search(monkeypatch):
    # rounds of next to no work (CP-SAT stops at its first check) each improve on their
    # hint a little, until one finds nothing better: the search ends there, stalled,
    # with the best plan of the rounds before it (short of the optimum a long round finds)
    optimum = _search(_subset_sum()[0])
    monkeypatch.setattr(_search_rounds, "round_units", lambda used, total, incumbent: 1e-9)
    model, a = _subset_sum()
    start = hint_objective(model)
    short = _search(model)
    assert short.status == cp_model.FEASIBLE and short.stalled and short.rounds > 1
    assert optimum.objective < short.objective < start
    assert sum(ai * v for ai, v in zip(a, short.solution)) + 5 == short.objective
    assert hint_objective(model) == short.objective   # the last round started from it
    assert dataclasses.replace(_search(_subset_sum()[0]), wall_time=0.0) == \
        dataclasses.replace(short, wall_time=0.0)
