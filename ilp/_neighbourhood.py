"""Very large requests solved over neighbourhoods of a plan (large-neighbourhood search).

On a mesh with three axes a tensor has dozens of layouts and an op hundreds of
strategies; the edge grids between them (strategies × strategies per tensor use) reach
millions of cells, more than the LP and CP-SAT take in minutes. A request may label
every strategy, one label per mesh axis, saying what that axis does under it
(``IntraOpRequest.strategy_labels``). A round then restricts every node to the
strategies whose labels differ from the current plan's in at most one place — one mesh
axis moved to another dim, dropped or added — and solves that restricted problem
exactly (LP, then CP-SAT). All nodes move in the same round, so one round can move a
whole model from one layout to another, one axis at a time (batch-split to
weight-split for the second axis, say). Rounds repeat from the improved plan until one
finds nothing better (by 0.1%), or :data:`MAX_ROUNDS`.

Each round searches (CP-SAT when its LP is fractional) even under ``search=False``: a
neighbourhood is small, and its rounding alone loses what the rounds exist to find.

The result is the optimum of its last neighbourhood, not a proven optimum: status
"FEASIBLE", and the lower bound is Σ per-node minima + Σ per-edge minima (valid for
any assignment, weak). Deterministic when the request has no wall-clock limit: each
round gets a share of the deterministic limit; with one, each round may use half of the
wall-clock time left (a round's search rarely pays for more).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from ._clock import Deadline
from ._evaluate import evaluate
from ._heuristic import best_assignment, greedy_assignment
from ._lagrangian import starts_that_fit
from ._request import InfeasibleError, IntraOpRequest, IntraOpResult

_log = logging.getLogger("autoshard.ilp")

#: edge-grid cells (Σ over edges of src strategies × dst strategies) above which a
#: request with strategy labels is solved over neighbourhoods. A GPT layer on a 2-D mesh
#: is ~0.1 M cells (whole problem solved in seconds); on a 3-axis mesh ~1 M.
LARGE_PROBLEM_CELLS = 500_000
#: rounds at most; each moves every node by at most one axis
MAX_ROUNDS = 8
#: relative improvement below which a round counts as finding nothing better (on deep
#: models the last rounds shave fractions of a percent at seconds each)
_IMPROVEMENT = 1e-3


def grid_cells(request: IntraOpRequest) -> int:
    """Σ over edges of (strategies of src) × (strategies of dst): the problem's size."""
    return sum(int(edge.cost.size) for edge in request.edges)


def needs_neighbourhoods(request: IntraOpRequest) -> bool:
    """Whether ``request`` is labelled and too large to solve whole."""
    return request.strategy_labels is not None and grid_cells(request) > LARGE_PROBLEM_CELLS


def neighbourhood(labels: tuple[np.ndarray, ...], choices) -> tuple[np.ndarray, ...]:
    """Per node, a mask of the strategies whose labels differ from the chosen one's in at
    most one place (the chosen strategy included)."""
    return tuple((node_labels != node_labels[c]).sum(axis=1) <= 1
                 for node_labels, c in zip(labels, choices))


def solved_in_neighbourhoods(request: IntraOpRequest) -> bool:
    """Whether ``solve_intra_op`` solves ``request`` over neighbourhoods of a plan
    (after tying repeated layers, when the request ties them): a labelled problem too
    large to solve whole."""
    if not needs_neighbourhoods(request):  # tying only shrinks a request: no need to tie
        return False
    if request.ties:
        request = request.tied_structure
    return needs_neighbourhoods(request)


def solve_in_neighbourhoods(request: IntraOpRequest,
                            solve: Callable[[IntraOpRequest], IntraOpResult]) -> IntraOpResult:
    """Rounds of ``solve`` (the exact solver) over neighbourhoods of the current plan,
    starting from ``request.hint`` (else a greedy plan), or from a plan found from
    ``request.guide`` that fits and costs less; the best plan found."""
    start = time.perf_counter()
    deadline = Deadline.of(request.wall_time_limit_s, request.time_limit_s)
    current = request.hint if request.hint is not None else greedy_assignment(request)
    if request.guide is not None and request.memory_budget is not None:
        # plans that fit between the guide and the budget: rounds from a plan far below
        # the budget stay there (the cheaper plans lie across plans that do not fit)
        candidates = starts_that_fit(request, request.guide, solve, deadline) + [current]
        current = best_assignment(request, candidates) or current
    checked = evaluate(request, current)
    best = checked.objective if checked.ok else np.inf
    last = None
    rounds = 0
    for rounds in range(1, MAX_ROUNDS + 1):
        allowed = neighbourhood(request.strategy_labels, current)
        restricted = dataclasses.replace(
            request, strategy_labels=None, hint=tuple(current), guide=None,
            node_costs=tuple(np.where(mask, cost, np.inf)
                             for mask, cost in zip(allowed, request.node_costs)),
            time_limit_s=request.time_limit_s * 2 / MAX_ROUNDS, search=True,
            wall_time_limit_s=None if deadline.at is None else deadline.remaining_s() / 2)
        try:
            result = solve(restricted)
        except InfeasibleError:
            if last is None:  # nothing fits yet: not even the first neighbourhood
                raise
            break
        _log.info("neighbourhood round %d: %d strategies allowed, %.4g s per step (%s)",
                  rounds, int(sum(int(m.sum()) for m in allowed)), result.objective,
                  result.stats.solver_status)
        gain = best - result.objective  # inf when the starting plan broke the budget
        last = result
        if result.objective < best:
            best, current = result.objective, result.choices
        if not gain > _IMPROVEMENT * abs(best) or deadline.remaining_s() <= 0:
            break
    floor = sum(float(np.min(c)) for c in request.node_costs) + \
        sum(float(np.min(e.cost)) for e in request.edges)  # shared costs may all go unpaid
    objective = float(best)
    lower_bound = min(objective, floor)
    gap = (objective - lower_bound) / abs(objective) if objective else 0.0
    stats = dataclasses.replace(last.stats, neighbourhood_rounds=rounds,
                                input_edges=len(request.edges))
    return IntraOpResult(choices=tuple(int(c) for c in current), objective=objective,
                         lower_bound=lower_bound, gap=gap, status="FEASIBLE",
                         solve_time_s=time.perf_counter() - start,
                         num_variables=last.num_variables,
                         num_constraints=last.num_constraints, stats=stats)
