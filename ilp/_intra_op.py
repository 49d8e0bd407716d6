"""Intra-operator strategy selection: an LP relaxation first, a CP-SAT model when needed.

Formulation (after the exact reductions in ``_reduce``): every node with >= 2
strategies and a remaining edge or memory constraint gets one-hot literals
``s_v`` (``exactly_one``). Every remaining edge (a, b) gets one literal
``e[i, j]`` per finite cell of its residual matrix, linked by
``Σ_j e[i, j] = s_a[i]`` and ``Σ_i e[i, j] = s_b[j]`` (which imply Σ e = 1), each
written as ``exactly_one(e[i, :] + [¬s_a[i]])`` -- the form CP-SAT's presolve
would convert it to anyway. Inf cells get no literal, so the pair is forbidden.
Only cells with a non-zero residual enter the objective. Memory rows (with a budget)
are linear in the node literals and, for pair terms (a resharding copy that exists
only for some strategy pairs), in the cells of that pair's edge, whose classes then
also separate strategies by bytes (a zero-cost edge is added if the pair has none).
Edge grids over strategy classes are built once (``_grid``) for both solvers.

Order of work: the same model's LP relaxation is solved first (``_relaxation``,
HiGHS). When its optimum is integral -- the usual case on traced programs -- that
is the ILP optimum and no search runs (status OPTIMAL, ``LP_INTEGRAL``); when the
best warm start is already within ``gap_limit`` of the LP bound, it is returned
(``LP_BOUND``); otherwise CP-SAT searches, hinted with the better of local search
from the caller's hint and from the LP's rounding, and its gap is measured
against the larger of its own bound and the LP's.

Why this: the equality-linked grid is the local-marginal polytope, the tightest
pairwise LP relaxation; with ``linearization_level=2`` CP-SAT's LP then proves
optimality on chain/tree-like graphs with skip edges (what traced programs look
like; 300 nodes / 400 edges / 10 strategies with zero-diagonal resharding: optimal
in ~8 deterministic units). ``AddElement``/table constraints are linearised more
weakly, and a sparse grid with ``e >= s_a + s_b - 1`` has an LP bound of 0 on
every edge, so it proves little. The row/column-minimum
reparametrisation in ``_reduce`` makes residuals sparse without weakening the LP.
CP-SAT is warm-started with a complete hint from local search (``_heuristic``)
started at the caller's hint or the per-node argmin; without it single-worker
CP-SAT's first solutions are poor on large graphs. A search stopped by its limit
never returns an assignment worse than that warm start.

Integer scaling: costs are multiplied by ``scale`` so the largest objective
coefficient is about ``_RESOLUTION`` (1e8) units, capped so the worst-case
objective stays below 2**50; each coefficient is rounded to the nearest integer,
so the scaled objective differs from the true one by at most
``0.5 * (#active nodes + #model edges) / scale`` seconds (``stats.max_rounding_error_s``);
choices within that of the optimum may be returned as "OPTIMAL". The reported
``objective`` is always recomputed in float from the choices.

Determinism: the model is built in sorted order, solved with one worker, a fixed
seed and a deterministic time limit (see ``_memory.solver_parameters``); the LP
runs single-threaded dual simplex and is skipped by a size rule, not a clock; so
the same request gives the same choices in every run and process, unless it sets
``wall_time_limit_s`` (``_clock``): then the wall clock may end the LP or the search
first (the search also ends once it stalls), and the result depends on the machine.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import numpy as np
from ortools.sat.python import cp_model

from autoshard.cost_model import format_bytes

from ._budget_repair import fit_to_budget
from ._clock import Deadline, Progress
from ._evaluate import evaluate
from ._grid import EdgeGrid, edge_grids
from ._heuristic import best_assignment, local_search
from ._memory import _min_peak, memory_unit, to_units, within_budget
from ._neighbourhood import needs_neighbourhoods, solve_in_neighbourhoods
from ._reduce import ReducedProblem, reduce_request
from ._relaxation import solve_relaxation
from ._repeats import solve_tied
from ._request import InfeasibleError, IntraOpRequest, IntraOpResult, SolverStats
from ._search_rounds import search_in_rounds

#: integer units given to the largest objective coefficient.
_RESOLUTION = 1e8
#: wall-clock seconds below which a search is not started (the warm start is returned)
_MIN_SEARCH_S = 0.05
#: the most of a wall-clock budget left that the LP relaxation may use (the search,
#: warm-started without the LP's rounding, gets the rest)
_LP_SHARE = 0.5
#: seconds to build and load the CP-SAT model, per variable (measured on a 2-core x86
#: box: 162k variables, 2.5 s); a search that could not start in time is not built
_BUILD_S_PER_VARIABLE = 1.5e-5


def _memory_rows(request: IntraOpRequest, reduced: ReducedProblem):
    """Integer rows ``Σ coef·s <= rhs`` for the memory points that can bind.

    Per-node minima are moved to the right-hand side, points that cannot exceed
    the budget are dropped, and rows over the same variable nodes keep the
    tightest rhs. Returns (rows, statically_infeasible).
    """
    budget = request.memory_budget
    if budget is None or not reduced.points:
        return [], False
    unit = memory_unit(reduced)
    rows: dict[tuple, tuple[list, int]] = {}
    for point in reduced.points:
        constant = 0
        terms = []
        slack_needed = 0
        for *ends, values in point:
            units = to_units(values, unit)
            low = int(units.min())
            constant += low
            top = int(units.max()) - low
            if top > 0:
                terms.append((*ends, units - low))
                slack_needed += top
        rhs = int(np.floor(budget / unit + 1e-9)) - constant
        if rhs < 0:
            return [], True
        if slack_needed <= rhs:
            continue
        key = tuple((*ends, c.tobytes()) for *ends, c in terms)
        if key not in rows or rhs < rows[key][1]:
            rows[key] = (terms, rhs)
    return list(rows.values()), False


def _shared_rows(request: IntraOpRequest, reduced: ReducedProblem):
    """Shared costs over kept strategies: ([(seconds, {node: [kept index, ...]})], seconds
    always paid). A member whose strategy was dropped is gone; a charge with a member on a
    node left with that one strategy is always paid and joins the constant."""
    rows, always = [], 0.0
    kept: dict[int, dict[int, int]] = {}  # node -> original strategy -> kept index

    def kept_index(v: int, i: int) -> int | None:
        if v not in kept:
            kept[v] = {int(k): p for p, k in enumerate(reduced.keep[v])}
        return kept[v].get(i)

    for shared in request.shared_costs:
        members: dict[int, list[int]] = {}
        paid = False
        for v, i in shared.members:
            found = kept_index(v, i)
            if found is None:
                continue
            if len(reduced.keep[v]) == 1:
                paid = True
            members.setdefault(v, []).append(found)
        if paid:
            always += shared.cost
        elif members and shared.cost > 0:
            rows.append((shared.cost, {v: sorted(set(idx)) for v, idx in sorted(members.items())}))
    return rows, always


def _raise_infeasible(request: IntraOpRequest, reduced: ReducedProblem) -> None:
    peak = _min_peak(request, reduced)
    raise InfeasibleError(
        f"memory budget {format_bytes(request.memory_budget)} per device cannot be met: the smallest "
        f"achievable peak over {len(reduced.points)} memory points is {format_bytes(peak)} "
        f"({peak:.0f} bytes)",
        min_peak_bytes=peak,
        memory_budget=request.memory_budget,
    )


def _raise_no_assignment(request: IntraOpRequest, reduced: ReducedProblem, rows) -> None:
    if rows:
        _raise_infeasible(request, reduced)
    raise ValueError("no assignment satisfies the forbidden (inf) strategy pairs")


@dataclasses.dataclass(frozen=True, eq=False)
class _Prepared:
    """The reduced problem as the LP and CP-SAT see it: ``active`` nodes (those an edge,
    a memory row or a shared cost still ties to others), per-node cost minima ``base``
    moved into ``constant`` (seconds), memory ``rows``, ``shared`` charges, edge
    ``grids`` and the integer ``scale`` of CP-SAT's objective."""

    reduced: ReducedProblem
    rows: list
    shared: list
    active: list[int]
    base: list[float]
    constant: float
    scale: float
    grids: list[EdgeGrid]
    start: float  # time.perf_counter() when solving began

    def choices(self, position) -> tuple[int, ...]:
        """Request strategy indices from positions among each node's kept strategies."""
        return tuple(int(k[p]) for k, p in zip(self.reduced.keep, position))

    def result(self, request, choices, objective, lower_bound, status, relaxation, *,
               scale, build_time, solver, solver_status, model=None) -> IntraOpResult:
        return _result(request, self.reduced, choices, objective, lower_bound, status,
                       self.start, relaxation, len(self.grids), len(self.active),
                       memory_points=len(self.rows), scale=scale, build_time=build_time,
                       solver=solver, solver_status=solver_status, model=model)


