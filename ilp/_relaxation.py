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

HiGHS runs through its own bindings (``highspy``: OR-Tools' model builder reports row
activities where it should report duals, which column generation needs) with
``threads=1``: with its default thread pool, degenerate LPs (many equal-cost optima)
returned different optimal vertices from run to run under CPU load (2 of 60 solves
through ``scipy.optimize.linprog``), which broke the identical plans every process of
a ``jax.distributed`` run must make. Costs are scaled so the largest coefficient is
``_OBJECTIVE_RANGE``, well above the solver's tolerances.

Column generation: most cells of a grid are pairs of layouts no good plan joins. The LP
starts from each row's and each column's ``START_CELLS`` cheapest cells, and each round adds every
omitted cell whose reduced cost (its cost less its two marginal rows' duals) is
negative, warm-started from the last basis, until none is: the same optimum as the LP
over every cell (an equal-cost vertex may differ; the plan is then another optimum).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import highspy
import numpy as np
import scipy.sparse as sparse

from ._grid import EdgeGrid
from ._interrupt import run_interruptibly

#: seconds of dual simplex per (row x variable) of the LP, measured on a 2-core x86 box
#: (13k x 108k: 1.8 s; 149k x 1.26M: 253 s). The LP is skipped when this estimate
#: exceeds the caller's time limit: a deterministic rule, unlike a wall-clock stop.
SECONDS_PER_ROW_VARIABLE = 1.3e-9
#: cells per row and per column of each grid that column generation starts from: fewer
#: start smaller LPs but take more rounds (each a few hundred simplex iterations at least);
#: 4 was the fastest of 1-8 on a GPT (2, 4) and LLaMA-7B-shaped (8, 8) problem (2.4x and
#: 1.6x faster than the LP over every cell)
START_CELLS = 4
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
    #: LPs solved: column generation adds cells and solves again until none is missing
    rounds: int = 1

    def __repr__(self) -> str:
        return (f"Relaxation(solved={self.solved}, infeasible={self.infeasible}, "
                f"bound={self.bound:.6g} s, integral={self.integral}, "
                f"variables={self.num_variables}, constraints={self.num_constraints}, "
                f"wall_time_s={self.wall_time_s:.3f}, rounds={self.rounds})")


def solve_relaxation(sizes: Sequence[int], active: Sequence[int],
                     node_cost: Mapping[int, np.ndarray], grids: Sequence[EdgeGrid],
                     memory_rows, shared, constant: float,
                     time_limit_s: float, backstop_s: float,
                     on_wait: Callable[[], None] | None = None, *,
                     every_cell: bool = False,
                     meanwhile: Callable[[], object] | None = None) -> Relaxation:
    """Solve the LP over ``active`` nodes (``sizes[v]`` kept strategies each).

    ``node_cost[v]``: seconds per kept strategy; ``constant``: seconds added to the
    objective; ``memory_rows``: ``(terms, rhs)`` as built for CP-SAT (node terms
    ``(v, units)``, pair terms ``(a, b, units[i, j])``); ``shared``: ``(seconds,
    {node: [kept index, ...]})`` charges, each a variable >= every member node's sum
    of member strategy values. An LP estimated to take
    longer than ``time_limit_s`` is not attempted; ``backstop_s`` is a wall-clock stop
    (the caller's wall-clock budget left, or one against pathological slowness). Either
    reports ``solved=False``. ``on_wait()`` runs every fraction of a second meanwhile.
    ``every_cell``: every finite cell from the start (no column generation).
    ``meanwhile()``: called once, in this thread, while HiGHS solves the first LP (see
    :func:`run_interruptibly`); not at all when no LP is attempted.
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
    costs = [np.asarray(node_cost[v], dtype=np.float64) for v in active] + \
        [g.cost[g.finite] for g in grids] + [np.array([cost]) for cost, _ in shared]
    largest = max((float(np.max(np.abs(c))) for c in costs if c.size), default=0.0)
    scale = _OBJECTIVE_RANGE / largest if largest > 0 else 1.0
    in_memory = {tuple(ends) for terms, _ in memory_rows for *ends, _ in terms if len(ends) == 2}
    columns = [g.finite if every_cell or (g.a, g.b) in in_memory else _cheapest_cells(g)
               for g in grids]
    lp = _LinearProgram(sizes, active, node_cost)
    lp.add_edges(grids, columns)
    lp.add_memory_rows(memory_rows)
    lp.add_shared_charges(shared)
    highs = _highs(lp, scale)
    rounds = 0
    while True:
        rounds += 1
        allow_more_time(highs, float(backstop_s) - (time.perf_counter() - start))
        run_interruptibly(highs.run, highs.cancelSolve, on_wait,
                          meanwhile if rounds == 1 else None)
        status = highs.getModelStatus()
        if status != highspy.HighsModelStatus.kOptimal:
            # a time limit or numerical trouble leaves the LP unsolved, not the ILP
            # infeasible; without some of its cells the LP may be infeasible where it is not
            infeasible = status == highspy.HighsModelStatus.kInfeasible
            if infeasible and not every_cell:
                return solve_relaxation(sizes, active, node_cost, grids, memory_rows, shared,
                                        constant, time_limit_s,
                                        backstop_s - (time.perf_counter() - start), on_wait,
                                        every_cell=True)
            return Relaxation(False, infeasible, -np.inf, {}, False, num_vars, num_constraints,
                              time.perf_counter() - start, rounds)
        solution = highs.getSolution()
        entering = _priced_cells(grids, columns, lp.grid_rows, np.asarray(solution.row_dual), scale)
        if entering is None:
            break
        cost, starts, index = entering
        highs.addCols(len(cost), cost, np.zeros(len(cost)), np.full(len(cost), highspy.kHighsInf),
                      len(index), starts, index, np.ones(len(index)))
    x = np.asarray(solution.col_value)
    position, integral = {}, True
    for v in active:
        values = x[lp.offset[v]:lp.offset[v] + sizes[v]]
        best = int(np.argmax(values))
        position[v] = best
        integral &= bool(values[best] >= 1.0 - _INTEGRAL_TOL)
    return Relaxation(True, False, float(highs.getInfo().objective_function_value) / scale + constant,
                      position, integral, num_vars, num_constraints, time.perf_counter() - start,
                      rounds)


def allow_more_time(highs: highspy.Highs, seconds: float) -> None:
    """Let the next ``highs.run()`` take at most ``seconds`` more (none if negative).
    HiGHS compares its ``time_limit`` with its run time summed over every ``run()`` of
    the instance, so the limit is that sum plus ``seconds`` (a limit of the seconds alone
    stopped a column-generation LP at half its wall-clock budget)."""
    highs.setOptionValue("time_limit", highs.getRunTime() + max(0.0, seconds))


def _highs(lp: _LinearProgram, scale: float) -> highspy.Highs:
    """A HiGHS instance holding ``lp`` (objective times ``scale``), single-threaded, quiet."""
    c, matrix, lower, upper = lp.arrays()
    matrix = matrix.tocsc()
    model = highspy.HighsLp()
    model.num_col_, model.num_row_ = matrix.shape[1], matrix.shape[0]
    model.col_cost_ = c * scale
    model.col_lower_ = np.zeros(matrix.shape[1])
    model.col_upper_ = np.full(matrix.shape[1], highspy.kHighsInf)
    model.row_lower_ = np.where(np.isinf(lower), -highspy.kHighsInf, lower)
    model.row_upper_ = np.where(np.isinf(upper), highspy.kHighsInf, upper)
    model.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    model.a_matrix_.start_ = matrix.indptr
    model.a_matrix_.index_ = matrix.indices
    model.a_matrix_.value_ = matrix.data
    highs = _quiet_highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("threads", 1)
    highs.passModel(model)
    return highs


#: reduced cost (scaled objective units, largest coefficient ``_OBJECTIVE_RANGE``) below
#: which an omitted cell enters the LP: HiGHS's own dual feasibility tolerance.
_REDUCED_COST_TOL = 1e-7


def _cheapest_cells(grid: EdgeGrid) -> np.ndarray:
    """The cells column generation starts from: each row's and each column's
    :data:`START_CELLS` cheapest finite cells."""
    finite = grid.finite
    cost = np.where(finite, grid.cost, np.inf)
    cells = np.zeros(cost.shape, dtype=bool)
    np.put_along_axis(cells, np.argsort(cost, axis=1, kind="stable")[:, :START_CELLS], True, axis=1)
    np.put_along_axis(cells, np.argsort(cost, axis=0, kind="stable")[:START_CELLS], True, axis=0)
    return cells & finite


def _quiet_highs() -> highspy.Highs:
    """``highspy.Highs()`` without the banner HiGHS prints to stdout (file descriptor 1)
    when the first instance of a process is made, before any option can turn its output
    off (HiGHS issue #2749): stdout points at /dev/null while it is made."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _priced_cells(grids, columns, grid_rows, duals: np.ndarray, scale: float):
    """Every omitted finite cell of negative reduced cost (its scaled cost less the duals
    of its row's and column's marginal rows), marked in ``columns`` and returned as HiGHS
    columns ``(costs, starts, row indices)`` (a +1 in each of its two rows); None when
    there is none."""
    cost, index = [], []
    for g, (grid, (row_base, col_base)) in enumerate(zip(grids, grid_rows)):
        num_k, num_l = grid.cost.shape
        reduced = scale * np.where(grid.finite, grid.cost, np.inf) \
            - duals[row_base:row_base + num_k, None] - duals[None, col_base:col_base + num_l]
        ks, ls = np.nonzero((reduced < -_REDUCED_COST_TOL) & ~columns[g])
        if len(ks):
            columns[g] = columns[g].copy()
            columns[g][ks, ls] = True
            cost.append(scale * grid.cost[ks, ls])
            index.append(np.stack([row_base + ks, col_base + ls], axis=1).reshape(-1))
    if not cost:
        return None
    cost = np.concatenate(cost)
    return cost, np.arange(0, 2 * len(cost), 2), np.concatenate(index)


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
        self.cells, self.grid_rows = {}, []
        self.ub_rows, self.ub_cols, self.ub_vals, self.b_ub = [], [], [], []

    def add_edges(self, grids, columns=None) -> None:
        """A variable per cell of each grid in ``columns`` (a mask per grid; default: every
        finite cell); ``grid_rows[g]``: (first row-class row, first column-class row)."""
        for g, grid in enumerate(grids):
            ks, ls = np.nonzero(grid.finite if columns is None else columns[g])
            index = self.num_vars + np.arange(len(ks))
            self.num_vars += len(ks)
            self.cells[(grid.a, grid.b)] = (grid, ks, ls, index)
            self.objective.append(grid.cost[ks, ls])
            num_k, num_l = grid.cost.shape
            self.grid_rows.append((self.num_eq, self.num_eq + num_k))
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
