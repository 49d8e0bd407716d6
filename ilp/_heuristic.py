"""Greedy warm start: iterated conditional modes on the reduced problem (seconds, memory ignored)."""

from __future__ import annotations

import numpy as np

from ._reduce import ReducedProblem


def local_search(reduced: ReducedProblem, start: list[int], max_sweeps: int = 100) -> list[int]:
    """Improve ``start`` (kept-strategy index per node) one node at a time until no move helps.

    Each move picks, for one node, the strategy minimising its own cost plus the
    residual cost of its edges given the neighbours' current strategies. Nodes are
    visited in index order, ties keep the current choice, so the result is deterministic.
    """
    n = len(reduced.keep)
    incident: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]
    for a, b, matrix in reduced.edges:
        incident[a].append((b, matrix))
        incident[b].append((a, matrix.T))
    choice = list(start)
    order = [v for v in range(n) if incident[v] and len(reduced.keep[v]) > 1]
    for _ in range(max_sweeps):
        changed = False
        for v in order:
            total = reduced.cost[v].copy()
            for u, matrix in incident[v]:
                total += matrix[:, choice[u]]
            best = int(np.argmin(total))
            if total[best] < total[choice[v]]:
                choice[v] = best
                changed = True
        if not changed:
            break
    return choice
