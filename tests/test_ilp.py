"""Tests of autoshard.ilp (intra-op ILP): hand-solved graphs, brute force, determinism, validation."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from autoshard.ilp import (
    EdgeCost,
    InfeasibleError,
    IntraOpRequest,
    MoveCosts,
    SharedCost,
    best_assignment,
    evaluate,
    fit_to_budget,
    greedy_assignment,
    greedy_assignments,
    min_peak_memory,
    solve_intra_op,
)
from autoshard.ilp import _relaxation as relaxation
from autoshard.ilp._grid import edge_grid, edge_grids
from autoshard.ilp._memory import within_budget
from autoshard.ilp._reduce import reduce_request
from autoshard.ilp._relaxation import solve_relaxation
from autoshard.ilp._repeat_classes import repeat_classes
from autoshard.ilp._repeats import tied_request

INF = np.inf
GiB = 1024.0**3
SWAP = [[0.0, 10.0], [10.0, 0.0]]  # resharding between two specs: free if equal, 10 s otherwise


def _check_optimal(request, expected_choices, expected_objective):
    result = solve_intra_op(request)
    assert result.choices == tuple(expected_choices)
    assert result.objective == pytest.approx(expected_objective, rel=1e-12, abs=1e-12)
    assert result.status == "OPTIMAL" and result.gap == 0.0
    assert evaluate(request, result.choices).violations == ()
    return result


# ---------------------------------------------------------------- hand-solved graphs


def test_chain_of_3_resharding_dominates():
    # A - B - C, costs A [0, 1], B [1, 0], C [0, 1], each edge SWAP.
    # Per-node argmin (0, 1, 0) costs 0 + 2 * 10 = 20; all 0 costs 1; all 1 costs 2.
    # Optimum: (0, 0, 0), objective 1.
    request = IntraOpRequest(
        node_costs=([0.0, 1.0], [1.0, 0.0], [0.0, 1.0]),
        edges=(EdgeCost(0, 1, SWAP), EdgeCost(1, 2, SWAP)),
        node_names=("A", "B", "C"),
    )
    _check_optimal(request, (0, 0, 0), 1.0)


def test_problem_reduced_to_nothing_with_a_gap_limit_is_optimal():
    # No edges: every node takes its cheapest strategy and CP-SAT never runs; a gap
    # limit (as tied repeated layers set) must not ask the unused solver for its bound.
    request = IntraOpRequest(node_costs=([2.0, 1.0], [0.0, 3.0]), gap_limit=0.01)
    _check_optimal(request, (1, 0), 1.0)


def test_diamond_locally_cheapest_is_globally_wrong():
    # A -> B, A -> C, B -> D, C -> D; each edge costs 1 s when strategies differ.
    # A [0, 0.5], B [0, 0], C [0, 0], D [5, 0]. Locally A=0 and D=1 (then two edges
    # must reshard: 2 s). All 0: 5 s. All 1: 0.5 s, the optimum.
    flip = [[0.0, 1.0], [1.0, 0.0]]
    request = IntraOpRequest(
        node_costs=([0.0, 0.5], [0.0, 0.0], [0.0, 0.0], [5.0, 0.0]),
        edges=(EdgeCost(0, 1, flip), EdgeCost(0, 2, flip), EdgeCost(1, 3, flip), EdgeCost(2, 3, flip)),
    )
    assert evaluate(request, (0, 0, 0, 1)).objective == 2.0
    _check_optimal(request, (1, 1, 1, 1), 0.5)


def test_chain_is_solved_by_its_integral_lp_relaxation():
    # The chain above is a tree: its local-marginal LP is integral, so the LP optimum is
    # the ILP optimum, proven without a search, and the LP bound equals the objective.
    request = IntraOpRequest(
        node_costs=([0.0, 1.0], [1.0, 0.0], [0.0, 1.0]),
        edges=(EdgeCost(0, 1, SWAP), EdgeCost(1, 2, SWAP)),
    )
    result = _check_optimal(request, (0, 0, 0), 1.0)
    assert result.stats.solver_status == "LP_INTEGRAL" and result.stats.lp_integral
    assert result.stats.lp_bound == pytest.approx(1.0, rel=1e-9)


# Triangle whose three edges each cost 1 s when both ends pick the same strategy, over
# 10 s of strategy-independent node cost per node. An odd cycle cannot alternate, so
# every assignment pays one edge: optimum 31 s. The LP puts 1/2 on both disagreeing
# cells of every edge and pays no edge: bound 30 s (gap 1/31 = 3.2%).
_AGREE = [[1.0, 0.0], [0.0, 1.0]]
FRUSTRATED_TRIANGLE = IntraOpRequest(
    node_costs=([10.0, 10.0],) * 3,
    edges=(EdgeCost(0, 1, _AGREE), EdgeCost(1, 2, _AGREE), EdgeCost(0, 2, _AGREE)),
)


def test_fractional_lp_falls_back_to_cp_sat():
    result = solve_intra_op(FRUSTRATED_TRIANGLE)
    assert not result.stats.lp_integral and result.stats.lp_bound == pytest.approx(30.0)
    assert result.stats.solver_status == "OPTIMAL"  # CP-SAT ran and proved 31 s
    assert result.status == "OPTIMAL" and result.objective == 31.0


def test_warm_start_within_the_gap_limit_of_the_lp_bound_skips_the_search():
    # 31 s is within 5% of the 30 s LP bound: returned without CP-SAT, gap 1/31.
    result = solve_intra_op(dataclasses.replace(FRUSTRATED_TRIANGLE, gap_limit=0.05))
    assert result.stats.solver_status == "LP_BOUND" and result.status == "FEASIBLE"
    assert result.objective == 31.0 and result.lower_bound == pytest.approx(30.0)
    assert result.gap == pytest.approx(1 / 31)
    # A 2% limit is tighter than that gap: CP-SAT must run.
    assert solve_intra_op(dataclasses.replace(FRUSTRATED_TRIANGLE, gap_limit=0.02)
                          ).stats.solver_status != "LP_BOUND"


def test_a_budgeted_lps_rounding_moved_to_fit_is_a_warm_start():
    # w1: 100 s holding 10 B, or 103 s holding none; w2: 100 s holding 6 B, or 101 s.
    # Budget 14 B (both hold 16 B when kept): (0, 1) is the optimum, 201 s at 10 B.
    # The LP frees the 2 B more cheaply per byte from w2 (1/6 s per B against 3/10):
    # a third of w2 moves, bound 200.33 s; rounded, w2 stays (16 B, over), and moved to
    # fit it is (0, 1), within 1% of the bound: returned without CP-SAT. The hint
    # (1, 1) fits at 204 s, 1.8% over the bound, and alone would have sent it to CP-SAT.
    request = IntraOpRequest(
        node_costs=([100.0, 103.0], [100.0, 101.0]), node_names=("w1", "w2"),
        memory_terms=(((0, [10.0, 0.0]), (1, [6.0, 0.0])),), memory_budget=14.0,
        gap_limit=0.01, hint=(1, 1))
    result = solve_intra_op(request)
    assert result.stats.lp_bound == pytest.approx(200 + 1 / 3)
    assert result.stats.solver_status == "LP_BOUND"
    assert result.choices == (0, 1) and result.objective == 201.0
    assert solve_intra_op(dataclasses.replace(request, gap_limit=0.0)).objective == 201.0


def test_no_search_returns_the_warm_start_when_the_lp_is_fractional():
    # Hint (0, 0, 0) costs 33 s (every pair agrees); local search moves one node: 31 s,
    # the optimum here, but not proven: without a search the status stays FEASIBLE.
    request = dataclasses.replace(FRUSTRATED_TRIANGLE, hint=(0, 0, 0), search=False)
    result = solve_intra_op(request)
    assert result.stats.solver_status == "NO_SEARCH" and result.status == "FEASIBLE"
    assert result.objective == 31.0 and result.lower_bound == pytest.approx(30.0)
    assert evaluate(request, result.choices).objective == 31.0


def test_lp_too_large_for_the_time_limit_is_skipped():
    request = dataclasses.replace(_determinism_request(), time_limit_s=1e-4)
    result = solve_intra_op(request)
    assert result.stats.lp_time_s < 0.05 and np.isnan(result.stats.lp_bound)
    assert not result.stats.solver_status.startswith("LP_")
    assert evaluate(request, result.choices).ok


def test_merged_all_reduces_share_one_latency():
    # Two gradients, each either replicated work (3 s) or an all-reduce (1 s of bandwidth)
    # whose 2.5 s latency is paid once for all all-reduces XLA merges into one.
    # Alone an all-reduce costs 3.5 s > 3 s; together 1 + 1 + 2.5 = 4.5 s < 6 s. Optimum (1, 1).
    latency = SharedCost(2.5, ((0, 1), (1, 1)))
    both = IntraOpRequest(node_costs=([3.0, 1.0], [3.0, 1.0]), shared_costs=(latency,))
    result = _check_optimal(both, (1, 1), 4.5)
    assert evaluate(both, result.choices).shared_cost == 2.5
    one = IntraOpRequest(node_costs=([3.0, 1.0],), shared_costs=(SharedCost(2.5, ((0, 1),)),))
    _check_optimal(one, (0,), 3.0)
    # tying both nodes into one class keeps the charge on the class's strategy
    tied = tied_request(both, repeat_classes(both, period=1))
    assert tied.num_nodes == 1 and [s.members for s in tied.shared_costs] == [((0, 1),)]


def test_charges_that_tie_to_the_same_members_are_one_charge():
    # Two identical layers (nodes 0 and 1), each with its own merged all-reduce latency
    # (2.5 s on its strategy 1), and a 1 s charge shared by both. Tied into one class,
    # every charge has the same member, (class 0, strategy 1), and is paid exactly when
    # the others are: one charge of 2.5 + 2.5 + 1 = 6 s. Strategy 1 costs 1 + 1 + 6 = 8 s
    # (strategy 0: 6 s, no charge), as on the untied request.
    request = IntraOpRequest(node_costs=([3.0, 1.0], [3.0, 1.0]), shared_costs=(
        SharedCost(2.5, ((0, 1),)), SharedCost(2.5, ((1, 1),)), SharedCost(1.0, ((0, 1), (1, 1)))))
    tied = tied_request(request, repeat_classes(request, period=1))
    assert [(s.cost, s.members) for s in tied.shared_costs] == [(6.0, ((0, 1),))]
    for pick, seconds in (([0], 6.0), ([1], 8.0)):
        assert evaluate(tied, pick).objective == evaluate(request, pick * 2).objective == seconds


# A costs [1, 2] s, mem [100, 50] B; B costs [1, 3], mem [100, 20]; both live at once,
# budget 160 B. (0,0): 200 B too much; (0,1): 120 B, 4 s; (1,0): 150 B, 3 s; (1,1): 70 B, 5 s.
TWO_NODES_UNDER_160_BYTES = IntraOpRequest(
    node_costs=([1.0, 2.0], [1.0, 3.0]),
    node_memory=([100.0, 50.0], [100.0, 20.0]),
    memory_points=((0, 1),),
    memory_budget=160.0,
)


def test_memory_budget_forces_costlier_strategy():
    # Optimum (1, 0), objective 3 s (unconstrained it would be (0, 0), 2 s).
    request = TWO_NODES_UNDER_160_BYTES
    result = _check_optimal(request, (1, 0), 3.0)
    assert evaluate(request, result.choices).memory_by_point == (150.0,)


def test_an_assignment_within_the_budget_is_found_for_a_hint_that_breaks_it():
    # The cheap hint (0, 0) peaks at 200 B > 160 B; the assignments that fit are (0, 1),
    # (1, 0) and (1, 1) (70 B, the smallest): any of them is a warm start.
    request = dataclasses.replace(TWO_NODES_UNDER_160_BYTES, hint=(0, 0))
    assert not evaluate(request, request.hint).ok
    reduced = reduce_request(request)
    fitting = within_budget(request, reduced)
    choices = tuple(int(k[fitting.get(v, 0)]) for v, k in enumerate(reduced.keep))
    assert evaluate(request, choices).ok and choices != (0, 0)
    tight = dataclasses.replace(request, memory_budget=60.0)   # below the 70 B minimum
    assert within_budget(tight, reduce_request(tight)) is None


def test_infeasible_budget_reports_min_peak():
    # mem A [4, 2] GiB, B [4, 1] GiB, C [3, 3] GiB; points {A, B} and {B, C}.
    # Smallest peak: A=1, B=1 -> {A,B} = 3 GiB, {B,C} = 4 GiB -> 4 GiB > budget 3.5 GiB.
    request = IntraOpRequest(
        node_costs=([0.0, 1.0], [0.0, 1.0], [0.0, 1.0]),
        edges=(EdgeCost(0, 1, SWAP),),
        node_memory=([4 * GiB, 2 * GiB], [4 * GiB, 1 * GiB], [3 * GiB, 3 * GiB]),
        memory_points=((0, 1), (1, 2)),
        memory_budget=3.5 * GiB,
    )
    with pytest.raises(InfeasibleError) as info:
        solve_intra_op(request)
    assert info.value.min_peak_bytes == 4 * GiB
    assert "3.50 GiB" in str(info.value) and "4.00 GiB" in str(info.value)
    assert min_peak_memory(request) == 4 * GiB


def test_inf_strategy_never_chosen():
    # A [inf, 5], B [0, 20], edge SWAP. (0, 0) would cost 0 but A=0 is forbidden.
    # A=1: B=0 -> 5 + 10 = 15; B=1 -> 25. Optimum (1, 0), 15 s.
    request = IntraOpRequest(node_costs=([INF, 5.0], [0.0, 20.0]), edges=(EdgeCost(0, 1, SWAP),))
    _check_optimal(request, (1, 0), 15.0)


def test_inf_edge_cell_forbids_the_pair():
    # Without the inf cell (0, 0) costs 0; forbidden, next best is (1, 1) at 1 + 1 = 2 s.
    request = IntraOpRequest(
        node_costs=([0.0, 1.0], [0.0, 1.0]),
        edges=(EdgeCost(0, 1, [[INF, 5.0], [5.0, 0.0]]),),
    )
    _check_optimal(request, (1, 1), 2.0)


def test_reductions_fold_everything_trivial():
    # Edge 0-1 is separable (a[i] + b[j]), 1-2 has two parallel edges in opposite directions
    # that sum to zero-diagonal SWAP, node 3 has a single strategy, 2-4 is all zeros.
    separable = np.add.outer([0.0, 3.0], [1.0, 0.0])
    request = IntraOpRequest(
        node_costs=([0.0, 0.0], [0.0, 0.0], [0.0, 2.0], [1.0], [1.0, 0.0]),
        edges=(
            EdgeCost(0, 1, separable),
            EdgeCost(1, 2, [[0.0, 4.0], [6.0, 0.0]]),
            EdgeCost(2, 1, [[0.0, 4.0], [6.0, 0.0]]),
            EdgeCost(3, 2, [[2.0, 0.0]]),
            EdgeCost(2, 4, np.zeros((2, 2))),
        ),
    )
    # Node 4 -> 1 (free). Node 3 is fixed (1 s) and adds [2, 0] to node 2. With 0 -> 0:
    # (1, 2) = (1, 1): 0 + 0 + 2 + 0 = 2; (0, 0): 1 + 0 + 0 + 2 = 3; mixed pay 8 or 12.
    # Optimum (0, 1, 1, 0, 1): nodes 0 + 0 + 2 + 1 + 0, edges 0 -> 3 s.
    result = _check_optimal(request, (0, 1, 1, 0, 1), 3.0)
    assert result.stats.merged_edges == 1
    assert result.stats.model_edges == 1  # only the 1-2 resharding edge is left


# ---------------------------------------------------------------- brute force property test


def _brute_force(request):
    """(best objective or None, min peak) by enumerating every assignment with numpy."""
    shape = tuple(len(c) for c in request.node_costs)
    n = len(shape)

    def along(axis, vector):
        view = [1] * n
        view[axis] = len(vector)
        return np.asarray(vector, dtype=float).reshape(view)

    total = np.zeros(shape)
    for v, cost in enumerate(request.node_costs):
        total = total + along(v, cost)
    for edge in request.edges:
        view = [1] * n
        view[edge.src], view[edge.dst] = edge.cost.shape
        matrix = edge.cost if edge.src < edge.dst else edge.cost.T
        total = total + matrix.reshape(view)
    for shared in request.shared_costs:
        paid = np.zeros(shape, dtype=bool)
        for v, i in shared.members:
            paid = paid | along(v, np.arange(shape[v]) == i).astype(bool)
        total = total + shared.cost * paid
    peak = np.zeros(shape)
    for point in request.memory_points:
        used = np.zeros(shape)
        for v in sorted(set(point)):
            used = used + along(v, request.node_memory[v])
        peak = np.maximum(peak, used)
    for point in request.memory_terms:
        used = np.zeros(shape)
        for *ends, values in point:
            if len(ends) == 1:
                used = used + along(ends[0], values)
            else:
                a, b = ends
                view = [1] * n
                view[a], view[b] = values.shape
                used = used + (values if a < b else values.T).reshape(view)
        peak = np.maximum(peak, used)
    feasible = np.isfinite(total)
    min_peak = float(peak[feasible].min()) if feasible.any() else None
    if request.memory_budget is not None:
        feasible &= peak <= request.memory_budget
    best = float(total[feasible].min()) if feasible.any() else None
    return best, min_peak


def _random_request(rng, n_max=7, s_max=4):
    n = int(rng.integers(1, n_max + 1))
    counts = rng.integers(1, s_max + 1, size=n)
    costs = []
    for s in counts:
        cost = rng.uniform(0, 1, s)
        if s > 1 and rng.random() < 0.3:
            cost[rng.integers(s)] = INF
        costs.append(cost)
    edges = []
    for _ in range(int(rng.integers(0, 2 * n + 1)) if n > 1 else 0):
        a, b = (int(x) for x in rng.choice(n, 2, replace=False))
        shape = (counts[a], counts[b])
        kind = rng.random()
        if kind < 0.15:
            matrix = np.zeros(shape)
        elif kind < 0.3:
            matrix = np.add.outer(rng.uniform(0, 1, shape[0]), rng.uniform(0, 1, shape[1]))
        else:
            matrix = rng.uniform(0, 2, shape)
            if rng.random() < 0.1:
                matrix[rng.integers(shape[0]), rng.integers(shape[1])] = INF
        edges.append(EdgeCost(a, b, matrix))
    memory, points, budget = None, (), None
    if rng.random() < 0.5:
        memory = tuple(rng.integers(1, 100, size=s).astype(float) for s in counts)
        points = tuple(
            tuple(int(v) for v in rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
            for _ in range(int(rng.integers(1, 4)))
        )
        budget = float(rng.integers(50, 250))
    return IntraOpRequest(
        node_costs=tuple(costs),
        edges=tuple(edges),
        node_memory=memory,
        memory_points=points,
        memory_budget=budget,
        time_limit_s=10.0,
    )


def _random_copy_request(rng):
    """Memory points made of node terms and pair terms (copies that exist only for some pairs)."""
    request = _random_request(rng)
    n, counts = request.num_nodes, [len(c) for c in request.node_costs]
    points = []
    for _ in range(int(rng.integers(1, 4))):
        terms = [(int(v), rng.integers(0, 60, counts[v]).astype(float))
                 for v in rng.choice(n, int(rng.integers(1, n + 1)), replace=False)]
        for _ in range(int(rng.integers(0, 3)) if n > 1 else 0):
            a, b = (int(x) for x in rng.choice(n, 2, replace=False))
            copy = rng.integers(0, 80, (counts[a], counts[b])).astype(float)
            copy[rng.random(copy.shape) < 0.4] = 0.0  # no copy when the layouts agree
            terms.append((a, b, copy))
        points.append(tuple(terms))
    return dataclasses.replace(request, node_memory=None, memory_points=(),
                               memory_terms=tuple(points), memory_budget=float(rng.integers(40, 200)))


def _random_shared_request(rng):
    """Fixed charges shared by random (node, strategy) members, e.g. a merged collective's latency."""
    request = _random_request(rng)
    n, counts = request.num_nodes, [len(c) for c in request.node_costs]
    shared = []
    for _ in range(int(rng.integers(1, 4))):
        members = {(int(v), int(rng.integers(counts[v]))) for v in rng.choice(n, int(rng.integers(1, 5)))}
        shared.append(SharedCost(float(rng.uniform(0, 2)), tuple(sorted(members))))
    return dataclasses.replace(request, shared_costs=tuple(shared))