def solve_intra_op(request: IntraOpRequest, *,
                   starting_plan: Callable[[], Sequence[int] | None] | None = None
                   ) -> IntraOpResult:
    """Pick one strategy per node minimising Σ node seconds + Σ edge resharding seconds.

    Raises ``InfeasibleError`` when the memory budget cannot be met and ``ValueError``
    when forbidden (inf) pairs leave no assignment. Status "FEASIBLE" means a time
    limit (the deterministic one, or ``wall_time_limit_s``) stopped the search;
    ``gap`` is then relative to the proven lower bound. A labelled request too large
    to solve whole (after tying repeated layers) is solved over neighbourhoods of its
    plan (``_neighbourhood``).

    ``starting_plan()``: the hint, made by the caller while the LP relaxation runs (HiGHS
    releases the GIL, so the Python work of making a starting plan overlaps the LP); it
    replaces ``request.hint`` and is called at most once. The result is the same as
    with ``request.hint`` set to it.
    """
    if starting_plan is not None:
        starting_plan = functools.cache(starting_plan)
    deadline = Deadline.of(request.wall_time_limit_s, request.time_limit_s)
    if request.ties:
        return solve_tied(request, deadline, starting_plan, solve_intra_op)
    if needs_neighbourhoods(request):  # its rounds start from the plan
        if starting_plan is not None:
            request = request.with_options(hint=starting_plan())
        return solve_in_neighbourhoods(request, solve_intra_op)
    prepared = _prepare(request)

    def relax(charges, offset):
        progress = Progress("LP relaxation", deadline)
        return solve_relaxation([len(k) for k in prepared.reduced.keep], prepared.active,
                                {v: prepared.reduced.cost[v] - prepared.base[v]
                                 for v in prepared.active},
                                prepared.grids, prepared.rows, charges, offset,
                                min(request.time_limit_s, deadline.remaining_s()),
                                deadline.solver_s(_LP_SHARE), on_wait=progress.tick,
                                meanwhile=starting_plan)

    # the LP relaxation: often integral, then optimal without a search
    relaxation = relax(prepared.shared, prepared.constant) if prepared.active else None
    if starting_plan is not None:
        request, starting_plan = request.with_options(hint=starting_plan()), None
    if relaxation is not None and relaxation.infeasible:
        _raise_no_assignment(request, prepared.reduced, prepared.rows)
    if relaxation is not None and relaxation.integral:
        reduced = prepared.reduced
        choices = prepared.choices([relaxation.position.get(v, int(np.argmin(reduced.cost[v])))
                                    for v in range(len(reduced.keep))])
        check = evaluate(request, choices)
        if check.ok:
            return prepared.result(request, choices, check.objective, check.objective,
                                   "OPTIMAL", relaxation, scale=0.0,
                                   build_time=time.perf_counter() - prepared.start,
                                   solver=None, solver_status="LP_INTEGRAL")

    # warm start: local search from the caller's hint and from the LP's largest values
    starts = [relaxation.position] if relaxation is not None and relaxation.solved else []
    bound = relaxation.bound if starts else -np.inf
    position, warm, warm_eval = _warm(request, prepared, starts, deadline)
    # (a second LP only when the first one's rounding leaves the gap open, with its time left)
    if starts and prepared.shared and not _within_gap(request, warm_eval, bound) and \
            deadline.remaining_s() > 2 * relaxation.wall_time_s:
        # Fixed charges make the LP fractional (it spreads members to share a charge).
        # With every charge paid up front the problem has none, and its LP optimum
        # (usually integral) costs at most the optimum plus the unused charges.
        paid = relax((), prepared.constant + sum(cost for cost, _ in prepared.shared))
        if paid.solved:
            position, warm, warm_eval = _warm(request, prepared, [*starts, paid.position],
                                              deadline)
    if _within_gap(request, warm_eval, bound):
        return prepared.result(request, warm, warm_eval.objective,
                               min(bound, warm_eval.objective), "FEASIBLE", relaxation,
                               scale=0.0, build_time=time.perf_counter() - prepared.start,
                               solver=None, solver_status="LP_BOUND")
    return _search(request, prepared, relaxation, position, warm, warm_eval, bound, deadline)


