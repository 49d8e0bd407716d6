"""Exact problem reductions applied before a model is built.

1. Forbidden (inf) strategies are dropped; ``keep[v]`` maps kept -> original index.
2. Parallel edges (either direction) between the same pair are summed into one
   matrix oriented ``a < b``.
3. Every edge matrix is reparametrised Hungarian-style: row minima fold into the
   src cost vector, then column minima into the dst vector. The residual is >= 0
   with a zero in every row and column; it is identically 0 exactly when the
   matrix was separable (``cost[i, j] = a[i] + b[j]``, which includes all-zero
   matrices), and such edges disappear. Because the linking constraints are
   equalities this changes neither the optimum nor the LP relaxation.
4. An edge with a single-strategy endpoint folds into the other node's vector.
5. ``inf`` cells forbid pairs; a strategy whose whole row/column is inf, or that
   becomes inf through folding, is dropped, and affected edges are revisited
   until a fixpoint.

Costs stay float seconds here; integer scaling happens in the model builder.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ._request import IntraOpRequest

#: residual entries below this fraction of the edge's largest |cost| count as 0.
_ZERO_RTOL = 1e-12


@dataclass(frozen=True, eq=False)
class ReducedProblem:
    """Reduced view of a request, all indices over kept strategies."""

    keep: tuple[np.ndarray, ...]  # original strategy indices kept per node
    cost: tuple[np.ndarray, ...]  # seconds per kept strategy, folded edge terms included
    edges: tuple[tuple[int, int, np.ndarray], ...]  # (a, b, residual seconds >= 0 or inf), a < b
    # distinct points: (node, bytes per kept strategy) and (a, b, bytes per kept pair), a < b
    points: tuple[tuple[tuple, ...], ...]
    dropped_strategies: int
    merged_edges: int
    folded_edges: int

    def __repr__(self) -> str:
        return (
            f"ReducedProblem(nodes={len(self.keep)}, edges={len(self.edges)}, points={len(self.points)}, "
            f"dropped_strategies={self.dropped_strategies}, merged_edges={self.merged_edges}, "
            f"folded_edges={self.folded_edges})"
        )


def _finite_min(matrix: np.ndarray, axis: int) -> np.ndarray:
    return np.where(np.isfinite(matrix), matrix, np.inf).min(axis=axis)


def reduce_request(request: IntraOpRequest) -> ReducedProblem:
    """Apply the exact reductions above; raises ``ValueError`` if inf pairs leave a node no strategy."""
    n = request.num_nodes
    keep = [np.flatnonzero(np.isfinite(c)) for c in request.node_costs]
    cost = [request.node_costs[v][keep[v]].copy() for v in range(n)]
    dropped = sum(request.num_strategies(v) - len(keep[v]) for v in range(n))
    edges, merged = _merged_edges(request, keep)
    folded = _EdgeFolding(request, keep, cost, edges).run()
    return ReducedProblem(
        keep=tuple(keep),
        cost=tuple(cost),
        edges=tuple((a, b, edges[(a, b)]) for a, b in sorted(edges)),
        points=_reduced_points(request, keep),
        dropped_strategies=dropped,
        merged_edges=merged,
        folded_edges=folded,
    )


def _merged_edges(request: IntraOpRequest, keep) -> tuple[dict[tuple[int, int], np.ndarray], int]:
    """Edge matrices over kept strategies, oriented ``a < b``, parallel edges summed; and
    how many were merged into another."""
    edges: dict[tuple[int, int], np.ndarray] = {}
    merged = 0
    for edge in request.edges:
        a, b = edge.src, edge.dst
        matrix = edge.cost[np.ix_(keep[a], keep[b])]
        if a > b:
            a, b, matrix = b, a, matrix.T
        if (a, b) in edges:
            edges[(a, b)] = edges[(a, b)] + matrix
            merged += 1
        else:
            edges[(a, b)] = np.array(matrix, dtype=np.float64)
    return edges, merged


class _EdgeFolding:
    """Reductions 3-5 to a fixpoint, in place on ``keep``, ``cost`` and ``edges``: every
    edge reparametrised, separable and single-strategy edges folded into node costs,
    strategies forbidden by inf cells dropped (revisiting the edges they touch)."""

    def __init__(self, request: IntraOpRequest, keep, cost, edges):
        self.request, self.keep, self.cost, self.edges = request, keep, cost, edges
        self.adjacency: list[dict[tuple[int, int], None]] = [{} for _ in range(len(keep))]
        for key in sorted(edges):
            self.adjacency[key[0]][key] = None
            self.adjacency[key[1]][key] = None
        self.queue = deque(sorted(edges))
        self.queued = set(self.queue)
        self.folded = 0

    def run(self) -> int:
        """Reduce until no edge changes; returns the number of edges folded away."""
        while self.queue:
            key = self.queue.popleft()
            self.queued.discard(key)
            if key in self.edges:
                self._visit(key)
        return self.folded

    def _push(self, key: tuple[int, int]) -> None:
        if key not in self.queued:
            self.queued.add(key)
            self.queue.append(key)

    def _remove(self, key: tuple[int, int]) -> None:
        del self.edges[key]
        del self.adjacency[key[0]][key]
        del self.adjacency[key[1]][key]
        self.folded += 1

    def _restrict(self, v: int) -> None:
        """Drop node ``v``'s strategies that became inf, and revisit its edges."""
        mask = np.isfinite(self.cost[v])
        if mask.all():
            return
        if not mask.any():
            raise ValueError(
                f"{self.request.label(v)}: no strategy is compatible with its neighbours "
                "(every combination is forbidden by inf edge costs)"
            )
        self.keep[v] = self.keep[v][mask]
        self.cost[v] = self.cost[v][mask]
        for key in self.adjacency[v]:
            matrix = self.edges[key]
            self.edges[key] = matrix[mask, :] if key[0] == v else matrix[:, mask]
            self._push(key)

    def _visit(self, key: tuple[int, int]) -> None:
        a, b = key
        cost, matrix = self.cost, self.edges[key]
        finite = np.isfinite(matrix)
        rows_ok, cols_ok = finite.any(axis=1), finite.any(axis=0)
        if not (rows_ok.all() and cols_ok.all()):
            cost[a][~rows_ok] = np.inf
            cost[b][~cols_ok] = np.inf
            self._restrict(a)
            self._restrict(b)
            return
        rows, cols = matrix.shape
        if cols == 1 or rows == 1:
            if cols == 1:
                cost[a] = cost[a] + matrix[:, 0]
            else:
                cost[b] = cost[b] + matrix[0, :]
            self._remove(key)
            self._restrict(a)
            self._restrict(b)
            return
        tol = _ZERO_RTOL * float(np.abs(matrix[finite]).max())
        row_min = _finite_min(matrix, axis=1)
        matrix = matrix - row_min[:, None]
        col_min = _finite_min(matrix, axis=0)
        matrix = matrix - col_min[None, :]
        cost[a] = cost[a] + row_min
        cost[b] = cost[b] + col_min
        matrix[np.abs(matrix) <= tol] = 0.0
        if not matrix.any():
            self._remove(key)
        else:
            self.edges[key] = matrix