@pytest.mark.parametrize("kind", ["node memory", "pair memory", "shared costs"])
@pytest.mark.parametrize("seed", range(30))
def test_matches_brute_force(seed, kind):
    if kind == "node memory":
        request = _random_request(np.random.default_rng(seed))
    elif kind == "pair memory":
        request = _random_copy_request(np.random.default_rng(1000 + seed))
    else:
        request = _random_shared_request(np.random.default_rng(2000 + seed))
    best, min_peak = _brute_force(request)
    if best is None and min_peak is not None:
        with pytest.raises(InfeasibleError) as info:
            solve_intra_op(request)
        assert info.value.min_peak_bytes == min_peak
        return
    if best is None:
        with pytest.raises(ValueError):
            solve_intra_op(request)
        return
    result = solve_intra_op(request)
    check = evaluate(request, result.choices)
    assert check.violations == ()
    assert result.status == "OPTIMAL"
    assert check.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    lp_bound = result.stats.lp_bound  # when the LP ran, it bounds the optimum from below
    assert np.isnan(lp_bound) or lp_bound <= best + 1e-9 * max(1.0, abs(best))
    assert result.objective == check.objective


def test_fit_to_budget_moves_the_cheapest_seconds_per_byte_first():
    # Three weights, replicated (strategy 0) or sharded (1), all live at one point.
    #   w1: shard 1 s, 8 -> 1 B; w2: shard 2 s, 8 -> 1 B; w3: shard 0.5 s, 2 -> 1 B.
    # An edge w1 -> w2 costs 3 s when w1 is sharded and w2 is not.
    # Unconstrained optimum: all replicated, 0 s, 18 B. Budget 12 B: 6 B must go.
    #   shard w1: 1 + 3 = 4 s for 7 B (0.57 s/B); shard w2: 2 s for 7 B (0.29 s/B);
    #   w3 saves 1 B only. So w2 moves: (0, 1, 0), 11 B, 2 s, the optimum under the budget.
    request = IntraOpRequest(
        node_costs=([0.0, 1.0], [0.0, 2.0], [0.0, 0.5]), node_names=("w1", "w2", "w3"),
        edges=(EdgeCost(0, 1, np.array([[0.0, 0.0], [3.0, 0.0]])),),
        memory_terms=(((0, [8.0, 1.0]), (1, [8.0, 1.0]), (2, [2.0, 1.0])),), memory_budget=12.0)
    fitted = fit_to_budget(request, (0, 0, 0))
    assert fitted == (0, 1, 0) and evaluate(request, fitted).ok
    assert evaluate(request, fitted).objective == solve_intra_op(request).objective == 2.0
    assert fit_to_budget(request, (0, 1, 0)) == (0, 1, 0)            # fits already: kept
    # (0, 0, 0) peaks 18 B, 50% over the budget: refused below that excess
    assert fit_to_budget(request, (0, 0, 0), max_excess=0.25) is None
    assert fit_to_budget(request, (0, 0, 0), max_excess=0.5) == (0, 1, 0)
    # 3 B is the least any assignment holds: a 2 B budget cannot be met
    assert fit_to_budget(dataclasses.replace(request, memory_budget=2.0), (0, 0, 0)) is None