def _warm(request: IntraOpRequest, prepared: _Prepared, starts, deadline: Deadline):
    """(kept-strategy position, choices, their evaluation) of the search's warm start
    (``_warm_start`` from the hint and the LP solutions ``starts``), moved to fit the
    budget when it breaks it."""
    position = _warm_start(request, prepared.reduced, bool(prepared.rows), starts)
    warm = prepared.choices(position)
    warm_eval = evaluate(request, warm)
    if not warm_eval.ok and prepared.rows:  # the hint breaks the budget: find one that fits
        fitting = within_budget(request.with_options(wall_time_limit_s=deadline.wall_limit()),
                                prepared.reduced)
        if fitting is not None:
            position = [fitting.get(v, p) for v, p in enumerate(position)]
            warm = prepared.choices(position)
            warm_eval = evaluate(request, warm)
    return position, warm, warm_eval


def _within_gap(request: IntraOpRequest, evaluation, bound: float) -> bool:
    """Whether a valid assignment priced ``evaluation`` is within the gap limit of ``bound``."""
    return evaluation.ok and request.gap_limit > 0 and bound > -np.inf and \
        evaluation.objective - bound <= request.gap_limit * abs(evaluation.objective)


def _prepare(request: IntraOpRequest) -> _Prepared:
    """Reduce the request, find the active nodes, and scale costs to CP-SAT's integers."""
    start = time.perf_counter()
    reduced = reduce_request(request)
    rows, infeasible = _memory_rows(request, reduced)
    if infeasible:
        _raise_infeasible(request, reduced)
    n = len(reduced.keep)
    in_model = np.zeros(n, dtype=bool)
    for a, b, _ in reduced.edges:
        in_model[a] = in_model[b] = True
    for terms, _ in rows:
        for *ends, _ in terms:
            in_model[ends] = True
    shared, always_paid = _shared_rows(request, reduced)
    for _, members in shared:
        in_model[list(members)] = True
    active = [v for v in range(n) if in_model[v]]
    base = [float(c.min()) for c in reduced.cost]
    largest, worst = 0.0, 0.0
    for v in active:
        top = float(reduced.cost[v].max()) - base[v]
        largest, worst = max(largest, top), worst + top
    for _, _, matrix in reduced.edges:
        finite = matrix[np.isfinite(matrix)]
        top = float(finite.max()) if finite.size else 0.0
        largest, worst = max(largest, top), worst + top
    for cost, _ in shared:
        largest, worst = max(largest, cost), worst + cost
    scale = 1.0 if largest <= 0 else min(_RESOLUTION / largest, 2.0**50 / worst)
    return _Prepared(reduced, rows, shared, active, base, float(sum(base)) + always_paid,
                     scale, edge_grids(reduced, rows), start)


