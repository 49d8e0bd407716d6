"""Process-independent text for equations: what the fingerprint and the strategy memo key on."""
from __future__ import annotations

import functools
import hashlib

import numpy as np

from .program import Literal


def stable_repr(value) -> str:
    """``repr`` of plain data; a type name for anything whose repr may hold an address."""
    if value is None or isinstance(value, (bool, int, float, str, np.dtype, np.generic)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(stable_repr(v) for v in value) + ")"
    if isinstance(value, np.ndarray):
        return f"array{value.shape}:{hashlib.sha256(value.tobytes()).hexdigest()[:8]}"
    text = repr(value)
    return type(value).__name__ if " at 0x" in text or "object at" in text else text


def aval_text(aval) -> str:
    return _type_text(tuple(aval.shape), aval.dtype)


@functools.lru_cache(maxsize=1 << 12)
def _type_text(shape: tuple, dtype) -> str:
    """``aval_text`` of one shape and dtype (a deep model's equations repeat a few)."""
    return f"{shape}:{dtype.name}"


def argument_text(aval) -> str:
    """An argument's shape and dtype, and ``~weak`` when it is weakly typed (a Python
    scalar): ``int8 array * 3`` and ``int8 array * int32 array`` are other programs."""
    return aval_text(aval) + ("~weak" if getattr(aval, "weak_type", False) else "")


def equation_signature(eqn, in_avals, out_avals) -> str:
    """Everything a strategy rule reads: primitive, parameters, operand and result types
    (literal operands by value)."""
    inputs = [stable_repr(a.value) if isinstance(a, Literal) else aval_text(v)
              for a, v in zip(eqn.inputs, in_avals)]
    params = sorted((k, stable_repr(v)) for k, v in eqn.params.items())
    return repr((eqn.primitive.name, params, inputs, [aval_text(a) for a in out_avals]))