def test_copy_bytes_steer_the_choice():
    # src (node 0): layout 0 costs 1 s, layout 1 costs 0 s; dst (node 1) reads layout 0, so
    # src in layout 1 needs a 100-byte copy live beside dst's 50 bytes: peak 150 > budget 120.
    # Optimum under the budget: src in its dearer layout 0 (objective 1 s, peak 50 B, which is
    # also the smallest peak, so a 40 B budget is infeasible with min_peak 50).
    request = IntraOpRequest(
        node_costs=([1.0, 0.0], [0.0]),
        memory_terms=(((1, [50.0]), (0, 1, [[0.0], [100.0]])),),
        memory_budget=120.0,
    )
    result = solve_intra_op(request)
    assert result.choices == (0, 0) and result.objective == 1.0
    assert evaluate(request, (1, 0)).memory_by_point == (150.0,)
    with pytest.raises(InfeasibleError) as info:
        solve_intra_op(dataclasses.replace(request, memory_budget=40.0))
    assert info.value.min_peak_bytes == 50.0


@pytest.mark.parametrize("seed", range(10))
def test_move_costs_change_is_the_change_of_evaluate(seed):
    rng = np.random.default_rng(3000 + seed)
    request = _random_shared_request(rng)
    moves = MoveCosts.of(request)
    choices = [int(rng.integers(len(c))) for c in request.node_costs]
    before = evaluate(request, choices).objective
    for v in range(request.num_nodes):
        for i in range(len(request.node_costs[v])):
            moved = choices[:v] + [i] + choices[v + 1:]
            after = evaluate(request, moved).objective
            if np.isfinite(before) and np.isfinite(after):
                assert moves.change(choices, v, i) == pytest.approx(after - before, abs=1e-12)


