"""Python's cyclic garbage collector run rarely while planning."""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

#: allocations between the cyclic collector's young-generation passes while planning
PLANNING_GC_ALLOCATIONS = 100_000
#: passes of a generation between two of the next older one's while planning (Python's
#: default: 10)
PLANNING_GC_OLDER_PASSES = 100


@contextlib.contextmanager
def rare_cycle_collection() -> Iterator[None]:
    """Run Python's cyclic garbage collector rarely inside the block: a young-generation
    pass every :data:`PLANNING_GC_ALLOCATIONS` allocations instead of every 700, and an
    older generation's every :data:`PLANNING_GC_OLDER_PASSES` passes of the younger one
    instead of 10 (a user's larger thresholds kept; all restored after, also on errors).

    Planning makes millions of objects (equations, strategies, price arrays) that mostly
    live until it ends; the collector's full passes walked all of them again and again
    (4.5 s of 46 s planning a 70B-shaped GPT on 8x8x8). Reference counting frees every
    object as it dies, and reference cycles (jax's tracing makes some) are still
    collected by the young passes: pausing the collector outright let a pipeline's
    planning grow 27% larger, while these thresholds leave its peak as it was (16-layer
    GPT pipeline on 4x8: 1005 MiB at 10 / 10 older passes, 1001 MiB at 100 / 100) and
    take the 80-layer 70B-shaped row's collection time from 1.55-1.65 s to 0.46-0.54 s
    (three runs each).
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], PLANNING_GC_ALLOCATIONS),
                     *(max(t, PLANNING_GC_OLDER_PASSES) for t in thresholds[1:]))
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
