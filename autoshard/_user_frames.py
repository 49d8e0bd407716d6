"""Point warnings at the user's code rather than at autoshard or jax internals."""
from __future__ import annotations

import os
import sys

_INTERNAL = tuple(os.path.dirname(p) + os.sep for p in (
    os.path.abspath(__file__),
))


def _is_internal(filename: str) -> bool:
    name = os.path.abspath(filename)
    if name.startswith(_INTERNAL):
        return True
    parts = name.split(os.sep)
    return "jax" in parts or "jax/_src" in name or "autoshard" in parts[-3:-1]


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called from here that lands on the first user frame."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level
