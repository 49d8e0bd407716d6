"""The local-marginal LP relaxation of the intra-op problem, solved with HiGHS.

Same variables and rows as the CP-SAT model in ``_intra_op`` (one-hot strategy
variables per active node, one cell variable per finite cell of every edge grid,
the marginal equalities linking them, the memory rows, a variable per shared cost
above each member node's member values), with 0 <= x instead of
x in {0, 1}. On the programs autoshard traces (chains and trees with skip edges)
this LP is very often integral: its optimum is then the ILP's optimum, proven, and
CP-SAT is not needed (a 24-layer GPT on a (2, 4) mesh: 108k variables, integral,
~2 s, where CP-SAT spent its whole time limit proving a 1.5% gap). When it is
fractional its objective is still a lower bound and its largest values a starting
point for the search.

HiGHS comes with OR-Tools (its model builder, filled from scipy sparse matrices)
and runs with ``threads=1``: with its default thread pool, degenerate LPs (many
equal-cost optima) returned different optimal vertices from run to run under CPU
load (2 of 60 solves through ``scipy.optimize.linprog``), which broke the identical
plans every process of a ``jax.distributed`` run must make. Costs are scaled so the
largest coefficient is ``_OBJECTIVE_RANGE``, well above the solver's tolerances.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sparse
from ortools.linear_solver.python import model_builder

from ._grid import EdgeGrid
from ._interrupt import run_interruptibly

#: seconds of dual simplex per (row x variable) of the LP, measured on a 2-core x86 box
#: (13k x 108k: 1.8 s; 149k x 1.26M: 253 s). The LP is skipped when this estimate
#: exceeds the caller's time limit: a deterministic rule, unlike a wall-clock stop.
SECONDS_PER_ROW_VARIABLE = 1.3e-9
#: the largest objective coefficient after scaling.
_OBJECTIVE_RANGE = 1e3
#: a node whose largest strategy value is at least 1 - this counts as decided.
_INTEGRAL_TOL = 1e-6


@dataclass(frozen=True)
class Relaxation:
    """Outcome of the LP relaxation.

    ``bound``: seconds, a lower bound on every feasible assignment (valid only when
    ``solved``); ``infeasible``: the LP (hence the ILP) has no feasible point.
    ``position``: per active node, the kept-strategy index with the largest LP value.
    ``integral``: every node decided, so ``position`` is optimal.
    """

    solved: bool
    infeasible: bool
    bound: float
    position: Mapping[int, int]
    integral: bool
    num_variables: int
    num_constraints: int
    wall_time_s: float

    def __repr__(self) -> str:
        return (f"Relaxation(solved={self.solved}, infeasible={self.infeasible}, "
                f"bound={self.bound:.6g} s, integral={self.integral}, "
                f"variables={self.num_variables}, constraints={self.num_constraints}, "
                f"wall_time_s={self.wall_time_s:.3f})")


def solve_relaxation(sizes: Sequence[int], active: Sequence[int],
                     node_cost: Mapping[int, np.ndarray], grids: Sequence[EdgeGrid],
                     memory_rows, shared, constant: float,
                     time_limit_s: float, backstop_s: float,
                     on_wait: Callable[[], None] | None = None) -> Relaxation:
    """Solve the LP over ``active`` nodes (``sizes[v]`` kept strategies each).

    ``node_cost[v]``: seconds per kept strategy; ``constant``: seconds added to the
    objective; ``memory_rows``: ``(terms, rhs)`` as built for CP-SAT (node terms
    ``(v, units)``, pair terms ``(a, b, units[i, j])``); ``shared``: ``(seconds,
    {node: [kept index, ...]})`` charges, each a variable >= every member node's sum
    of member strategy values. An LP estimated to take
    longer than ``time_limit_s`` is not attempted; ``backstop_s`` is a wall-clock stop
    (the caller's wall-clock budget left, or one against pathological slowness). Either
    reports ``solved=False``. ``on_wait()`` runs every fraction of a second meanwhile.
    """
    start = time.perf_counter()
    num_vars = (sum(sizes[v] for v in active) + sum(int(g.finite.sum()) for g in grids)
                + len(shared))
    num_constraints = (len(active) + sum(sum(g.cost.shape) for g in grids) + len(memory_rows)
                       + sum(len(members) for _, members in shared))
    estimate = SECONDS_PER_ROW_VARIABLE * num_constraints * num_vars
    if estimate > time_limit_s:
        return Relaxation(False, False, -np.inf, {}, False, num_vars, num_constraints,
                          time.perf_counter() - start)
    lp = _LinearProgram(sizes, active, node_cost)
    lp.add_edges(grids)
    lp.add_memory_rows(memory_rows)
    lp.add_shared_charges(shared)
    offset, num_vars = lp.offset, lp.num_vars
    c, matrix, lower, upper = lp.arrays()
    largest = float(np.max(np.abs(c))) if c.size else 0.0
    scale = _OBJECTIVE_RANGE / largest if largest > 0 else 1.0
    model = model_builder.Model()
    model.helper.fill_model_from_sparse_data(
        np.zeros(num_vars), np.full(num_vars, np.inf), c * scale, lower, upper, matrix)
    solver = model_builder.Solver("highs")
    solver.set_solver_specific_parameters("threads=1\noutput_flag=false")
    solver.set_time_limit_in_seconds(float(backstop_s))
    status = run_interruptibly(lambda: solver.solve(model), solver.stop_search, on_wait)
    wall = time.perf_counter() - start
    if status != model_builder.SolveStatus.OPTIMAL:
        # a time limit or numerical trouble leaves the LP unsolved, not the ILP infeasible
        return Relaxation(False, status == model_builder.SolveStatus.INFEASIBLE, -np.inf, {},
                          False, num_vars, num_constraints, wall)
    x = solver.values(model.get_variables()).to_numpy()
    position, integral = {}, True
    for v in active:
        values = x[offset[v]:offset[v] + sizes[v]]
        best = int(np.argmax(values))
        position[v] = best
        integral &= bool(values[best] >= 1.0 - _INTEGRAL_TOL)
    return Relaxation(True, False, float(solver.objective_value) / scale + constant, position,
                      integral, num_vars, num_constraints, wall)


class _LinearProgram:
    """The LP in sparse rows, built part by part. Variables: one per kept strategy of
    each active node (``offset[v]`` onwards), one per finite cell of each edge grid, one
    per shared charge. Equalities: each node's strategies sum to 1, each grid's cells
    sum to its ends' strategies (the local-marginal polytope); inequalities: memory rows
    (scaled to 1) and ``Σ members − paid <= 0`` per shared charge."""

    def __init__(self, sizes, active, node_cost):
        self.sizes, self.active = sizes, active
        self.offset, self.num_vars = {}, 0
        for v in active:
            self.offset[v] = self.num_vars
            self.num_vars += sizes[v]
        self.objective = [np.asarray(node_cost[v], dtype=np.float64) for v in active]
        self.eq_rows, self.eq_cols, self.eq_vals = [], [], []
        for r, v in enumerate(active):
            self.eq_rows.append(np.full(sizes[v], r))
            self.eq_cols.append(self.offset[v] + np.arange(sizes[v]))
            self.eq_vals.append(np.ones(sizes[v]))
        self.num_eq = len(active)
        self.cells = {}
        self.ub_rows, self.ub_cols, self.ub_vals, self.b_ub = [], [], [], []

    def add_edges(self, grids) -> None:
        for grid in grids:
            ks, ls = np.nonzero(grid.finite)
            index = self.num_vars + np.arange(len(ks))
            self.num_vars += len(ks)
            self.cells[(grid.a, grid.b)] = (grid, ks, ls, index)
            self.objective.append(grid.cost[ks, ls])
            num_k, num_l = grid.cost.shape
            for classes_of, linked, node, base in (
                    (ks, grid.row_of, grid.a, self.num_eq),
                    (ls, grid.col_of, grid.b, self.num_eq + num_k)):
                self.eq_rows += [base + classes_of, base + linked]
                self.eq_cols += [index, self.offset[node] + np.arange(len(linked))]
                self.eq_vals += [np.ones(len(index)), -np.ones(len(linked))]
            self.num_eq += num_k + num_l

    def add_memory_rows(self, memory_rows) -> None:
        for terms, rhs in memory_rows:
            top = max(float(np.max(coef)) for *_, coef in terms)
            for *ends, coef in terms:
                if len(ends) == 1:
                    cols = self.offset[ends[0]] + np.arange(len(coef))
                    vals = np.asarray(coef, dtype=np.float64)
                else:
                    grid, ks, ls, index = self.cells[tuple(ends)]
                    cols, vals = index, grid.block(np.asarray(coef, dtype=np.float64))[ks, ls]
                self.ub_rows.append(np.full(len(cols), len(self.b_ub)))
                self.ub_cols.append(cols)
                self.ub_vals.append(vals / top)
            self.b_ub.append(rhs / top)

    def add_shared_charges(self, shared) -> None:
        for cost, members in shared:  # Σ_{i in members of v} x[v, i] - paid <= 0
            paid = self.num_vars
            self.num_vars += 1
            self.objective.append(np.array([cost]))
            for v, indices in members.items():
                self.ub_rows.append(np.full(len(indices) + 1, len(self.b_ub)))
                self.ub_cols.append(np.append(self.offset[v] + np.asarray(indices), paid))
                self.ub_vals.append(np.append(np.ones(len(indices)), -1.0))
                self.b_ub.append(0.0)

    def arrays(self):
        """(objective, constraint matrix, row lower bounds, row upper bounds)."""
        b_eq = np.zeros(self.num_eq)
        b_eq[:len(self.active)] = 1.0
        rows = [sparse.csr_matrix(
            (np.concatenate(self.eq_vals), (np.concatenate(self.eq_rows),
                                            np.concatenate(self.eq_cols))),
            shape=(self.num_eq, self.num_vars))]
        lower, upper = [b_eq], [b_eq]
        if self.b_ub:
            rows.append(sparse.csr_matrix(
                (np.concatenate(self.ub_vals), (np.concatenate(self.ub_rows),
                                                np.concatenate(self.ub_cols))),
                shape=(len(self.b_ub), self.num_vars)))
            lower.append(np.full(len(self.b_ub), -np.inf))
            upper.append(np.asarray(self.b_ub, dtype=np.float64))
        c = np.concatenate(self.objective) if self.objective else np.zeros(0)
        return (c, sparse.vstack(rows, format="csr"), np.concatenate(lower),
                np.concatenate(upper))