# ---------------------------------------------------------------- column generation


def _random_grid_lp(rng):
    """An LP over a random graph with 6-12 strategies per node (grids larger than the
    cells column generation starts from), some cells forbidden."""
    n = int(rng.integers(3, 9))
    sizes = [int(rng.integers(6, 13)) for _ in range(n)]
    edges = {(int(rng.integers(0, b)), b) for b in range(1, n)}
    edges |= {tuple(sorted(int(x) for x in rng.choice(n, 2, replace=False))) for _ in range(n)}
    grids = []
    for a, b in sorted(edges):
        matrix = rng.exponential(1.0, (sizes[a], sizes[b]))
        matrix[rng.random(matrix.shape) < 0.1] = INF
        matrix[0, 0] = 1.0
        grids.append(edge_grid(a, b, matrix))
    node_cost = {v: rng.exponential(1.0, sizes[v]) for v in range(n)}
    return sizes, list(range(n)), node_cost, grids, [], (), 0.0, 100.0, 100.0


def test_equal_edges_share_one_grid_grouping():
    # Two identical rings of 4 nodes (3 strategies each, 1 s unless neighbours agree): the
    # reduction keeps all 8 edges, whose cells are equal. Their strategy classes are
    # grouped once and shared (read-only), each grid keeping its own ends; the optimum
    # (0 s: every node on strategy 0) is the same as with a grouping per edge.
    ring = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    pairs = [(0, 1), (1, 2), (2, 3), (0, 3), (4, 5), (5, 6), (6, 7), (4, 7)]
    request = IntraOpRequest(node_costs=tuple(np.array([0.0, 0.5, 0.7]) for _ in range(8)),
                             edges=tuple(EdgeCost(a, b, ring.copy()) for a, b in pairs))
    reduced = reduce_request(request)
    grids = edge_grids(reduced, [])
    assert sorted((g.a, g.b) for g in grids) == sorted(pairs)
    assert len({id(g.row_of) for g in grids}) == 1 and not grids[0].cost.flags.writeable
    assert solve_intra_op(request).objective == 0.0