def _search(request: IntraOpRequest, prepared: _Prepared, relaxation, position, warm,
            warm_eval, bound: float, deadline: Deadline) -> IntraOpResult:
    """CP-SAT from the warm start; never returns worse than the warm start when a time
    limit stops it. With no wall-clock time left and a valid warm start, the warm start
    is returned without a search (solver status ``OUT_OF_TIME``); so it is when the
    request says ``search=False`` (``NO_SEARCH``)."""
    reduced, active, scale = prepared.reduced, prepared.active, prepared.scale
    num_vars = (sum(len(reduced.keep[v]) for v in active)
                + sum(int(g.finite.sum()) for g in prepared.grids))
    if warm_eval.ok and \
            deadline.remaining_s() < _MIN_SEARCH_S + _BUILD_S_PER_VARIABLE * num_vars:
        return _out_of_time(request, prepared, relaxation, warm, warm_eval, bound)
    if warm_eval.ok and not request.search:
        return prepared.result(request, warm, warm_eval.objective,
                               min(bound, warm_eval.objective), "FEASIBLE", relaxation,
                               scale=0.0, build_time=time.perf_counter() - prepared.start,
                               solver=None, solver_status="NO_SEARCH")
    model, lits, edge_cells, charged = _cp_model(reduced, active, prepared.base,
                                                 prepared.constant, prepared.grids,
                                                 prepared.rows, prepared.shared, scale)
    _add_hint(model, lits, prepared.grids, edge_cells, charged, prepared.shared, position)
    build_time = time.perf_counter() - prepared.start
    if warm_eval.ok and deadline.remaining_s() < _MIN_SEARCH_S:  # building took the time
        return _out_of_time(request, prepared, relaxation, warm, warm_eval, bound)
    if active:
        search = search_in_rounds(
            model, time_limit_s=request.time_limit_s, gap_limit=request.gap_limit,
            deadline=deadline, hint_is_plan=warm_eval.ok,
            progress=lambda: Progress("search", deadline, scale=scale))
        status, solution = search.status, search.solution
    else:
        search, status, solution = None, cp_model.OPTIMAL, []
    if status == cp_model.INFEASIBLE:
        _raise_no_assignment(request, reduced, prepared.rows)
    if status == cp_model.MODEL_INVALID:
        raise RuntimeError(f"internal error, CP-SAT rejected the model: {model.validate()}")

    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        choices = []
        for v in range(len(reduced.keep)):
            if v in lits:
                index = next(i for i, lit in enumerate(lits[v]) if solution[lit.index])
            else:
                index = int(np.argmin(reduced.cost[v]))
            choices.append(int(reduced.keep[v][index]))
        choices = tuple(choices)
        # With a gap limit CP-SAT reports OPTIMAL once within it: only a closed gap is.
        # (nothing left to solve after reduction: trivially optimal, CP-SAT never ran)
        proven = status == cp_model.OPTIMAL and (
            not active or request.gap_limit == 0 or search.bound >= search.objective)
        status_name = "OPTIMAL" if proven else "FEASIBLE"
    elif warm_eval.ok:
        choices, status_name = warm, "FEASIBLE"  # time limit hit before CP-SAT's first solution
    else:
        within = "" if request.memory_budget is None else \
            f" under the memory budget of {format_bytes(request.memory_budget)} per device"
        raise RuntimeError(
            f"CP-SAT found no assignment{within} within the time limit "
            f"({request.time_limit_s:g} s); raise time_limit_s"
            + (" or the memory budget" if within else " or pass a hint"))

    objective = evaluate(request, choices).objective
    if status_name == "FEASIBLE":  # stopped by the limit: never return worse than the warm start
        if warm_eval.ok and warm_eval.objective < objective:
            choices, objective = warm, warm_eval.objective
    cp_bound = search.bound / scale if active else prepared.constant
    lower_bound = min(objective, max(cp_bound, bound))   # _result: the objective if OPTIMAL
    return prepared.result(request, choices, objective, lower_bound, status_name, relaxation,
                           scale=scale, build_time=build_time, solver=search,
                           solver_status=("TRIVIAL" if not active else "STALLED"
                                          if search.stalled and status == cp_model.FEASIBLE
                                          else status.name),
                           model=model)


