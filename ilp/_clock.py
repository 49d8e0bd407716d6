"""Wall-clock limits and progress reports for one solve.

A request's ``time_limit_s`` is a deterministic limit (reproducible); its
``wall_time_limit_s``, when set, is a wall-clock budget for the whole solve (LP,
warm start, search). :class:`Deadline` turns both into the seconds each solver may
still run; :class:`Progress` logs what a long phase is doing every few seconds
(logger ``autoshard.ilp``: the phase, the time used and left, the best plan so far
and its gap), from the thread that waits on the solver and from CP-SAT's solution
callback. (A search that stops improving ends by deterministic rules, not the clock:
``_search_rounds``.)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from ortools.sat.python import cp_model

from autoshard.cost_model import format_seconds

_log = logging.getLogger("autoshard.ilp")

#: seconds between two progress lines of one phase
PROGRESS_PERIOD_S = 5.0


def backstop_s(time_limit_s: float) -> float:
    """Wall-clock stop against pathological slowness when no wall limit is given:
    the deterministic limit alone normally ends a solve far earlier."""
    return 5.0 * float(time_limit_s) + 30.0


@dataclasses.dataclass(frozen=True)
class Deadline:
    """When a solve must end. ``at``: ``time.perf_counter()`` seconds, or ``None``
    (no wall-clock limit: only the deterministic limit and its backstop)."""

    at: float | None
    backstop_s: float

    @classmethod
    def of(cls, wall_time_limit_s: float | None, time_limit_s: float) -> Deadline:
        at = None if wall_time_limit_s is None else time.perf_counter() + wall_time_limit_s
        return cls(at, backstop_s(time_limit_s))

    def remaining_s(self) -> float:
        """Seconds left (``inf`` without a wall-clock limit; never negative)."""
        return math.inf if self.at is None else max(0.0, self.at - time.perf_counter())

    def solver_s(self, share: float = 1.0) -> float:
        """Seconds the next solver call may run: ``share`` of what is left, at most the
        backstop."""
        return min(share * self.remaining_s(), self.backstop_s)

    def wall_limit(self) -> float | None:
        """The remaining wall-clock budget to hand on to a sub-solve (``None``: none)."""
        return None if self.at is None else self.remaining_s()


class Progress(cp_model.CpSolverSolutionCallback):
    """Logs ``phase`` at most every :data:`PROGRESS_PERIOD_S` seconds while it runs.

    As a CP-SAT solution callback it also tracks the best objective and bound found
    so far, in seconds (CP-SAT's scaled integers divided by ``scale``)."""

    def __init__(self, phase: str, deadline: Deadline, *, scale: float = 0.0) -> None:
        super().__init__()
        self.phase = phase
        self._deadline = deadline
        self._scale = scale
        self.best_s = math.nan
        self.bound_s = math.nan
        self._start = self._last = time.perf_counter()

    def on_solution_callback(self) -> None:
        if self._scale:
            self.best_s = self.objective_value / self._scale
            self.bound_s = self.best_objective_bound / self._scale
        self.tick()

    def tick(self) -> None:
        """Log a progress line if the last one is a period old."""
        now = time.perf_counter()
        if now - self._last < PROGRESS_PERIOD_S:
            return
        self._last = now
        if not _log.isEnabledFor(logging.INFO):
            return
        left = self._deadline.remaining_s()
        parts = [f"{self.phase}: {now - self._start:.1f} s"]
        if math.isfinite(left):
            parts[0] += f", {left:.1f} s left"
        if math.isfinite(self.best_s):
            best = f"best plan so far {format_seconds(self.best_s)} per step"
            if math.isfinite(self.bound_s) and self.best_s > 0:
                gap = max(0.0, (self.best_s - self.bound_s) / self.best_s)
                best += f", gap {100 * gap:.1f}% to the bound {format_seconds(self.bound_s)}"
            parts.append(best)
        _log.info("%s", "; ".join(parts))