@pytest.mark.parametrize("seed", range(20))
def test_column_generation_reaches_the_lp_over_every_cell(seed):
    # the LP started from a few cells per grid, with every cell of negative reduced cost
    # added round by round, has the optimum of the LP over every finite cell
    args = _random_grid_lp(np.random.default_rng(seed))
    generated = solve_relaxation(*args)
    every = solve_relaxation(*args, every_cell=True)
    assert generated.solved and every.solved and every.rounds == 1
    assert generated.bound == pytest.approx(every.bound, rel=1e-7)
    if every.integral:   # a unique integral optimum is the same vertex
        assert generated.integral


def test_each_lp_round_gets_the_wall_clock_time_left_not_less():
    # HiGHS counts its time limit against its run time summed over every run() of one
    # instance: a later round given "the seconds left" alone stopped at half the budget
    args = _random_grid_lp(np.random.default_rng(0))
    lp = relaxation._LinearProgram(args[0], args[1], args[2])
    lp.add_edges(args[3])
    highs = relaxation._highs(lp, 1.0)
    highs.run()
    used = highs.getRunTime()
    assert used > 0
    relaxation.allow_more_time(highs, 5.0)
    assert highs.getOptionValue("time_limit")[1] == pytest.approx(used + 5.0)
    relaxation.allow_more_time(highs, -1.0)  # none left: the limit is what it has used
    assert highs.getOptionValue("time_limit")[1] == pytest.approx(used)


def test_column_generation_adds_cells_in_rounds():
    rounds = [solve_relaxation(*_random_grid_lp(np.random.default_rng(seed))).rounds
              for seed in range(20)]
    assert max(rounds) > 1, rounds   # the starting cells alone were not optimal


def test_an_infeasible_restricted_lp_is_solved_over_every_cell(monkeypatch):
    # no starting cell: the restricted LP is infeasible (each node's strategies sum to 1,
    # its grids' marginals to 0), which says nothing of the LP over every cell
    args = _random_grid_lp(np.random.default_rng(0))
    monkeypatch.setattr(relaxation, "_cheapest_cells", lambda grid: np.zeros(grid.cost.shape, bool))
    fallback = solve_relaxation(*args)
    assert fallback.solved and not fallback.infeasible
    assert fallback.bound == pytest.approx(solve_relaxation(*args, every_cell=True).bound, rel=1e-7)


def test_solving_prints_nothing():
    # HiGHS prints a banner when a process makes its first instance (in a fresh process)
    code = ("from autoshard.ilp import EdgeCost, IntraOpRequest, solve_intra_op; "
            "print(solve_intra_op(IntraOpRequest(node_costs=([0.0, 1.0], [1.0, 0.0]), "
            "edges=(EdgeCost(0, 1, [[0.0, 9.0], [9.0, 0.0]]),))).stats.solver_status)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out == "LP_INTEGRAL\n"


# ---------------------------------------------------------------- determinism


def _determinism_request():
    rng = np.random.default_rng(1234)
    n, s = 80, 6
    edges = []
    for v in range(1, n):
        for u in rng.choice(v, min(v, 2), replace=False):
            edges.append(EdgeCost(int(u), v, rng.uniform(0, 1, (s, s))))
    return IntraOpRequest(
        node_costs=tuple(rng.uniform(0, 1, s) for _ in range(n)),
        edges=tuple(edges),
        time_limit_s=0.3,
    )


def test_deterministic_across_runs_and_processes():
    first = solve_intra_op(_determinism_request())
    second = solve_intra_op(_determinism_request())
    assert first.choices == second.choices and first.objective == second.objective
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_ilp import _determinism_request
        from autoshard.ilp import solve_intra_op
        print(list(solve_intra_op(_determinism_request()).choices))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(list(first.choices))


# ---------------------------------------------------------------- evaluate


def test_evaluate_reports_each_violation():
    request = IntraOpRequest(
        node_costs=([INF, 1.0], [0.0, 1.0, 2.0]),
        edges=(EdgeCost(0, 1, [[0.0, INF, 1.0], [1.0, 0.0, 1.0]]),),
        node_names=("dot_3", "add"),
        node_memory=([GiB, GiB], [0.2 * GiB, 0.2 * GiB, 0.2 * GiB]),
        memory_points=((0, 1),),
        memory_budget=1.0 * GiB,
    )
    good = evaluate(request, (1, 1))
    assert good.objective == 2.0 and good.node_cost == 2.0 and good.edge_cost == 0.0
    assert good.memory_by_point == (1.2 * GiB,)
    (message,) = good.violations
    assert message.startswith("memory point 0: 1.20 GiB > budget 1.00 GiB")
    forbidden = evaluate(request, (0, 1))
    assert "node 'dot_3' (#0) strategy 0 is forbidden (inf)" in forbidden.violations
    assert any("pair (0, 1) is forbidden" in v for v in forbidden.violations)
    assert forbidden.objective == INF
    out_of_range = evaluate(request, (1, 7))
    assert "node 'add' (#1) choice 7 out of range (3 strategies)" in out_of_range.violations
    assert "expected 2 choices" in evaluate(request, (1,)).violations[0]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(edges=(EdgeCost(0, 1, np.zeros((2, 2))),)), "'mul' (#1)"),  # mul has 3 strategies
        (dict(node_costs=([0.0], [])), "'mul' (#1) has zero strategies"),
        (dict(node_costs=([0.0], [INF, INF, INF])), "'mul' (#1): every strategy is forbidden"),
        (dict(edges=(EdgeCost(0, 5, np.zeros((1, 1))),)), "node index 5 out of range"),
        (dict(node_memory=([1.0], [1.0, 2.0])), "'mul' (#1): node_memory has 2 entries, expected 3"),
        (dict(node_memory=([1.0],)), "node_memory has 1 entries, expected 2"),
        (dict(hint=(0,)), "hint has 1 entries, expected 2"),
        (dict(hint=(0, 3)), "hint for node 'mul' (#1) is 3"),
        (dict(guide=(0, 0, 0)), "guide has 3 entries, expected 2"),
        (dict(guide=(0, -1)), "guide for node 'mul' (#1) is -1"),
        (dict(node_names=("x",)), "node_names has 1 entries, expected 2"),
        (dict(memory_points=((0, 9),), node_memory=([1.0], [1.0, 1.0, 1.0])), "node index 9 out of range"),
    ],
)
def test_validation_names_the_node(kwargs, fragment):
    base = dict(node_costs=([0.0], [0.0, 1.0, 2.0]), node_names=("dot", "mul"))
    base.update(kwargs)
    with pytest.raises(ValueError) as info:
        IntraOpRequest(**base)
    assert fragment in str(info.value)