def _out_of_time(request, prepared: _Prepared, relaxation, warm, warm_eval,
                 bound: float) -> IntraOpResult:
    """The warm start, returned when the wall-clock budget ran out before the search."""
    lower = min(bound if bound > -np.inf else prepared.constant, warm_eval.objective)
    return prepared.result(request, warm, warm_eval.objective, lower, "FEASIBLE", relaxation,
                           scale=0.0, build_time=time.perf_counter() - prepared.start,
                           solver=None, solver_status="OUT_OF_TIME")


def _cp_model(reduced: ReducedProblem, active, base, constant: float, grids, rows, shared,
              scale: float):
    """The CP-SAT model: (model, strategy literals per active node, cell literals per grid,
    one "paid" literal per shared cost, >= every member node's sum of member literals)."""
    model = cp_model.CpModel()
    lits: dict[int, list] = {}
    obj_vars: list = []
    obj_coefs: list[int] = []
    for v in active:
        vector = [model.new_bool_var("") for _ in range(len(reduced.keep[v]))]
        lits[v] = vector
        model.add_exactly_one(vector)
        coefs = np.rint((reduced.cost[v] - base[v]) * scale).astype(np.int64)
        for lit, c in zip(vector, coefs.tolist()):
            if c:
                obj_vars.append(lit)
                obj_coefs.append(c)
    edge_cells = []
    cell_of: dict[tuple[int, int], tuple] = {}
    for grid in grids:
        finite = grid.finite
        num_k, num_l = grid.cost.shape
        coefs = np.rint(np.where(finite, grid.cost, 0.0) * scale).astype(np.int64).tolist()
        cells = [[model.new_bool_var("") if finite[k, l] else None for l in range(num_l)]
                 for k in range(num_k)]
        for k in range(num_k):
            members = [lits[grid.a][i] for i in np.flatnonzero(grid.row_of == k)]
            model.add(sum(c for c in cells[k] if c is not None) == sum(members))
            for l in range(num_l):
                if cells[k][l] is not None and coefs[k][l]:
                    obj_vars.append(cells[k][l])
                    obj_coefs.append(coefs[k][l])
        for l in range(num_l):
            members = [lits[grid.b][j] for j in np.flatnonzero(grid.col_of == l)]
            column = [cells[k][l] for k in range(num_k) if cells[k][l] is not None]
            model.add(sum(column) == sum(members))
        edge_cells.append(cells)
        cell_of[(grid.a, grid.b)] = (grid, cells)
    for terms, rhs in rows:
        vars_, coefs_ = [], []
        for *ends, coef in terms:
            if len(ends) == 1:
                pairs = zip(lits[ends[0]], coef.tolist())
            else:
                grid, cells = cell_of[tuple(ends)]
                block = grid.block(coef).tolist()
                pairs = ((cell, block[k][l]) for k, row in enumerate(cells)
                         for l, cell in enumerate(row) if cell is not None)
            for lit, c in pairs:
                if c:
                    vars_.append(lit)
                    coefs_.append(c)
        model.add(cp_model.LinearExpr.weighted_sum(vars_, coefs_) <= rhs)
    charged = []
    for cost, members in shared:
        paid = model.new_bool_var("")
        for v, indices in members.items():
            model.add(sum(lits[v][i] for i in indices) <= paid)
        charged.append(paid)
        if int(np.rint(cost * scale)):
            obj_vars.append(paid)
            obj_coefs.append(int(np.rint(cost * scale)))
    # The constant part rides along as an offset so that CP-SAT's relative gap (and so
    # ``gap_limit``) is measured against the whole objective.
    model.minimize(cp_model.LinearExpr.weighted_sum(obj_vars, obj_coefs) +
                   int(round(constant * scale)))
    return model, lits, edge_cells, charged


