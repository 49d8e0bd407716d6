"""Pipeline schedules as the cost model sees them: how many micro-batches a stage keeps
in flight (run forward, not yet backward), which sets the activation memory it holds.
The runtime dispatches the same schedules (``autoshard.runtime.stage_orders``)."""
from __future__ import annotations

#: every pipeline schedule autoshard plans and runs
SCHEDULES: tuple[str, ...] = ("1f1b", "gpipe")


def in_flight(schedule: str, stage: int, num_stages: int, num_microbatches: int) -> int:
    """Micro-batches stage ``stage`` of ``num_stages`` holds activations for at once:
    all ``num_microbatches`` under GPipe, ``min(num_stages − stage, num_microbatches)``
    under 1F1B (PipeDream-flush)."""
    if schedule == "gpipe":
        return num_microbatches
    if schedule == "1f1b":
        return min(num_stages - stage, num_microbatches)
    raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {SCHEDULES}")
