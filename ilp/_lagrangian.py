"""Plans that fit a memory budget, found by pricing memory (Lagrangian relaxation).

A request too large to solve whole is searched one neighbourhood at a time from a plan
that fits. When the unconstrained optimum (the ``guide``) peaks far over the budget,
neither it nor its greedy repair (``fit_to_budget``) is a good start, and the plans
that fit among the starting plans may lie far below the budget: rounds from them stay
there, since the cheaper plans that fit lie across plans that do not. Pricing memory
instead of bounding it crosses over: the budget is dropped, each byte at the points
where the guide overflows costs ``rate`` seconds, and the unconstrained search runs
from the guide. A high rate gives a plan far below the budget, a low one a plan near the
guide; between them lies a plan a little over the budget, which ``fit_to_budget`` moves
inside it cheaply.

Measured on the 70B-shaped GPT (80 layers, 8x8x8, h100-80gb, 79 GiB), tied: the guide
costs 2.305 s per step at 178 GiB, the best starting plan that fits 3.250 s (the search
from it ends there). With the rate r = (guide's seconds) / (budget's bytes) scaled by
2^k: k >= -5 gives 3.138 s at 35.6 GiB; k = -5.5 gives 2.506 s at 94.7 GiB, repaired to
2.713 s at 75.0 GiB; k = -6 gives 2.485 s at 98.0 GiB, repaired to 2.692 s at 78.3 GiB.
(Within the planner's minute the probes get a share of the time left and end sooner:
k = -4 fits at 3.09 s, k = -6 is repaired to 2.82 s, the plan.)

A third probe runs when there is room for it. At 40 layers (half the time goes unused
after two probes) k = -4 fits at 1.528 s per step and 40.0 GiB, k = -6 returns the guide
(110 GiB, repaired to 1.703 s), and k = -5 fits at 1.355 s and 63.5 GiB: the plan is
1.161 s at 51.7 GiB, against 1.231 s at 40.5 GiB after two probes. At 80 layers three
probes sharing the time each end too soon (the plan: 3.627 s per step, against 3.109 s
with two); given room, the third (k = -5: 3.422 s at 55.7 GiB) leaves the plan at 3.109 s.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from ._budget_repair import fit_to_budget
from ._clock import Deadline
from ._evaluate import evaluate
from ._request import IntraOpRequest, IntraOpResult
from ._request_parts import EdgeCost

_log = logging.getLogger("autoshard.ilp")

#: solves of the priced request at most (each a search over neighbourhoods)
PROBES = 3
#: the probes sharing the time: those after them run only while the time left is at least
#: ``ROOM`` times the longest probe so far (they take the same share each)
SHARED_PROBES = 2
ROOM = 4.0
#: the exponents k of the rates 2^k (guide's seconds / budget's bytes) bisected: the
#: first probe is their middle
LOWEST, HIGHEST = -8.0, 0.0
#: of the wall-clock time left, the part the probes share (the rest: rounds from the best
#: start; a probe's LP alone takes about 2 s on the 70B-shaped GPT above)
SHARE = 0.75
#: a priced plan is repaired when it peaks at most this fraction over the budget
REPAIR_EXCESS = 0.5


def priced_memory(request: IntraOpRequest, rates: Sequence[float]) -> IntraOpRequest:
    """``request`` without its budget: each memory point's bytes charged ``rates[p]``
    seconds per byte instead (node terms on node costs, pair terms as edges)."""
    costs = [np.asarray(c, dtype=np.float64) for c in request.node_costs]
    edges = list(request.edges)
    for rate, point in zip(rates, request.memory_terms, strict=True):
        if rate <= 0:
            continue
        for term in point:
            if len(term) == 2:
                costs[term[0]] = costs[term[0]] + rate * term[1]
            else:
                edges.append(EdgeCost(term[0], term[1], rate * term[2]))
    return dataclasses.replace(request, node_costs=tuple(costs), edges=tuple(edges),
                               memory_terms=(), memory_budget=None, guide=None)


def starts_that_fit(request: IntraOpRequest, guide: Sequence[int],
                    solve: Callable[[IntraOpRequest], IntraOpResult], deadline: Deadline,
                    probes: int = PROBES) -> list[tuple[int, ...]]:
    """Plans within ``request``'s budget found from ``guide`` (a plan over it): each
    probe solves the request with memory priced (from the guide, with ``solve``), and
    keeps the plan, or its repair when it overflows a little. The rate's exponent is
    bisected: lowered after a plan that fits, raised after one that does not. Empty
    when the guide fits. With a wall-clock ``deadline`` the first ``SHARED_PROBES`` share
    ``SHARE`` of the time left, and each later one runs with the same share while
    ``ROOM`` times the longest probe so far is left."""
    start = evaluate(request, guide)  # its objective: seconds, whatever the budget
    over = np.asarray(start.memory_by_point) > request.memory_budget
    if not over.any():
        return []
    unit = max(start.objective, 1e-12) / max(request.memory_budget, 1.0)
    low, high, found = LOWEST, HIGHEST, []
    shared = min(probes, SHARED_PROBES)
    share = None if deadline.at is None else deadline.remaining_s() * SHARE / shared
    longest = 0.0
    for probe in range(probes):
        if probe >= shared and deadline.remaining_s() < ROOM * longest:
            break
        k = (low + high) / 2
        begun = time.perf_counter()
        limit = None if share is None else min(share, deadline.remaining_s())
        result = solve(priced_memory(request, unit * 2.0 ** k * over).with_options(
            hint=tuple(guide), wall_time_limit_s=limit))
        checked = evaluate(request, result.choices)
        repaired = fit_to_budget(request, result.choices, max_excess=REPAIR_EXCESS)
        _log.info("memory priced at 2^%g of the guide's rate: %.4g s per step at %.4g GiB%s",
                  k, checked.objective, max(checked.memory_by_point) / 2**30,
                  "" if checked.ok else ", repaired to %.4g s" % evaluate(
                      request, repaired).objective if repaired is not None else
                  ", too far over to repair")
        longest = max(longest, time.perf_counter() - begun)
        if repaired is not None:
            found.append(repaired)
        if checked.ok:
            high = k
        else:
            low = k
    return found
