"""Memory side of the intra-op problem: integer byte coefficients and the min-peak solve."""

from __future__ import annotations

import numpy as np
from ortools.sat.python import cp_model

from ._clock import Deadline
from ._evaluate import point_memory
from ._interrupt import run_interruptibly
from ._reduce import ReducedProblem, reduce_request
from ._request import IntraOpRequest


def memory_unit(reduced: ReducedProblem) -> float:
    """Bytes per integer unit: 1 byte unless a point's total would overflow CP-SAT's comfort zone."""
    if not reduced.points:
        return 1.0
    top = max(sum(float(np.max(term[-1])) for term in point) for point in reduced.points)
    return max(1.0, top / 2.0**50)


def to_units(values: np.ndarray, unit: float) -> np.ndarray:
    """Round bytes up to integer units (never under-counts memory, tolerating 1e-9 float noise)."""
    return np.ceil(np.asarray(values, dtype=np.float64) / unit - 1e-9).astype(np.int64)


#: deterministic-time units granted per requested second. CP-SAT's work counter
#: runs 1-1.5x slower than wall time on models of ~40k literals but up to ~12x slower
#: on ~400k-literal models (measured on a 2-core x86 box), so a third keeps big solves
#: near the requested wall time while small ones (which mostly prove optimality
#: early) are barely affected.
DETERMINISTIC_UNITS_PER_SECOND = 1.0 / 3.0


def solver_parameters(solver: cp_model.CpSolver, time_limit_s: float, wall_s: float) -> None:
    """Deterministic CP-SAT settings: one worker, fixed seed, deterministic time limit.

    The search stops after ``time_limit_s * DETERMINISTIC_UNITS_PER_SECOND`` units of
    CP-SAT's deterministic work counter, so a given request always stops at the same
    point, or after ``wall_s`` wall-clock seconds (``Deadline.solver_s``: the request's
    wall-clock budget left, else a backstop against pathological slowness), the one
    exit that is not deterministic.
    Presolve is capped (one iteration, no probing, no symmetry) because its work
    is barely counted by the deterministic limit.
    """
    params = solver.parameters
    params.num_workers = 1
    params.random_seed = 20240601
    params.max_deterministic_time = float(time_limit_s) * DETERMINISTIC_UNITS_PER_SECOND
    params.max_time_in_seconds = max(float(wall_s), 1e-3)
    params.linearization_level = 2  # full LP relaxation: far better bounds on these models
    params.max_presolve_iterations = 1
    params.cp_model_probing_level = 0
    params.symmetry_level = 0
    params.log_search_progress = False
    # Ctrl-C is handled in Python (_interrupt): CP-SAT's own handler would swallow it
    # and return a cut-short solution as if the time limit had passed
    params.catch_sigint_signal = False
    # The warm start is a complete, feasible assignment already (and is returned if the
    # search finds nothing better): skip CP-SAT's hint-repair phase, which costs as much
    # as the search on large models.
    params.hint_conflict_limit = 0


def min_peak_memory(request: IntraOpRequest) -> float:
    """Smallest achievable peak over the memory points in bytes (seconds ignored).

    Forbidden strategies and forbidden (inf) edge pairs are respected. Exact when
    CP-SAT proves optimality within ``request.time_limit_s`` (deterministic), else
    the best peak found.
    """
    return _min_peak(request, reduce_request(request))


def _min_peak(request: IntraOpRequest, reduced: ReducedProblem) -> float:
    if not reduced.points:
        return 0.0
    model, lits, peak, _ = _peak_model(reduced)
    model.minimize(peak)
    found = _solve_positions(request, model, lits)
    if found is None:
        raise ValueError("no assignment satisfies the forbidden strategy pairs")
    choices = [int(k[found.get(v, 0)]) for v, k in enumerate(reduced.keep)]
    return float(max(point_memory(request, choices), default=0.0))


def within_budget(request: IntraOpRequest, reduced: ReducedProblem) -> dict[int, int] | None:
    """Kept-strategy positions of the nodes the memory points (and forbidden pairs) tie,
    whose peak fits ``request.memory_budget`` whatever the other nodes choose; seconds
    ignored: CP-SAT's first such assignment, a warm start for the search when the
    caller's hint breaks the budget. ``None`` when none is found within the request's
    limits (or none exists)."""
    if not reduced.points or request.memory_budget is None:
        return {}
    model, lits, peak, unit = _peak_model(reduced)
    model.add(peak <= int(np.floor(request.memory_budget / unit + 1e-9)))
    return _solve_positions(request, model, lits)


def _peak_model(reduced: ReducedProblem):
    """CP-SAT model of the peak over the memory points: (model, literals per node whose
    choice matters, the peak variable in integer units, bytes per unit)."""
    unit = memory_unit(reduced)
    structural = [(a, b, m) for a, b, m in reduced.edges if not np.isfinite(m).all()]
    variable_nodes = sorted(
        {v for point in reduced.points for *ends, _ in point for v in ends
         if len(reduced.keep[v]) > 1}
        | {v for a, b, _ in structural for v in (a, b)}
    )
    model = cp_model.CpModel()
    lits = {}
    for v in variable_nodes:
        lits[v] = [model.new_bool_var("") for _ in range(len(reduced.keep[v]))]
        model.add_exactly_one(lits[v])
    for a, b, matrix in structural:
        for i, j in zip(*np.nonzero(~np.isfinite(matrix))):
            model.add_bool_or([lits[a][i].Not(), lits[b][j].Not()])
    pair_lits = {}  # (a, b) -> cell literals e[i][j] = s_a[i] and s_b[j]
    for point in reduced.points:
        for *ends, _ in point:
            if len(ends) == 2 and tuple(ends) not in pair_lits:
                a, b = ends
                cells = [[model.new_bool_var("") for _ in lits[b]] for _ in lits[a]]
                for i, row in enumerate(cells):
                    model.add(sum(row) == lits[a][i])
                for j in range(len(lits[b])):
                    model.add(sum(row[j] for row in cells) == lits[b][j])
                pair_lits[(a, b)] = cells
    coefs = [[(*ends, to_units(values, unit)) for *ends, values in point]
             for point in reduced.points]
    upper = max(sum(int(term[-1].max()) for term in point) for point in coefs)
    lower = min(0, min(sum(int(term[-1].min()) for term in point) for point in coefs))
    peak = model.new_int_var(lower, max(upper, 0), "peak")
    for point in coefs:
        constant, terms = 0, []
        for *ends, c in point:
            if len(ends) == 2:
                cells = pair_lits[tuple(ends)]
                terms += [(cell, int(x)) for row, xs in zip(cells, c) for cell, x in zip(row, xs) if x]
            elif ends[0] in lits:
                terms += [(lit, int(x)) for lit, x in zip(lits[ends[0]], c) if x]
            else:
                constant += int(c[0])
        expr = cp_model.LinearExpr.weighted_sum([t[0] for t in terms], [t[1] for t in terms])
        model.add(expr + constant <= peak)
    return model, lits, peak, unit


def _solve_positions(request: IntraOpRequest, model, lits) -> dict[int, int] | None:
    """Solve ``model`` under the request's limits: the kept-strategy position of every
    node in ``lits``, or ``None`` when CP-SAT finds no assignment."""
    solver = cp_model.CpSolver()
    solver_parameters(solver, request.time_limit_s,
                      Deadline.of(request.wall_time_limit_s, request.time_limit_s).solver_s())
    status = run_interruptibly(lambda: solver.solve(model), solver.stop_search)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return {v: next(i for i, lit in enumerate(vector) if solver.boolean_value(lit))
            for v, vector in lits.items()}
