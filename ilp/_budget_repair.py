"""Move an assignment that breaks its request's memory budget until it fits, giving up
as little of its objective as it can: a start for the budgeted search next to the
unconstrained optimum, where the cheapest preset-like plan that fits may be far below
the budget (and far dearer)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._evaluate import MEMORY_RTOL, evaluate, point_memory
from ._heuristic import incident_edges
from ._request import IntraOpRequest

MAX_PASSES = 30


def fit_to_budget(request: IntraOpRequest, choices: Sequence[int], *,
                  max_excess: float | None = None,
                  max_passes: int = MAX_PASSES) -> tuple[int, ...] | None:
    """``choices`` (one strategy per node) moved until every memory point of ``request``
    is within ``request.memory_budget``, or None if that takes more than ``max_passes``
    passes, no move saves memory, or (with ``max_excess``) ``choices`` peak more than
    that fraction over the budget. Each pass prices, for every node of a point over the
    budget, each of its strategies: bytes it takes off the points over budget (counted
    up to each point's excess) and objective seconds it adds (its own cost and its edges
    to the current neighbours); then moves nodes in order of seconds per byte, one
    strategy each, until the estimated savings cover every excess. When the request
    ties repeated layers, their classes move as one. Deterministic."""
    if request.memory_budget is None:
        return tuple(int(c) for c in choices)
    budget = request.memory_budget * (1.0 + MEMORY_RTOL)
    choices = [int(c) for c in choices]
    used = point_memory(request, choices)
    if max_excess is not None and max(used, default=0.0) > (1 + max_excess) * request.memory_budget:
        return None
    incident = incident_edges(request.num_nodes, ((e.src, e.dst, e.cost) for e in request.edges))
    groups = _groups(request)
    for _ in range(max_passes):
        excess = {p: u - budget for p, u in enumerate(used) if u > budget}
        if not excess:
            return tuple(choices) if evaluate(request, choices).ok else None
        points = sorted(excess)
        cap = np.array([excess[p] for p in points])[:, None]
        saved = _savings(request, choices, points)   # node -> [point, strategy] bytes
        moves, group_saved = [], {}
        for g, members in enumerate(groups):
            members = [v for v in members if v in saved]
            if not members:
                continue
            by_point = sum(saved[v] for v in members)
            seconds = 0.0
            for v in members:
                seconds = seconds + request.node_costs[v] - request.node_costs[v][choices[v]]
                for u, matrix in incident[v]:
                    seconds = seconds + matrix[:, choices[u]] - matrix[choices[v], choices[u]]
            useful = np.minimum(np.maximum(by_point, 0.0), cap).sum(axis=0)
            group_saved[g] = by_point
            for s in np.flatnonzero((useful > 0) & np.isfinite(seconds)):
                moves.append((max(float(seconds[s]), 0.0) / float(useful[s]), g, int(s)))
        if not moves:
            return None
        covered = np.zeros(len(points))
        moved = set()
        for _, g, s in sorted(moves):
            if g in moved:
                continue
            for v in groups[g]:
                choices[v] = s
            moved.add(g)
            covered += group_saved[g][:, s]
            if (covered >= cap[:, 0]).all():
                break
        used = point_memory(request, choices)
    return None


def _groups(request: IntraOpRequest) -> list[list[int]]:
    """Nodes that move together: the repeated layers' classes when the request ties them
    (so the result survives tying), else each node alone."""
    if not request.ties:  # (classes as many as nodes: each node alone too)
        return [[v] for v in range(request.num_nodes)]
    return request.repeats.members()


def _savings(request: IntraOpRequest, choices: Sequence[int], points: Sequence[int]
             ) -> dict[int, np.ndarray]:
    """Per node in one of ``points`` (over budget): bytes each of its strategies takes
    off each of them (rows in ``points`` order), the other nodes as ``choices`` has them."""
    row = {p: i for i, p in enumerate(points)}
    saved: dict[int, np.ndarray] = {}

    def add(v: int, p: int, after: np.ndarray) -> None:
        if v not in saved:
            saved[v] = np.zeros((len(points), len(request.node_costs[v])))
        saved[v][row[p]] += after[choices[v]] - after

    simple = len(request.memory_points)
    for p in points:
        if p < simple:
            for v in sorted(set(request.memory_points[p])):
                add(v, p, request.node_memory[v])
            continue
        for *nodes, memory in request.memory_terms[p - simple]:
            if len(nodes) == 1:
                add(nodes[0], p, memory)
            else:
                a, b = nodes
                add(a, p, memory[:, choices[b]])
                add(b, p, memory[choices[a], :])
    return saved
