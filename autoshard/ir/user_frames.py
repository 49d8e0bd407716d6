"""Point warnings at the user's code rather than at autoshard or jax internals."""
from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# autoshard/ and, in a source checkout, the folders installed as its subpackages
_INTERNAL = (_PACKAGE + os.sep,) + tuple(
    os.path.join(os.path.dirname(_PACKAGE), name) + os.sep
    for name in ("cost_model", "ilp", "runtime"))


def _is_internal(filename: str) -> bool:
    name = os.path.abspath(filename)
    if name.startswith(_INTERNAL):
        return True
    parts = name.split(os.sep)
    return "jax" in parts or "jax/_src" in name


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called from here that lands on the first user frame."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level
