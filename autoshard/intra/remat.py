"""Rematerialization chosen with the sharding: the forward segments a step may recompute
in its backward pass, and the search for the fewest of them that let a plan meet a memory
budget no sharding alone meets.

The forward pass is cut into segments of about equal flops, each cut where the fewest
bytes cross it within the forward (a layer's input, not its inner activations). Segments
are recomputed earliest first: an early segment's activations are read last in the
backward pass, after the later layers' have been freed, so recomputing it lowers the
peak the most. Each candidate count is planned in full (the ILP picks the sharding of
the rewritten program, the recomputation's own ops included); a binary search finds the
smallest count whose plan fits.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from autoshard.cost_model import format_bytes
from autoshard.errors import InfeasiblePlanError
from autoshard.ir.program import Program, makers, readers
from autoshard.ir.remat import Rematerialization

from .flops import eqn_flops

_log = logging.getLogger("autoshard")
#: at most this many forward segments to choose from (each more costs a plan in the search)
MAX_SEGMENTS = 32
#: matmuls and convolutions per segment, about (a transformer block has 6-8 in its forward)
HEAVY_PER_SEGMENT = 3
_HEAVY = ("dot_general", "conv_general_dilated")


def forward_segments(program: Program) -> Rematerialization | None:
    """Every segment a plan may recompute: the turn (the cut the most bytes cross: where
    the backward pass begins) and the forward before it in segments, earliest first;
    ``None`` when the forward has too few matmuls or convolutions to cut in two."""
    n = len(program.eqns)
    born = makers(program)
    read_by = {v: r for v, r in readers(program).items() if v in born}  # not the arguments
    nbytes = {v: float(np.prod(program.avals[v].shape)) * program.avals[v].dtype.itemsize
              for v in born}
    crossing = _crossing(born, {v: r[-1] for v, r in read_by.items()}, nbytes, n)
    turn = int(np.argmax(crossing)) if n else 0
    heavy = sum(program.eqns[e].primitive.name in _HEAVY for e in range(turn))
    count = min(MAX_SEGMENTS, heavy // HEAVY_PER_SEGMENT)
    if count < 2:
        return None
    # bytes crossing each cut within the forward: made before it, read after it before the turn
    forward_last = {v: max(e for e in r if e < turn) for v, r in read_by.items()
                    if born[v] < turn and r[0] < turn}
    inner = _crossing(born, forward_last, nbytes, turn)
    flops = np.cumsum([eqn_flops(program, program.eqns[e]) for e in range(turn)])
    cuts: list[int] = []
    for j in range(1, count):
        lo, hi = (int(np.searchsorted(flops, flops[-1] * f / count)) + 1
                  for f in (j - 0.5, j + 0.5))
        lo, hi = max(lo, 1), min(hi, turn - 1)
        if lo > hi:
            continue
        cut = lo + int(np.argmin(inner[lo:hi + 1]))
        if not cuts or cut > cuts[-1]:
            cuts.append(cut)
    # a segment without a matmul or convolution of its own joins the one before it (the
    # first, the one after it)
    bounds = [0, *cuts, turn]
    has_heavy = lambda a, b: any(program.eqns[e].primitive.name in _HEAVY  # noqa: E731
                                 for e in range(a, b))
    bounds = [b for i, b in enumerate(bounds)
              if i in (0, len(bounds) - 1) or has_heavy(b, bounds[i + 1])]
    if not has_heavy(bounds[0], bounds[1]):
        del bounds[1]
    return Rematerialization(turn, tuple(zip(bounds, bounds[1:])))


def _crossing(born: dict[int, int], last: dict[int, int], nbytes: dict[int, float],
              n: int) -> np.ndarray:
    """Per cut ``p`` in ``[0, n)`` (before equation ``p``): bytes of the values made
    before it and last read at or after it (``last``: value → its last reader)."""
    delta = np.zeros(n + 1)
    for v, end in last.items():
        if end > born[v]:
            delta[born[v] + 1] += nbytes[v]
            delta[min(end, n - 1) + 1] -= nbytes[v]
    return np.cumsum(delta[:n])


def fewest_segments(candidates: Rematerialization,
                    plan: Callable[[Rematerialization], object], storing: InfeasiblePlanError,
                    confirm: Callable[[object], object] | None = None):
    """The plan (``plan(remat)``, which raises :class:`InfeasiblePlanError` when it cannot
    meet the budget) recomputing the fewest of ``candidates``' segments, earliest first,
    that fits; ``storing``: the error planning with none raised, raised again when
    recomputing every segment does not fit either and peaks no lower.

    ``confirm(plan)`` (the plan, or :class:`InfeasiblePlanError`: compiling it, XLA's
    peak is over the budget) is a dearer check than planning: the counts are searched by
    ``plan`` alone, then the fewest is confirmed, and counts above it in turn while their
    plans are not (a compile per count confirmed, not one per count tried)."""
    segments = candidates.segments
    prefix = lambda k: Rematerialization(candidates.turn, segments[:k])  # noqa: E731
    _log.info("no sharding meets the budget: recomputing forward segments (%d to choose from)",
              len(segments))
    found = {}
    try:
        found[len(segments)] = plan(prefix(len(segments)))
    except InfeasiblePlanError as err:
        raise _every_segment_error(err, len(segments), storing) from None
    low, high = 0, len(segments)  # planning with `low` segments fails, with `high` fits
    while high - low > 1:
        middle = (low + high) // 2
        try:
            found[middle] = plan(prefix(middle))
            high = middle
        except InfeasiblePlanError as err:
            low = middle
            _log.info("recomputing %d segments: %s", middle, err)
        else:
            _log.info("recomputing %d segments fits", middle)
    for count in range(high, len(segments) + 1):
        try:
            best = found.get(count) or plan(prefix(count))
            best = best if confirm is None else confirm(best)
        except InfeasiblePlanError as err:
            _log.info("recomputing %d segments: %s", count, err)
            if count == len(segments):
                raise _every_segment_error(err, count, storing) from None
            continue
        _log.info("recomputing %d of %d forward segments meets the budget", count, len(segments))
        return best
    raise AssertionError("unreachable: the last count returns or raises")


def _every_segment_error(err: InfeasiblePlanError, count: int,
                         storing: InfeasiblePlanError) -> InfeasiblePlanError:
    """``storing`` when recomputing all ``count`` segments peaks no lower, else ``err``
    saying so."""
    if err.min_peak_bytes >= storing.min_peak_bytes:
        return storing
    return InfeasiblePlanError(
        f"{err} (with all {count} forward segments of the step recomputed in the "
        f"backward pass; storing their activations, the smallest peak is "
        f"{format_bytes(storing.min_peak_bytes)})", err.min_peak_bytes, err.memory_budget)
