"""Intra-operator strategy selection as a CP-SAT model.

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
seed and a deterministic time limit (see ``_memory.solver_parameters``), so the
same request gives the same choices in every run and process.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from ortools.sat.python import cp_model

from ._evaluate import evaluate
from ._heuristic import best_assignment, local_search, polish
from ._memory import _min_peak, memory_unit, solver_parameters, to_units
from ._reduce import ReducedProblem, reduce_request
from ._repeats import RepeatClasses, repeat_classes, tied_request
from ._request import InfeasibleError, IntraOpRequest, IntraOpResult, SolverStats
from ._units import format_bytes

#: integer units given to the largest objective coefficient.
_RESOLUTION = 1e8


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


def _raise_infeasible(request: IntraOpRequest, reduced: ReducedProblem) -> None:
    peak = _min_peak(request, reduced)
    raise InfeasibleError(
        f"memory budget {format_bytes(request.memory_budget)} per device cannot be met: the smallest "
        f"achievable peak over {len(reduced.points)} memory points is {format_bytes(peak)} "
        f"({peak:.0f} bytes)",
        min_peak_bytes=peak,
        memory_budget=request.memory_budget,
    )


def solve_intra_op(request: IntraOpRequest) -> IntraOpResult:
    """Pick one strategy per node minimising Σ node seconds + Σ edge resharding seconds.

    Raises ``InfeasibleError`` when the memory budget cannot be met and ``ValueError``
    when forbidden (inf) pairs leave no assignment. Status "FEASIBLE" means the
    deterministic time limit stopped the search; ``gap`` is then relative to the
    proven lower bound.
    """
    if request.tie_repeats and request.memory_budget is None:
        classes = repeat_classes(request)
        if classes.num_classes < request.num_nodes:
            return _solve_tied(request, classes)
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
    active = [v for v in range(n) if in_model[v]]
    base = [float(c.min()) for c in reduced.cost]
    constant = float(sum(base))

    # --- integer scale -------------------------------------------------------------
    largest, worst = 0.0, 0.0
    for v in active:
        top = float(reduced.cost[v].max()) - base[v]
        largest, worst = max(largest, top), worst + top
    for _, _, matrix in reduced.edges:
        finite = matrix[np.isfinite(matrix)]
        top = float(finite.max()) if finite.size else 0.0
        largest, worst = max(largest, top), worst + top
    scale = 1.0 if largest <= 0 else min(_RESOLUTION / largest, 2.0**50 / worst)

    # --- model ---------------------------------------------------------------------
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
    # Pairs whose copies count in a memory row need cells too (a zero-cost edge if none).
    pair_memory: dict[tuple[int, int], list[np.ndarray]] = {}
    for terms, _ in rows:
        for *ends, coef in terms:
            if len(ends) == 2:
                pair_memory.setdefault(tuple(ends), []).append(coef)
    model_edges = list(reduced.edges) + [
        (a, b, np.zeros((len(reduced.keep[a]), len(reduced.keep[b]))))
        for a, b in sorted(set(pair_memory) - {(a, b) for a, b, _ in reduced.edges})]
    edge_cells = []
    cell_of: dict[tuple[int, int], tuple] = {}
    for a, b, matrix in model_edges:
        # Classes of strategies that the edge's cost and every copy term see alike.
        seen = np.concatenate([matrix] + pair_memory.get((a, b), []), axis=1)
        seen_t = np.concatenate([matrix.T] + [m.T for m in pair_memory.get((a, b), [])], axis=1)
        row_of, rep_rows = _classes(seen)
        col_of, rep_cols = _classes(seen_t)
        grid = matrix[np.ix_(rep_rows, rep_cols)]
        finite = np.isfinite(grid)
        coefs = np.rint(np.where(finite, grid, 0.0) * scale).astype(np.int64).tolist()
        cells = [[model.new_bool_var("") if finite[k, l] else None
                  for l in range(len(rep_cols))] for k in range(len(rep_rows))]
        for k in range(len(rep_rows)):
            members = [lits[a][i] for i in np.flatnonzero(row_of == k)]
            model.add(sum(c for c in cells[k] if c is not None) == sum(members))
            for l in range(len(rep_cols)):
                if cells[k][l] is not None and coefs[k][l]:
                    obj_vars.append(cells[k][l])
                    obj_coefs.append(coefs[k][l])
        for l in range(len(rep_cols)):
            members = [lits[b][j] for j in np.flatnonzero(col_of == l)]
            column = [cells[k][l] for k in range(len(rep_rows)) if cells[k][l] is not None]
            model.add(sum(column) == sum(members))
        edge_cells.append((row_of, col_of, cells))
        cell_of[(a, b)] = (rep_rows, rep_cols, cells)
    for terms, rhs in rows:
        vars_, coefs_ = [], []
        for *ends, coef in terms:
            if len(ends) == 1:
                pairs = zip(lits[ends[0]], coef.tolist())
            else:
                rep_rows, rep_cols, cells = cell_of[tuple(ends)]
                block = coef[np.ix_(rep_rows, rep_cols)].tolist()
                pairs = ((cell, block[k][l]) for k, row in enumerate(cells)
                         for l, cell in enumerate(row) if cell is not None)
            for lit, c in pairs:
                if c:
                    vars_.append(lit)
                    coefs_.append(c)
        model.add(cp_model.LinearExpr.weighted_sum(vars_, coefs_) <= rhs)
    # The constant part rides along as an offset so that CP-SAT's relative gap (and so
    # ``gap_limit``) is measured against the whole objective.
    model.minimize(cp_model.LinearExpr.weighted_sum(obj_vars, obj_coefs) +
                   int(round(constant * scale)))

    position = _warm_start(request, reduced, bool(rows))
    _add_hint(model, lits, model_edges, edge_cells, position)
    proto = model.proto
    num_variables, num_constraints = len(proto.variables), len(proto.constraints)
    build_time = time.perf_counter() - start

    # --- solve ---------------------------------------------------------------------
    solver = cp_model.CpSolver()
    solver_parameters(solver, request.time_limit_s)
    solver.parameters.relative_gap_limit = request.gap_limit
    warm = tuple(int(k[p]) for k, p in zip(reduced.keep, position))
    if active:
        status = solver.solve(model)
        solution = solver.response_proto.solution
    else:
        status, solution = cp_model.OPTIMAL, []
    if status == cp_model.INFEASIBLE:
        if rows:
            _raise_infeasible(request, reduced)
        raise ValueError("no assignment satisfies the forbidden (inf) strategy pairs")
    if status == cp_model.MODEL_INVALID:
        raise RuntimeError(f"internal error, CP-SAT rejected the model: {model.validate()}")

    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        choices = []
        for v in range(n):
            if v in lits:
                index = next(i for i, lit in enumerate(lits[v]) if solution[lit.index])
            else:
                index = int(np.argmin(reduced.cost[v]))
            choices.append(int(reduced.keep[v][index]))
        choices = tuple(choices)
        # With a gap limit CP-SAT reports OPTIMAL once within it: only a closed gap is.
        # (nothing left to solve after reduction: trivially optimal, CP-SAT never ran)
        proven = status == cp_model.OPTIMAL and (
            not active or request.gap_limit == 0
            or solver.best_objective_bound >= solver.objective_value)
        status_name = "OPTIMAL" if proven else "FEASIBLE"
    elif evaluate(request, warm).ok:
        choices, status_name = warm, "FEASIBLE"  # time limit hit before CP-SAT's first solution
    else:
        raise RuntimeError(
            f"CP-SAT found no assignment within the deterministic time limit ({request.time_limit_s:g}); "
            "raise time_limit_s or pass a hint"
        )

    objective = evaluate(request, choices).objective
    if status_name == "FEASIBLE":  # stopped by the limit: never return worse than the warm start
        start_eval = evaluate(request, warm)
        if start_eval.ok and start_eval.objective < objective:
            choices, objective = warm, start_eval.objective
    if status_name == "OPTIMAL":
        lower_bound, gap = objective, 0.0
    else:
        bound = solver.best_objective_bound / scale if active else constant
        lower_bound = min(objective, bound)
        gap = (objective - lower_bound) / abs(objective) if objective else 0.0
    wall = time.perf_counter() - start
    stats = SolverStats(
        active_nodes=len(active),
        fixed_nodes=n - len(active),
        dropped_strategies=reduced.dropped_strategies,
        input_edges=len(request.edges),
        model_edges=len(model_edges),
        merged_edges=reduced.merged_edges,
        folded_edges=reduced.folded_edges,
        memory_points=len(rows),
        scale=scale,
        max_rounding_error_s=0.5 * (len(active) + len(reduced.edges)) / scale,
        build_time_s=build_time,
        wall_time_s=solver.wall_time if active else 0.0,
        deterministic_time=solver.deterministic_time if active else 0.0,
        num_conflicts=solver.num_conflicts if active else 0,
        num_branches=solver.num_branches if active else 0,
        solver_status=solver.status_name(status) if active else "TRIVIAL",
    )
    return IntraOpResult(
        choices=choices,
        objective=objective,
        lower_bound=lower_bound,
        gap=gap,
        status=status_name,
        solve_time_s=wall,
        num_variables=num_variables,
        num_constraints=num_constraints,
        stats=stats,
    )


def _solve_tied(request: IntraOpRequest, classes: RepeatClasses) -> IntraOpResult:
    """Solve over repeat classes, expand, polish node by node, never worse than the hint.

    The status is "FEASIBLE": the tied optimum need not be the untied one. The lower
    bound is Σ per-node minima + Σ per-edge minima (valid for any assignment, weak).
    """
    start = time.perf_counter()
    sub = solve_intra_op(tied_request(request, classes))
    costs = [np.asarray(c, dtype=np.float64) for c in request.node_costs]
    edges = [(e.src, e.dst, e.cost) for e in request.edges]
    polished = polish(costs, edges, list(classes.expand(sub.choices)))
    candidates = [polished] + ([request.hint] if request.hint is not None else [])
    choices = best_assignment(request, candidates)
    if choices is None:
        choices = classes.expand(sub.choices)
    objective = evaluate(request, choices).objective
    floor = sum(float(np.min(c)) for c in request.node_costs) + \
        sum(float(np.min(e.cost)) for e in request.edges)
    lower_bound = min(objective, floor)
    gap = (objective - lower_bound) / abs(objective) if objective else 0.0
    stats = dataclasses.replace(sub.stats, tied_classes=classes.num_classes, tied_gap=sub.gap,
                                input_edges=len(request.edges))
    return IntraOpResult(choices=tuple(choices), objective=objective, lower_bound=lower_bound,
                         gap=gap, status="FEASIBLE", solve_time_s=time.perf_counter() - start,
                         num_variables=sub.num_variables, num_constraints=sub.num_constraints,
                         stats=stats)


def _warm_start(request: IntraOpRequest, reduced: ReducedProblem, has_memory_rows: bool) -> list[int]:
    """Kept-strategy index per node: the user's hint (or per-node argmin) improved by local search.

    With binding memory rows a user hint is passed through untouched (local search
    ignores memory and could make it infeasible).
    """
    start = []
    for v, keep in enumerate(reduced.keep):
        found = np.flatnonzero(keep == request.hint[v]) if request.hint is not None else ()
        start.append(int(found[0]) if len(found) else int(np.argmin(reduced.cost[v])))
    if has_memory_rows and request.hint is not None:
        return start
    return local_search(reduced, start)


def _add_hint(model, lits, model_edges, edge_cells, position: list[int]) -> None:
    """Hint every literal of the model from ``position`` (a complete assignment)."""
    for v, vector in lits.items():
        for i, lit in enumerate(vector):
            model.add_hint(lit, i == position[v])
    for (a, b, _), (row_of, col_of, cells) in zip(model_edges, edge_cells):
        for k, row in enumerate(cells):
            for l, cell in enumerate(row):
                if cell is not None:
                    model.add_hint(cell, k == row_of[position[a]] and l == col_of[position[b]])


def _classes(matrix: np.ndarray) -> tuple[np.ndarray, list[int]]:
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