def test_with_options_shares_the_graph_and_checks_what_changes():
    base = IntraOpRequest(node_costs=([0.0], [0.0, 1.0, 2.0]), node_names=("dot", "mul"),
                          edges=(EdgeCost(0, 1, np.zeros((1, 3))),), node_memory=([1.0], [3.0, 2.0, 1.0]))
    changed = base.with_options(hint=[0, 2], time_limit_s=3, memory_budget=2,
                                memory_terms=(((1, [1.0, 3.0, 1.0]),),))
    replaced = dataclasses.replace(base, hint=[0, 2], time_limit_s=3, memory_budget=2,
                                   memory_terms=(((1, [1.0, 3.0, 1.0]),),))
    for field in dataclasses.fields(IntraOpRequest):
        got, want = getattr(changed, field.name), getattr(replaced, field.name)
        assert repr(got) == repr(want), field.name
    assert changed.node_costs is base.node_costs and changed.edges is base.edges
    assert isinstance(changed.time_limit_s, float) and changed.hint == (0, 2)
    assert base.hint is None and base.memory_budget is None        # the original is unchanged
    assert evaluate(changed, (0, 2)).ok and not evaluate(changed, (0, 1)).ok  # 3 > 2 bytes
    with pytest.raises(ValueError, match="hint for node 'mul' \\(#1\\) is 3"):
        base.with_options(hint=(0, 3))
    with pytest.raises(ValueError, match="memory_terms\\[0\\] for node 'mul'"):
        base.with_options(memory_terms=(((1, [1.0]),),))
    with pytest.raises(TypeError, match="node_costs are not options"):
        base.with_options(node_costs=([0.0], [0.0]))


def test_repr_summarises_large_requests():
    request = IntraOpRequest(
        node_costs=tuple(np.zeros(4) for _ in range(1000)),
        edges=tuple(EdgeCost(v, v + 1, np.ones((4, 4))) for v in range(999)),
    )
    assert len(repr(request)) < 200 and "nodes=1000" in repr(request)
    result = solve_intra_op(IntraOpRequest(node_costs=tuple(np.arange(3.0) for _ in range(50))))
    assert len(repr(result)) < 300 and result.choices == (0,) * 50 and result.num_variables == 0


def test_hint_is_accepted_and_result_stays_optimal():
    request = IntraOpRequest(
        node_costs=([0.0, 1.0], [1.0, 0.0], [0.0, 1.0]),
        edges=(EdgeCost(0, 1, SWAP), EdgeCost(1, 2, SWAP)),
        hint=(1, 1, 1),
    )
    _check_optimal(request, (0, 0, 0), 1.0)


def test_greedy_assignment_follows_restrictions_and_best_assignment_picks_cheapest():
    # a → b, costs a=[0, 1], b=[2, 0], edge [[0, 3], [3, 0]]:
    # (0,0)=2, (0,1)=3, (1,0)=6, (1,1)=1 (optimum). Unrestricted greedy takes a=0 then
    # b=0 and iterated conditional modes cannot leave that local minimum (2); pinning
    # a to strategy 1 (as a preset pins the inputs) leads greedy to the optimum.
    request = IntraOpRequest(node_costs=([0.0, 1.0], [2.0, 0.0]),
                             edges=(EdgeCost(0, 1, np.array([[0.0, 3.0], [3.0, 0.0]])),))
    free = greedy_assignment(request)
    pinned = greedy_assignment(request, {0: [1]})
    assert free == (0, 0) and pinned == (1, 1)
    assert best_assignment(request, [free, pinned]) == (1, 1)
    assert best_assignment(request, [(0, 5)]) is None  # invalid candidates are skipped


@pytest.mark.parametrize("seed", range(6))
def test_search_stopped_by_its_limit_is_never_worse_than_the_hint(seed):
    rng = np.random.default_rng(seed)
    raw = _random_request(rng, n_max=30, s_max=6)  # made finite and memory-free below
    request = IntraOpRequest(
        node_costs=tuple(np.nan_to_num(c, posinf=5.0) for c in raw.node_costs),
        edges=tuple(EdgeCost(e.src, e.dst, np.nan_to_num(e.cost, posinf=5.0))
                    for e in raw.edges))
    hint = greedy_assignment(request)
    stopped = solve_intra_op(dataclasses.replace(request, hint=hint, time_limit_s=1e-4))
    assert stopped.objective <= evaluate(request, hint).objective + 1e-12


ALTERNATE = [[3.0, 0.0], [0.0, 3.0]]  # consecutive nodes pay 3 s unless they differ