def _result(request, reduced, choices, objective, lower_bound, status, start, relaxation,
            model_edges, active_nodes, *, memory_points, scale, build_time, solver,
            solver_status, model=None):
    gap = 0.0 if status == "OPTIMAL" or not objective else (objective - lower_bound) / abs(objective)
    if status == "OPTIMAL":
        lower_bound = objective
    if model is not None:
        num_variables, num_constraints = len(model.proto.variables), len(model.proto.constraints)
    elif relaxation is not None:
        num_variables, num_constraints = relaxation.num_variables, relaxation.num_constraints
    else:
        num_variables = num_constraints = 0
    stats = SolverStats(
        active_nodes=active_nodes,
        fixed_nodes=len(reduced.keep) - active_nodes,
        dropped_strategies=reduced.dropped_strategies,
        input_edges=len(request.edges),
        model_edges=model_edges,
        merged_edges=reduced.merged_edges,
        folded_edges=reduced.folded_edges,
        memory_points=memory_points,
        scale=scale,
        max_rounding_error_s=0.5 * (active_nodes + len(reduced.edges) + len(request.shared_costs))
        / scale if scale else 0.0,
        build_time_s=build_time,
        wall_time_s=solver.wall_time if solver is not None else 0.0,
        deterministic_time=solver.deterministic_time if solver is not None else 0.0,
        num_conflicts=solver.num_conflicts if solver is not None else 0,
        num_branches=solver.num_branches if solver is not None else 0,
        solver_status=solver_status,
        lp_bound=relaxation.bound if relaxation is not None and relaxation.solved else float("nan"),
        lp_integral=bool(relaxation is not None and relaxation.integral),
        lp_time_s=relaxation.wall_time_s if relaxation is not None else 0.0,
    )
    return IntraOpResult(
        choices=tuple(choices),
        objective=objective,
        lower_bound=lower_bound,
        gap=gap,
        status=status,
        solve_time_s=time.perf_counter() - start,
        num_variables=num_variables,
        num_constraints=num_constraints,
        stats=stats,
    )


