"""CP-SAT's search in deterministic rounds: a round that finds no better plan ends it.

Round k runs CP-SAT for ``max(STALL_UNITS, units the rounds before used)`` units of its
deterministic work counter (never past the request's deterministic limit), from the best
plan so far as its hint. A round that ends without a better plan ends the search; so
does one that proves its plan within the gap limit. Every round is deterministic (one
worker, a fixed seed), so where the search ends, and the plan it returns, do not depend
on the machine's speed or load; only the request's wall-clock budget, when it runs out,
still ends a search early.

A wall-clock rule ("no better plan for 5 s") did: mlp_wide on 2x4 (host-cpu) finds
2.973 ms per step after 1.6 units of search (3.5 s on an idle 2-core box); on the same
box under load the rule stopped it at its 3.454 ms hint, and the plan came out 3.294.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from ortools.sat.python import cp_model

from ._clock import Deadline, Progress
from ._interrupt import run_interruptibly
from ._memory import DETERMINISTIC_UNITS_PER_SECOND, solver_parameters

#: deterministic units of search a plan has to improve in before the search ends (and
#: the least any later round gets): 1.6 units found mlp_wide's 2x4 optimum above; a
#: neighbourhood round of the 80-layer 70B-shaped plan on 8x8x8 runs ~2.7 units in 5 s
STALL_UNITS = 2.0


@dataclasses.dataclass(frozen=True)
class SearchRounds:
    """The outcome of :func:`search_in_rounds`: ``status`` (CP-SAT's, of the best round:
    ``OPTIMAL`` when a round proved its plan within the gap limit), ``solution`` (a value
    per model variable, of the best plan; empty when none was found), ``objective`` and
    ``bound`` (CP-SAT's scaled integers: the best plan's and the best proven lower bound),
    ``stalled`` (a round found nothing better), and totals over the rounds."""

    status: cp_model.CpSolverStatus
    solution: tuple[int, ...]
    objective: float
    bound: float
    stalled: bool
    rounds: int
    wall_time: float
    deterministic_time: float
    num_conflicts: int
    num_branches: int

    def __repr__(self):
        return (f"SearchRounds({self.status.name}, "
                f"{self.rounds} round(s), {self.deterministic_time:.3g} units"
                f"{', stalled' if self.stalled else ''})")


def round_units(used: float, total: float, incumbent: bool) -> float:
    """Deterministic units the next round may use, ``used`` of ``total`` spent: all that
    is left without a plan to improve (another round would repeat the same work), else
    ``max(STALL_UNITS, used)``, at most what is left."""
    left = max(0.0, total - used)
    return left if not incumbent else min(left, max(STALL_UNITS, used))


def search_in_rounds(model: cp_model.CpModel, *, time_limit_s: float, gap_limit: float,
                     deadline: Deadline, hint_is_plan: bool,
                     progress: Callable[[], Progress]) -> SearchRounds:
    """Minimise ``model`` in rounds from its hint (a value for every variable;
    ``hint_is_plan``: it meets every constraint, so a round must beat it), within
    ``time_limit_s * DETERMINISTIC_UNITS_PER_SECOND`` units and the wall-clock
    ``deadline``. ``progress()``: a round's solution callback (progress lines). Each
    round's hint is the best plan before it: the model is left hinted with the last."""
    total = float(time_limit_s) * DETERMINISTIC_UNITS_PER_SECOND
    used = wall = 0.0
    conflicts = branches = rounds = 0
    best = hint_objective(model) if hint_is_plan else None
    status, solution, bound = cp_model.UNKNOWN, (), -math.inf
    stalled = False
    while True:
        solver = cp_model.CpSolver()
        solver_parameters(solver, time_limit_s, deadline.solver_s())
        solver.parameters.relative_gap_limit = gap_limit
        solver.parameters.max_deterministic_time = max(
            round_units(used, total, best is not None), 1e-3)
        callback = progress()
        found = run_interruptibly(lambda: solver.solve(model, callback), solver.stop_search,
                                  on_wait=callback.tick)
        rounds += 1
        used += solver.deterministic_time
        wall += solver.wall_time
        conflicts += solver.num_conflicts
        branches += solver.num_branches
        if found not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            if not solution:   # nothing found in any round: CP-SAT's verdict
                status = found
            break
        bound = max(bound, solver.best_objective_bound)
        improved = best is None or solver.objective_value < best
        if improved or not solution:
            status, solution = found, tuple(solver.response_proto.solution)
            best = solver.objective_value
        if found == cp_model.OPTIMAL:
            status = found
            break
        if not improved:
            stalled = True
            break
        if used >= total * (1 - 1e-9) or deadline.remaining_s() <= 0:
            break
        model.clear_hints()
        hint = model.proto.solution_hint
        hint.vars.extend(range(len(solution)))
        hint.values.extend(solution)
    return SearchRounds(status, solution, math.nan if best is None else float(best), bound,
                        stalled, rounds, wall, used, conflicts, branches)


def hint_objective(model: cp_model.CpModel) -> float:
    """The objective of ``model``'s hint, as CP-SAT prices it (its scaled integers and
    offset); variables the hint leaves out count 0."""
    proto = model.proto
    values = np.zeros(len(proto.variables), dtype=np.int64)
    values[np.asarray(proto.solution_hint.vars, dtype=np.int64)] = \
        np.asarray(proto.solution_hint.values, dtype=np.int64)
    refs = np.asarray(proto.objective.vars, dtype=np.int64)
    taken = np.where(refs >= 0, values[np.maximum(refs, 0)], 1 - values[np.maximum(-refs - 1, 0)])
    return float(np.dot(np.asarray(proto.objective.coeffs, dtype=np.int64), taken)) + \
        float(proto.objective.offset)
