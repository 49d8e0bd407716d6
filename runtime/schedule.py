"""Pipeline schedules: the order in which stages run micro-batches forward and backward."""
from __future__ import annotations

from autoshard.cost_model import SCHEDULES


def stage_orders(num_stages: int, num_microbatches: int, schedule: str
                 ) -> list[list[tuple[str, int]]]:
    """Per stage, its ``("F" | "B", micro-batch)`` operations in order.

    ``gpipe``: all forwards, then all backwards. ``1f1b`` (PipeDream-flush): stage ``s`` runs
    ``S - s - 1`` warm-up forwards, then alternates forward and backward, then drains.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {SCHEDULES}")
    S, B = num_stages, num_microbatches
    orders = []
    for s in range(S):
        if schedule == "gpipe":
            ops = [("F", m) for m in range(B)] + [("B", m) for m in range(B)]
        else:
            warm = min(S - s - 1, B)
            ops = [("F", m) for m in range(warm)]
            nf, nb = warm, 0
            while nb < B:
                if nf < B:
                    ops.append(("F", nf))
                    nf += 1
                ops.append(("B", nb))
                nb += 1
        orders.append(ops)
    return orders


def dispatch_order(num_stages: int, num_microbatches: int, schedule: str
                   ) -> list[tuple[str, int, int]]:
    """One sequential order of ``(kind, stage, micro-batch)`` that respects every stage's
    own order and the data dependencies (a forward after the previous stage's forward of
    that micro-batch, a backward after the next stage's backward). It interleaves stages
    round by round as a simulation with unit-time steps would, so asynchronous dispatch
    keeps the stages' sub-meshes busy at once."""
    orders = stage_orders(num_stages, num_microbatches, schedule)
    S = num_stages
    done: set = set()
    ptr = [0] * S
    out = []
    while any(ptr[s] < len(orders[s]) for s in range(S)):
        ready = []
        for s in range(S):
            if ptr[s] == len(orders[s]):
                continue
            kind, m = orders[s][ptr[s]]
            if kind == "F":
                dep = ("F", s - 1, m) if s > 0 else None
            else:
                dep = ("B", s + 1, m) if s < S - 1 else ("F", s, m)
            if dep is None or dep in done:
                ready.append((kind, s, m))
        if not ready:
            raise RuntimeError("pipeline schedule deadlocked (a bug)")
        for kind, s, m in ready:
            out.append((kind, s, m))
            done.add((kind, s, m))
            ptr[s] += 1
    return out
