"""Liveness of a program's values: when each is born and last read; peak bytes per device."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .runtime import Literal, Program


def live_ranges(program: Program, donated: Iterable[int] = ()) -> dict[int, tuple[int, int]]:
    """Value id → (first step, last step) it occupies memory.

    Step ``e`` is the execution of equation ``e``; arguments and constants are
    born at step 0; program outputs live to the last step; arguments live to the
    end unless donated (then until their last read).
    """
    end = max(len(program.eqns) - 1, 0)
    donated = set(donated)
    born: dict[int, int] = {}
    last: dict[int, int] = {}
    for vid, _ in program.constants:
        born[vid] = 0
    for vid in program.invars:
        born[vid] = 0
        last[vid] = 0 if vid in donated else end
    for e, eqn in enumerate(program.eqns):
        for atom in eqn.inputs:
            if not isinstance(atom, Literal):
                last[atom] = max(last.get(atom, e), e)
        for vid in eqn.outputs:
            born[vid] = e
    for atom in program.outvars:
        if not isinstance(atom, Literal):
            last[atom] = end
    return {v: (b, max(last.get(v, b), b)) for v, b in born.items()}


def live_bytes(ranges: Mapping[int, tuple[int, int]], value_bytes: Mapping[int, float],
               num_steps: int) -> np.ndarray:
    """Bytes per device live at each step, given each value's (first, last) step and bytes."""
    delta = np.zeros(max(num_steps, 1) + 1)
    for vid, (b, l) in ranges.items():
        nbytes = value_bytes.get(vid, 0)
        delta[b] += nbytes
        delta[l + 1] -= nbytes
    return np.cumsum(delta[:-1])


def peak_bytes(ranges: Mapping[int, tuple[int, int]], value_bytes: Mapping[int, int],
               num_steps: int) -> tuple[int, int]:
    """(peak bytes, step at which it is reached) given each value's bytes per device."""
    live = live_bytes(ranges, value_bytes, num_steps)
    step = int(np.argmax(live))
    return int(round(live[step])), step