def _reduced_points(request: IntraOpRequest, keep) -> tuple[tuple[tuple, ...], ...]:
    """The request's distinct memory points over kept strategies."""
    memory = None
    if request.node_memory is not None:
        memory = tuple(request.node_memory[v][keep[v]] for v in range(request.num_nodes))
    points: dict[tuple, tuple] = {}
    for point in request.memory_points:
        nodes = sorted(set(point))
        if nodes:
            points[tuple(nodes)] = tuple((v, memory[v]) for v in nodes)
    for point in request.memory_terms:
        terms = _reduced_terms(point, keep)
        if terms:
            points[tuple((*term[:-1], term[-1].tobytes()) for term in terms)] = terms
    return tuple(points.values())


def _reduced_terms(point, keep) -> tuple:
    """A point's terms over kept strategies, summed per node and per node pair.

    Pair terms are oriented ``a < b``; one whose end has a single kept strategy
    becomes a term of the other node (both single: a constant on ``a``).
    """
    nodes: dict[int, np.ndarray] = {}
    pairs: dict[tuple[int, int], np.ndarray] = {}

    def add(table, key, values):
        table[key] = table[key] + values if key in table else values

    for *ends, values in point:
        if len(ends) == 1:
            add(nodes, ends[0], values[keep[ends[0]]])
            continue
        a, b = ends
        matrix = values[np.ix_(keep[a], keep[b])]
        if a > b:
            a, b, matrix = b, a, matrix.T
        if len(keep[b]) == 1:
            add(nodes, a, matrix[:, 0])
        elif len(keep[a]) == 1:
            add(nodes, b, matrix[0, :])
        else:
            add(pairs, (a, b), matrix)
    return tuple((v, nodes[v]) for v in sorted(nodes)) + \
        tuple((a, b, pairs[(a, b)]) for a, b in sorted(pairs))
