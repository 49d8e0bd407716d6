"""Wall-clock step timing shared by the benchmarks (seconds)."""
from __future__ import annotations

import time

import jax


def step_times(fn, args, warmup: int, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn(*args)`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return times