def _chain(n, **kwargs):
    return IntraOpRequest(node_costs=tuple([0.0, 0.0] for _ in range(n)),
                          edges=tuple(EdgeCost(v, v + 1, ALTERNATE) for v in range(n - 1)),
                          **kwargs)


def test_repeated_layers_tied_in_alternating_classes():
    # 12 identical nodes in a chain; the optimum alternates strategies (0 s). Colour
    # refinement (3 rounds) tells apart the 3 nodes at each end; v3..v8 repeat and,
    # split by the parity of their position, form 2 classes: 6 + 2 = 8 classes.
    # Tied by parity the optimum is still 0 s; one class for all six (period 1) would
    # force equal neighbours and pay 3 s on each of their 5 internal edges.
    request = _chain(12, tie_repeats=True)
    classes = repeat_classes(request)
    assert classes.num_classes == 8
    assert len({classes.of_node[v] for v in (3, 5, 7)}) == 1 != classes.of_node[4]
    result = solve_intra_op(request)
    assert result.objective == 0.0 and result.stats.tied_classes == 8
    assert evaluate(request, result.choices).objective == 0.0
    same = solve_intra_op(tied_request(request, repeat_classes(request, period=1)))
    assert same.objective == 15.0


@pytest.mark.parametrize("scale, extra, classes", [
    (1.0, 1e-6, 8),   # 1e-6 s more on both strategies: the same shape to 1e-3, tied
    (1.4, 0.0, 8),    # 1.4x the costs: the same role at another size (XLA duplicated an
                      # early residual add into more fusions), tied
    (1.0, 0.5, 12),   # strategy 0 now costs a third of strategy 1, not nothing: v5 is told
                      # apart, and with it v2..v8 (3 edges or fewer away)
])
def test_repeats_are_tied_by_the_shape_of_their_costs(scale, extra, classes):
    # The 12-node chain above with 1 s on strategy 1 of every node; v5's costs scaled by
    # `scale`, then raised by `extra`. Whatever is tied, the tied request prices the
    # members' own costs: its objective is the full request's.
    costs = [[0.0, 1.0] for _ in range(12)]
    costs[5] = [extra, scale + extra]
    request = dataclasses.replace(_chain(12, tie_repeats=True), node_costs=tuple(costs))
    found = repeat_classes(request)
    assert found.num_classes == classes
    tied = tied_request(request, found)
    for pick in ([0] * found.num_classes, [c % 2 for c in range(found.num_classes)]):
        assert evaluate(tied, pick).objective == pytest.approx(
            evaluate(request, found.expand(pick)).objective)


def test_tied_solution_is_priced_on_the_full_request():
    # Any class assignment is a valid plan of the original: the tied problem's objective
    # equals the full request's cost of the expanded choices.
    rng = np.random.default_rng(0)
    request = _chain(20)
    classes = repeat_classes(request)
    tied = tied_request(request, classes)
    for _ in range(5):
        pick = [int(rng.integers(2)) for _ in range(classes.num_classes)]
        assert evaluate(tied, pick).objective == evaluate(request, classes.expand(pick)).objective


def test_a_requests_own_tied_request_is_made_once_and_keeps_its_options():
    # tied_request(request) (over request.repeats, its costs and edges kept on the
    # request) gives what tied_request(request, repeat_classes(request)) gives, with each
    # copy's own options (hint, memory terms and budget) mapped onto the classes.
    request = _chain(12, tie_repeats=True, hint=tuple(v % 2 for v in range(12)),
                     memory_terms=((tuple((v, [1.0, 2.0]) for v in range(12))),),
                     memory_budget=18.0)
    classes = repeat_classes(request)
    made = tied_request(request, classes)
    for copy in (request, request.with_options(memory_budget=20.0)):
        tied = tied_request(copy)
        assert len(tied.node_costs) == len(made.node_costs) == classes.num_classes
        assert all(np.array_equal(a, b) for a, b in zip(tied.node_costs, made.node_costs))
        assert tied.hint == made.hint
        assert tied.memory_budget == copy.memory_budget
        assert [len(point) for point in tied.memory_terms] == [12]
        assert tied_request(copy).node_costs[0] is tied.node_costs[0]   # made once
    # 12 nodes of 1 or 2 bytes against a budget of 18: at most 6 may take strategy 1;
    # the hint (6 of each) fits, all on strategy 1 (24 bytes) does not, on both
    tied = tied_request(request)
    assert evaluate(tied, tied.hint).ok
    assert not evaluate(tied, [1] * classes.num_classes).ok


def test_copies_share_the_structure_whichever_asks_first():
    # A copy with other options made before anything was worked out: the repeat classes,
    # tied structure and flat costs (costs and edges only) are found once, for both. A
    # request with other costs (dataclasses.replace) works out its own.
    request = _chain(12, tie_repeats=True)
    early = request.with_options(hint=(0,) * 12, memory_budget=None)
    assert early.repeats is request.repeats
    assert request.tied_structure is early.tied_structure
    assert early.flat_costs is request.flat_costs
    other = dataclasses.replace(request, node_costs=tuple([0.0, 1.0] for _ in range(12)))
    assert other.repeats is not request.repeats
    assert other.flat_costs.node_costs[1] == 1.0 and request.flat_costs.node_costs[1] == 0.0
    # ... over the same edges, whose flat arrays it shares (a neighbourhood round's request:
    # other costs for the same strategies)
    assert other.edges is request.edges
    assert other.flat_costs.edge_costs is request.flat_costs.edge_costs
    assert evaluate(other, (1,) * 12).objective == 12.0 + 11 * 3.0


