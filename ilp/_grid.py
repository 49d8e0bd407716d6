"""An edge's residual cost over classes of strategies: the cells both solvers price.

Strategies of one endpoint that an edge (and every resharding copy on it) sees
alike share a row (or column) of the grid; each finite cell becomes one variable
in the CP-SAT model and in its LP relaxation, linked to the endpoints' strategy
variables by ``Σ_l cell[k, l] = Σ_{i in class k} s_a[i]`` and the column analogue.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class EdgeGrid:
    """Edge ``a -> b`` (a < b) of a reduced problem, over strategy classes.

    ``row_of[i]``: class of a's kept strategy i; ``rows``: a representative strategy
    per class (likewise ``col_of`` / ``cols`` for b). ``cost[k, l]``: residual seconds
    of the classes' pair (``inf`` forbids it).
    """

    a: int
    b: int
    row_of: np.ndarray
    rows: tuple[int, ...]
    col_of: np.ndarray
    cols: tuple[int, ...]
    cost: np.ndarray

    @property
    def finite(self) -> np.ndarray:
        return np.isfinite(self.cost)

    def block(self, matrix: np.ndarray) -> np.ndarray:
        """``matrix`` over kept strategy pairs restricted to the class representatives."""
        return matrix[np.ix_(self.rows, self.cols)]

    def __repr__(self) -> str:
        return f"EdgeGrid({self.a} -> {self.b}, cells={self.cost.shape[0]}x{self.cost.shape[1]})"


def edge_grid(a: int, b: int, matrix: np.ndarray, copies: tuple[np.ndarray, ...] = ()) -> EdgeGrid:
    """Group a's (rows) and b's (columns) strategies that ``matrix`` and ``copies`` see alike."""
    row_of, rows = strategy_classes(np.concatenate([matrix, *copies], axis=1))
    col_of, cols = strategy_classes(np.concatenate([matrix.T, *(c.T for c in copies)], axis=1))
    cost = matrix[np.ix_(rows, cols)]
    for array in (row_of, col_of, cost):
        array.flags.writeable = False  # shared by the grids of equal edges
    return EdgeGrid(a, b, row_of, tuple(rows), col_of, tuple(cols), cost)


def strategy_classes(matrix: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Rows of ``matrix`` grouped when identical: (class of each row, a representative per class).

    Strategies that differ only in ways an edge cannot see (e.g. a dot split on its
    contraction vs. replicated, both producing the same layout) share one row; the
    edge's grid is then built over classes, an exact reformulation that keeps the
    local-marginal LP relaxation (Σ_l e[k, l] = Σ_{i in class k} s_a[i]).
    """
    _, first, inverse = np.unique(matrix, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)                 # classes numbered by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)], [int(first[c]) for c in order]


def edge_grids(reduced, rows) -> list[EdgeGrid]:
    """A grid per edge of ``reduced`` (a ``ReducedProblem``), plus a zero-cost one per pair
    whose copies count in a memory row (``rows``: (terms, bound) pairs)."""
    pair_memory: dict[tuple[int, int], list[np.ndarray]] = {}
    for terms, _ in rows:
        for *ends, coef in terms:
            if len(ends) == 2:
                pair_memory.setdefault(tuple(ends), []).append(coef)
    model_edges = list(reduced.edges) + [
        (a, b, np.zeros((len(reduced.keep[a]), len(reduced.keep[b]))))
        for a, b in sorted(set(pair_memory) - {(a, b) for a, b, _ in reduced.edges})]
    made: dict = {}  # repeated layers' edges hold equal cells: each grouping made once
    grids = []
    for a, b, matrix in model_edges:
        copies = tuple(pair_memory.get((a, b), ()))
        key = (matrix.shape, matrix.tobytes(), tuple((c.shape, c.tobytes()) for c in copies))
        if key not in made:
            made[key] = edge_grid(a, b, matrix, copies)
        grids.append(dataclasses.replace(made[key], a=a, b=b))
    return grids
