"""Point warnings at the user's code rather than at autoshard or jax internals.

A frame is internal when the module running it belongs to autoshard, jax or jaxlib, by
module name (``frame.f_globals["__name__"]``), or when its file lies in one of
autoshard's own package folders. Nothing depends on where the package or a virtual
environment is installed, or on the names of the folders above them: a project cloned
into ``…/autoshard/`` or ``…/jax/``, with its ``.venv`` inside, still gets warnings that
point at its own files.
"""
from __future__ import annotations

import os
import sys

#: top-level packages whose frames are never user code
_INTERNAL_PACKAGES = frozenset({"autoshard", "jax", "jaxlib"})


def _package_folders() -> tuple[str, ...]:
    """The folders of autoshard's packages (in a source checkout ``cost_model/``,
    ``ilp/`` and ``runtime/`` are installed as ``autoshard.*`` from beside it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    package = os.path.dirname(here)
    root = os.path.dirname(package)
    folders = [package] + [os.path.join(root, name) for name in ("cost_model", "ilp", "runtime")
                           if os.path.isfile(os.path.join(root, name, "__init__.py"))]
    return tuple(folder + os.sep for folder in folders)


_FOLDERS = _package_folders()


def _is_internal(frame) -> bool:
    """Whether ``frame`` runs autoshard's, jax's or jaxlib's code."""
    module = frame.f_globals.get("__name__")
    if isinstance(module, str) and module.partition(".")[0] in _INTERNAL_PACKAGES:
        return True
    return os.path.abspath(frame.f_code.co_filename).startswith(_FOLDERS)


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called from here that lands on the first user frame."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and _is_internal(frame):
        frame = frame.f_back
        level += 1
    return level