def test_shared_edges_and_memory_terms_are_checked_again_when_the_strategies_change():
    # Edges and memory terms checked once are not checked again by a copy with as many
    # strategies per node; a copy with other counts is, and names what no longer fits.
    request = IntraOpRequest(node_costs=([0.0, 1.0], [0.0, 1.0]), node_names=("dot", "mul"),
                             edges=(EdgeCost(0, 1, np.zeros((2, 2))),),
                             memory_terms=(((1, [1.0, 2.0]),),), memory_budget=4.0)
    same = dataclasses.replace(request, node_costs=([5.0, 1.0], [0.0, 2.0]))
    assert same.edges is request.edges and same.memory_terms is request.memory_terms
    assert evaluate(same, (1, 0)).objective == 1.0
    with pytest.raises(ValueError, match=r"edge 0 node 'dot' \(#0\) -> node 'mul' \(#1\): cost matrix "
                                         r"has shape \(2, 2\), expected \(2, 3\)"):
        dataclasses.replace(request, node_costs=([0.0, 1.0], [0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="memory_terms\\[0\\] for node 'mul' \\(#1\\): "
                                         "expected byte counts of shape \\(3,\\)"):
        dataclasses.replace(request, node_costs=([0.0, 1.0], [0.0, 1.0, 2.0]), edges=())


def test_greedy_plans_of_a_tied_request_take_one_choice_per_class():
    # The 12-node chain, tied: 8 classes. With tie_repeats the greedy plan is the tied
    # request's, expanded (v3, v5, v7 alike; v4, v6, v8 alike), and alternates (0 s). A
    # restriction of v5 to strategy 1 holds for its class: v3 and v7 take 1 as well.
    request = _chain(12, tie_repeats=True)
    classes = repeat_classes(request)
    free, pinned = greedy_assignments(request, [None, {5: [1]}])
    assert free == greedy_assignment(request)
    for plan in (free, pinned):
        assert plan == classes.expand([plan[m[0]] for m in classes.members()])
        assert evaluate(request, plan).objective == 0.0
    assert [pinned[v] for v in (3, 5, 7)] == [1, 1, 1]
    untied = greedy_assignments(request.with_options(tie_repeats=False), [{5: [1]}])[0]
    assert untied[5] == 1 and evaluate(request, untied).objective == 0.0


# ---------------------------------------------------------------- starting plan during the LP


@pytest.mark.parametrize("case", ["integral LP", "tied", "fractional LP"])
def test_a_starting_plan_made_while_the_lp_runs_solves_as_the_same_hint_does(case):
    # The caller's starting plan is made in the calling thread while HiGHS solves the LP
    # in its worker (run_interruptibly's `meanwhile`), and the result is what the same
    # plan given as `hint` gives: whether the LP is integral (the hint is only compared
    # with the LP's plan), the request tied (the hint is mapped onto the classes, and
    # compared again after expansion) or the LP fractional (the hint starts the local
    # search and CP-SAT, deterministic here).
    request = {"integral LP": _chain(12), "tied": _chain(12, tie_repeats=True),
               "fractional LP": _hard_request(40, time_limit_s=1.0)}[case]
    hint = greedy_assignment(request)
    made = []

    def starting_plan():
        made.append([f.function for f in inspect.stack()])
        return hint

    expected = solve_intra_op(request.with_options(hint=hint))
    got = solve_intra_op(request, starting_plan=starting_plan)
    assert len(made) == 1 and "run_interruptibly" in made[0]   # once, while the LP ran
    assert got.choices == expected.choices and got.objective == expected.objective
    assert got.stats.solver_status == expected.stats.solver_status
    assert (got.stats.solver_status == "LP_INTEGRAL") == (case != "fractional LP")


# ---------------------------------------------------------------- wall-clock limit


def _hard_request(n=400, **kwargs):
    """``n`` nodes of 8 strategies, two random dense edges each: the LP is fractional and
    CP-SAT does not prove optimality within seconds."""
    rng = np.random.default_rng(7)
    s = 8
    edges = [EdgeCost(int(u), v, rng.uniform(0, 1, (s, s)))
             for v in range(1, n) for u in rng.choice(v, min(v, 2), replace=False)]
    return IntraOpRequest(node_costs=tuple(rng.uniform(0, 1, s) for _ in range(n)),
                          edges=tuple(edges), **kwargs)


def test_wall_clock_limit_stops_a_long_search():
    # The deterministic limit (1000 s) would run for many minutes: the wall clock ends
    # the search. (Not a timing benchmark: 1 s against a search of minutes.)
    result = solve_intra_op(_hard_request(time_limit_s=1000.0, wall_time_limit_s=1.0))
    assert result.status == "FEASIBLE" and result.solve_time_s < 30.0
    assert evaluate(_hard_request(), result.choices).ok


def test_no_wall_clock_time_left_returns_the_warm_start_without_a_search():
    request = _hard_request(wall_time_limit_s=0.0)
    hint = greedy_assignment(request)
    result = solve_intra_op(dataclasses.replace(request, hint=hint))
    assert result.stats.solver_status == "OUT_OF_TIME" and result.status == "FEASIBLE"
    assert result.objective <= evaluate(request, hint).objective + 1e-12
    assert result.lower_bound <= result.objective


def test_long_phases_report_progress(monkeypatch, caplog):
    monkeypatch.setattr("autoshard.ilp._clock.PROGRESS_PERIOD_S", 0.0)  # every poll logs
    with caplog.at_level(logging.INFO, logger="autoshard.ilp"):
        solve_intra_op(_hard_request(150, wall_time_limit_s=3.0))
    lines = [r.getMessage() for r in caplog.records if r.name == "autoshard.ilp"]
    assert any(line.startswith("LP relaxation: ") for line in lines)
    search = [line for line in lines if line.startswith("search: ")]
    assert search and all(" s left" in line for line in search)
    assert any("best plan so far" in line and "gap" in line for line in search)


def test_negative_wall_clock_limit_is_rejected():
    with pytest.raises(ValueError, match="wall_time_limit_s must be None or >= 0"):
        IntraOpRequest(node_costs=([0.0],), wall_time_limit_s=-1.0)


@pytest.mark.parametrize("roles, tied", [(None, False), ((0, 1) * 3, True)],
                         ids=["by costs", "by roles"])
def test_repeat_classes_compare_roles_where_the_request_names_them(roles, tied):
    # Three layers a_i -> b_i, the same edge in each. a_2 costs [3, 7], not [1, 2]: by
    # costs it is a class of its own; named the same role as a_0, it ties with a_0 (the
    # period of 2 keeps a_1 apart), as an early and a late layer do where XLA recomputes
    # a value in more fusions the more layers follow.
    from autoshard.ilp._repeat_classes import repeat_classes
    edge = np.array([[0.0, 1.0], [1.0, 0.0]])
    costs = ([1.0, 2.0], [0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 7.0], [0.0, 0.0])
    request = IntraOpRequest(node_costs=costs, edges=[EdgeCost(2 * i, 2 * i + 1, edge) for i in range(3)],
                             node_roles=roles)
    classes = repeat_classes(request).of_node
    assert (classes[0] == classes[4]) is tied
    assert classes[0] != classes[2] and classes[1] != classes[3]


def test_node_roles_must_name_every_node():
    with pytest.raises(ValueError, match="node_roles has 1 entries, expected 2"):
        IntraOpRequest(node_costs=([1.0], [1.0]), node_roles=(0,))
