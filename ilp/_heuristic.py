"""Heuristic assignments: greedy construction and iterated conditional modes (memory ignored)."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import numpy as np

from ._evaluate import evaluate
from ._reduce import ReducedProblem
from ._request import IntraOpRequest


def polish(costs: Sequence[np.ndarray], edges, start: list[int],
           max_sweeps: int = 100, incident=None) -> list[int]:
    """Iterated conditional modes: move one node at a time to its best strategy given its
    neighbours' current strategies until no move helps. Nodes are visited in index order
    and ties keep the current choice, so the result is deterministic.

    A sweep visits only the nodes a neighbour's move touched since they were last visited
    (the others would stay put): the same moves as visiting every node in every sweep, in
    time proportional to the moves (a deep model's sweeps each move a few nodes).
    ``incident``: ``incident_edges(len(costs), edges)``, when the caller has it."""
    n = len(costs)
    incident = incident_edges(n, edges) if incident is None else incident
    choice = list(start)
    movable = [bool(incident[v]) and len(costs[v]) > 1 for v in range(n)]
    touched = [v for v in range(n) if movable[v]]
    for _ in range(max_sweeps):
        if not touched:
            break
        queue, queued = list(touched), set(touched)  # this sweep, in index order
        heapq.heapify(queue)
        touched = set()  # the next sweep's: touched at or before where this sweep was
        while queue:
            v = heapq.heappop(queue)
            total = costs[v].copy()
            for u, matrix in incident[v]:
                total += matrix[:, choice[u]]
            best = int(np.argmin(total))
            if total[best] < total[choice[v]]:
                choice[v] = best
                for u, _ in incident[v]:
                    if not movable[u]:
                        continue
                    if u > v and u not in queued:
                        heapq.heappush(queue, u)
                        queued.add(u)
                    elif u < v:
                        touched.add(u)
        touched = sorted(touched)
    return choice


def incident_edges(num_nodes: int, edges) -> list[list[tuple[int, np.ndarray]]]:
    """Per node, ``(neighbour, matrix)`` for each of its ``(a, b, matrix)`` edges, the
    matrix indexed [this node's strategy, the neighbour's]."""
    incident: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(num_nodes)]
    for a, b, matrix in edges:
        incident[a].append((b, matrix))
        incident[b].append((a, matrix.T))
    return incident


def local_search(reduced: ReducedProblem, start: list[int], max_sweeps: int = 100) -> list[int]:
    """Improve ``start`` (kept-strategy index per node of the reduced problem) by ICM."""
    return polish(reduced.cost, reduced.edges, start, max_sweeps=max_sweeps)


def greedy_assignment(request: IntraOpRequest,
                      allowed: Mapping[int, Sequence[int]] | None = None,
                      improve: bool = True) -> tuple[int, ...]:
    """A complete assignment built without the solver (memory constraints ignored).

    Nodes are taken in index order (a traced program's topological order); each picks
    the strategy cheapest given its own cost and its edges to nodes already placed: a
    one-pass propagation of the layouts placed first. ``allowed`` restricts some nodes
    to the listed strategies (e.g. a hand-written layout of the inputs). With
    ``improve`` the result is then improved by iterated conditional modes within those
    restrictions. Seeds the solver with plans in the style of the presets, so that a
    search stopped by its time limit never returns worse than them.

    A request that ties repeated layers (``tie_repeats``, no memory points) is planned as
    the solver plans it: the greedy plan of its tied request (``repeats``' classes, each
    restricted to the options its restricted members share), expanded to every node.
    """
    return greedy_assignments(request, [allowed], improve)[0]


def greedy_assignments(request: IntraOpRequest,
                       restrictions: Sequence[Mapping[int, Sequence[int]] | None],
                       improve: bool = True) -> list[tuple[int, ...]]:
    """``greedy_assignment`` under each of ``restrictions`` (one plan each), the request's
    edges gathered once for all of them."""
    if request.ties:
        classes = request.repeats
        plans = greedy_assignments(request.tied_structure,
                                   [_restricted_classes(allowed, classes.of_node)
                                    for allowed in restrictions], improve)
        return [classes.expand(plan) for plan in plans]
    n = request.num_nodes
    edges = [(e.src, e.dst, e.cost) for e in request.edges]
    earlier: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]
    for a, b, matrix in edges:
        if a < b:
            earlier[b].append((a, matrix.T))
        elif b < a:
            earlier[a].append((b, matrix))
    incident = incident_edges(n, edges) if improve else None
    plans = []
    for allowed in restrictions:
        costs = [np.asarray(c, dtype=np.float64) for c in request.node_costs]
        for v, options in (allowed or {}).items():
            mask = np.full(len(costs[v]), np.inf)
            mask[list(options)] = 0.0
            costs[v] = costs[v] + mask
        choice = [0] * n
        for v in range(n):
            total = costs[v].copy()
            for u, matrix in earlier[v]:
                total += matrix[:, choice[u]]
            if not np.isfinite(total).any():
                total = costs[v]
            choice[v] = int(np.argmin(total))
        plans.append(tuple(polish(costs, edges, choice, incident=incident)) if improve
                     else tuple(choice))
    return plans


def _restricted_classes(allowed: Mapping[int, Sequence[int]] | None, of_node: Sequence[int]
                        ) -> dict[int, list[int]] | None:
    """``allowed`` (node -> strategies) as class -> the strategies all its restricted
    members allow (a class whose members share none stays unrestricted)."""
    if not allowed:
        return allowed
    shared: dict[int, set[int]] = {}
    for v, options in allowed.items():
        c = of_node[v]
        shared[c] = set(options) if c not in shared else shared[c] & set(options)
    return {c: sorted(options) for c, options in shared.items() if options}


def best_assignment(request: IntraOpRequest, candidates: Sequence[Sequence[int]]
                    ) -> tuple[int, ...] | None:
    """The feasible candidate with the lowest objective (first on ties), or None."""
    best, best_cost = None, np.inf
    for candidate in candidates:
        result = evaluate(request, tuple(candidate))
        if result.ok and result.objective < best_cost:
            best, best_cost = tuple(int(c) for c in candidate), result.objective
    return best