def _warm_start(request: IntraOpRequest, reduced: ReducedProblem, has_memory_rows: bool,
                starts) -> list[int]:
    """Kept-strategy index per node: the best of the user's hint (or per-node argmin) and of
    each LP solution in ``starts`` (kept index per active node, by largest value), each
    improved by local search.

    With binding memory rows a user hint is passed through untouched (local search
    ignores memory and could make it infeasible), and each LP solution is also moved
    until it fits (``fit_to_budget``): the rounding of a budgeted LP is often a little
    over the budget and near its bound. Measured on the LLaMA-7B-shaped GPT on 8x8
    (h100-80gb, 79 GiB, tied): the hint (the cheapest preset-like plan that fits) costs
    1.095 s per step, the LP's bound is 0.688 s, its rounding 0.686 s at 79.7 GiB, moved
    to fit 0.689 s; CP-SAT from the hint stalled at 1.091 s.
    """
    start = []
    for v, keep in enumerate(reduced.keep):
        found = np.flatnonzero(keep == request.hint[v]) if request.hint is not None else ()
        start.append(int(found[0]) if len(found) else int(np.argmin(reduced.cost[v])))

    def original(position):
        return tuple(int(k[p]) for k, p in zip(reduced.keep, position))

    keeps_hint = has_memory_rows and request.hint is not None
    candidates = [start if keeps_hint else local_search(reduced, start)]
    for lp in starts:
        rounded = [lp.get(v, p) for v, p in enumerate(start)]
        candidates.append(local_search(reduced, rounded))
        if has_memory_rows:
            fitted = _fitted(request, reduced, original(rounded))
            if fitted is not None:
                candidates.append(fitted)

    best = best_assignment(request, [original(c) for c in candidates])
    return next((c for c in candidates if original(c) == best), candidates[0])


def _fitted(request: IntraOpRequest, reduced: ReducedProblem, choices: Sequence[int]
            ) -> list[int] | None:
    """``choices`` (a strategy per node of ``request``) moved until they fit its budget
    (``fit_to_budget``), as kept-strategy indices of ``reduced``; None when they cannot
    be, or when a move picks a strategy the reduction dropped."""
    fitted = fit_to_budget(request, choices)
    if fitted is None:
        return None
    kept = [np.flatnonzero(k == c) for k, c in zip(reduced.keep, fitted)]
    return None if any(len(f) == 0 for f in kept) else [int(f[0]) for f in kept]


def _add_hint(model, lits, grids, edge_cells, charged, shared, position: list[int]) -> None:
    """Hint every literal of the model from ``position`` (a complete assignment)."""
    for v, vector in lits.items():
        for i, lit in enumerate(vector):
            model.add_hint(lit, i == position[v])
    for paid, (_, members) in zip(charged, shared):
        model.add_hint(paid, any(position[v] in indices for v, indices in members.items()))
    for grid, cells in zip(grids, edge_cells):
        chosen = (grid.row_of[position[grid.a]], grid.col_of[position[grid.b]])
        for k, row in enumerate(cells):
            for l, cell in enumerate(row):
                if cell is not None:
                    model.add_hint(cell, (k, l) == chosen)
