"""Tests of autoshard.ilp._neighbourhood: very large requests solved one label move at a
time, on hand-solved graphs (the size threshold lowered so that they qualify)."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from autoshard.ilp import (
    EdgeCost,
    IntraOpRequest,
    _clock,
    _lagrangian,
    _neighbourhood,
    evaluate,
    solve_intra_op,
    solved_in_neighbourhoods,
)
from autoshard.ilp._clock import Deadline
from autoshard.ilp._evaluate import point_memory
from autoshard.ilp._lagrangian import priced_memory, starts_that_fit
from autoshard.ilp._repeat_classes import repeat_classes
from autoshard.ilp._repeats import tied_request

# Three nodes in a chain, each with the 9 strategies (a0, a1), a0, a1 in {0, 1, 2}:
# "mesh axis k splits dim a_k". Labels: (a0, a1). A node costs (2 - a0) + (2 - a1) s;
# an edge costs 5 s per label its two ends disagree on. Optimum: every node (2, 2), 0 s.
# From the hint (0, 0) everywhere (12 s), one round may change one label per node; all
# nodes moving together is cheapest: (2, 0) or (0, 2) everywhere, 6 s. The second round
# reaches (2, 2), 0 s; the third finds nothing better and stops.
PAIRS = list(itertools.product(range(3), repeat=2))
LABELS = np.array(PAIRS)
COSTS = np.array([(2 - a0) + (2 - a1) for a0, a1 in PAIRS], dtype=float)
DISAGREE = np.array([[5.0 * int(np.sum(np.array(p) != np.array(q))) for q in PAIRS]
                     for p in PAIRS])
START = PAIRS.index((0, 0))
BEST = PAIRS.index((2, 2))


def _chain(n=3, **kwargs):
    kwargs.setdefault("strategy_labels", tuple(LABELS for _ in range(n)))
    return IntraOpRequest(node_costs=tuple(COSTS for _ in range(n)),
                          edges=tuple(EdgeCost(v, v + 1, DISAGREE) for v in range(n - 1)),
                          hint=(START,) * n, **kwargs)


@pytest.fixture
def small_is_large(monkeypatch):
    monkeypatch.setattr(_neighbourhood, "LARGE_PROBLEM_CELLS", 0)


def test_rounds_move_one_label_at_a_time_to_the_optimum(small_is_large):
    request = _chain()
    result = solve_intra_op(request)
    assert result.choices == (BEST,) * 3 and result.objective == 0.0
    assert result.stats.neighbourhood_rounds == 3 and result.status == "FEASIBLE"
    assert evaluate(request, result.choices).objective == result.objective
    assert result.lower_bound <= result.objective


def test_one_round_changes_at_most_one_label_per_node(small_is_large, monkeypatch):
    monkeypatch.setattr(_neighbourhood, "MAX_ROUNDS", 1)
    result = solve_intra_op(_chain())
    assert result.objective == 6.0 and result.stats.neighbourhood_rounds == 1
    moved = {PAIRS[c] for c in result.choices}
    assert moved in ({(2, 0)}, {(0, 2)})


def test_small_requests_are_solved_whole():
    result = solve_intra_op(_chain())
    assert result.stats.neighbourhood_rounds == 0 and result.status == "OPTIMAL"
    assert result.choices == (BEST,) * 3
    assert not solved_in_neighbourhoods(_chain())


def test_solved_in_neighbourhoods_says_what_solve_does(small_is_large):
    assert solved_in_neighbourhoods(_chain())
    assert not solved_in_neighbourhoods(_chain(strategy_labels=None))  # unlabelled: whole
    # search=False does not stop the rounds' own searches: the same optimum
    result = solve_intra_op(dataclasses.replace(_chain(), search=False))
    assert result.choices == (BEST,) * 3 and result.stats.neighbourhood_rounds == 3


def test_neighbourhoods_respect_a_memory_budget(small_is_large):
    # Strategy (a0, a1) holds 10 * (1 + a0 + a1) bytes; the three nodes live together;
    # budget 120 B: (2, 2) everywhere (150 B) does not fit, (2, 1)/(1, 2) everywhere
    # (120 B, 1 s per node) does: optimum 3 s.
    memory = np.array([10.0 * (1 + a0 + a1) for a0, a1 in PAIRS])
    request = _chain(memory_terms=(tuple((v, memory) for v in range(3)),), memory_budget=120.0)
    result = solve_intra_op(request)
    assert evaluate(request, result.choices).ok and result.objective == 3.0


def test_a_starting_plan_over_the_budget_is_left_in_the_first_round(small_is_large):
    # Strategy (a0, a1) holds 10 * (5 - a0 - a1) bytes: the hint (0, 0) everywhere needs
    # 150 B, over the 120 B budget. The first round finds a plan that fits within one
    # label move ((2, 0) or (0, 2): 90 B, 6 s), the second reaches (2, 2) (30 B, 0 s).
    memory = np.array([10.0 * (5 - a0 - a1) for a0, a1 in PAIRS])
    request = _chain(memory_terms=(tuple((v, memory) for v in range(3)),), memory_budget=120.0)
    assert not evaluate(request, request.hint).ok
    result = solve_intra_op(request)
    assert result.choices == (BEST,) * 3 and result.objective == 0.0
    assert result.stats.neighbourhood_rounds == 3


@pytest.mark.parametrize("labels, fragment", [
    ((LABELS, LABELS), "strategy_labels has 2 entries, expected 3"),
    ((LABELS, LABELS[:4], LABELS), "has 4 rows, expected 9"),
    ((LABELS, LABELS.astype(float), LABELS), "expected a 2-d integer array"),
])
def test_bad_labels_name_the_node(labels, fragment):
    with pytest.raises(ValueError, match=fragment):
        _chain(strategy_labels=labels)


def test_tied_requests_keep_labels_and_memory_terms():
    # A tied assignment's memory is priced exactly: per-node and pair terms map to classes.
    rng = np.random.default_rng(0)
    memory = rng.uniform(0, 100, size=9)
    copy = rng.uniform(0, 50, size=(9, 9))
    request = _chain(12, memory_terms=(tuple((v, memory) for v in range(12))
                                       + tuple((v, v + 1, copy) for v in range(11)),),
                     memory_budget=1500.0, tie_repeats=True)
    classes = repeat_classes(request)
    tied = tied_request(request, classes)
    assert classes.num_classes < 12 and tied.strategy_labels is not None
    for _ in range(20):
        pick = [int(rng.integers(9)) for _ in range(classes.num_classes)]
        full = evaluate(request, classes.expand(pick))
        assert evaluate(tied, pick).ok == full.ok
        assert evaluate(tied, pick).objective == pytest.approx(full.objective)


# ------------------------------------------------------- memory priced: starts from a guide

# A ridge. Three nodes, labels (a0, a1) as above, the same 5 s per disagreeing label on
# each edge; one memory point holds all three, budget 9 bytes. Costs and bytes per node:
# (0, 0) 10 s, 0 B (the hint: fits, dear); (x, 0) and (0, y), x, y > 0: 11 s, 3 B;
# (2, 1): 2 s, 3 B; (2, 2): 1.9 s, 10 B (the optimum without the budget: 30 B, over);
# the rest 5 s, 3 B. Under the budget the optimum is (2, 1) everywhere: 6 s at 9 B.
# From the hint every one-label move costs more (11 s), so rounds stop at 30 s. Priced
# at rate r per byte from the guide (2, 2), (2, 1) wins once 2 + 3r < 1.9 + 10r (r >
# 0.0143 s/B); the first probe prices 2^-4 of (guide's 5.7 s / 9 B): 0.0396 s/B.
RIDGE_COSTS = np.array([10.0 if p == (0, 0) else 11.0 if 0 in p else 2.0 if p == (2, 1)
                        else 1.9 if p == (2, 2) else 5.0 for p in PAIRS])
RIDGE_BYTES = np.array([0.0 if p == (0, 0) else 10.0 if p == (2, 2) else 3.0 for p in PAIRS])


def _ridge(**kwargs):
    request = _chain(memory_terms=(tuple((v, RIDGE_BYTES) for v in range(3)),),
                     memory_budget=9.0, **kwargs)
    return dataclasses.replace(request, node_costs=(RIDGE_COSTS,) * 3)


def test_a_guide_over_the_budget_leads_the_rounds_across_a_ridge(small_is_large):
    stuck = solve_intra_op(_ridge())
    assert stuck.objective == 30.0 and stuck.choices == (START,) * 3
    crossed = solve_intra_op(_ridge(guide=(BEST,) * 3))
    assert crossed.choices == (PAIRS.index((2, 1)),) * 3 and crossed.objective == 6.0
    assert evaluate(_ridge(), crossed.choices).ok


def test_memory_priced_is_the_budgetless_cost_plus_rate_times_each_points_bytes():
    rng = np.random.default_rng(0)
    copy = rng.uniform(0, 4, size=(9, 9))
    request = _chain(memory_terms=(((0, RIDGE_BYTES), (1, RIDGE_BYTES)),
                                  ((1, RIDGE_BYTES), (1, 2, copy))), memory_budget=5.0)
    budgetless = dataclasses.replace(request, memory_terms=(), memory_budget=None)
    rates = (0.5, 2.0)
    priced = priced_memory(request, rates)
    assert priced.memory_budget is None and not priced.memory_terms
    for _ in range(10):
        pick = tuple(int(c) for c in rng.integers(9, size=3))
        used = point_memory(request, pick)
        assert evaluate(priced, pick).objective == pytest.approx(
            evaluate(budgetless, pick).objective + sum(r * u for r, u in zip(rates, used)))


@pytest.mark.parametrize("seconds_left, probes", [(None, 3), (7.0, 3), (5.0, 2)])
def test_probes_after_the_first_two_run_while_four_times_the_longest_is_left(
        monkeypatch, seconds_left, probes):
    # each probe takes 1 s on a fake clock and returns the guide (over the budget), so the
    # exponent is raised each time: -4, -2, -1. Two probes leave seconds_left - 2: the
    # third runs when that is at least 4 x 1 s
    now = [0.0]
    monkeypatch.setattr(_lagrangian.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(_clock.time, "perf_counter", lambda: now[0])
    request, guide = _ridge(), (BEST,) * 3
    unit = evaluate(request, guide).objective / request.memory_budget
    rates, limits = [], []

    def solve(priced):
        now[0] += 1.0
        rates.append(evaluate(priced, guide).objective - evaluate(request, guide).objective)
        limits.append(priced.wall_time_limit_s)
        return dataclasses.replace(solve_intra_op(priced), choices=guide)

    starts_that_fit(request, guide, solve, Deadline.of(seconds_left, 10.0))
    used = sum(point_memory(request, guide))  # its one point is over: charged
    assert [r / (unit * used) for r in rates] == pytest.approx([2.0 ** k for k in
                                                               (-4, -2, -1)][:probes])
    if seconds_left is not None:  # the first two share 3/4 of the time; none runs past it
        assert limits[:2] == pytest.approx([seconds_left * 0.75 / 2] * 2)
        assert all(limit <= seconds_left - i for i, limit in enumerate(limits))


def test_starts_that_fit_fit_and_a_guide_that_fits_needs_none():
    request = _ridge()
    starts = starts_that_fit(request, (BEST,) * 3, solve_intra_op, Deadline.of(None, 10.0))
    assert starts and all(evaluate(request, s).ok for s in starts)
    assert min(evaluate(request, s).objective for s in starts) == 6.0
    fitting = (PAIRS.index((2, 1)),) * 3
    assert starts_that_fit(request, fitting, solve_intra_op, Deadline.of(None, 10.0)) == []
