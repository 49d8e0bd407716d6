"""A stable, process-independent hash of a traced program and its signature: what ties a
saved plan to the function it was made for, and what processes compare."""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import re
import types

import numpy as np

from .jax_compat import threefry_partitionable
from .signature import argument_text
from .trace import TracedFunction


def fingerprint(traced: TracedFunction, static_repr: str, argument_avals=None) -> str:
    """A stable hash of the function's signature (tree structure, shapes, dtypes, statics)
    and of its program body (every equation's signature and wiring), identical in every
    process. ``argument_avals``: the arguments as the caller passes them, when the
    program was traced at other shapes (a pipeline traces one micro-batch)."""
    program = traced.program
    if argument_avals is None:
        argument_avals = [program.avals[v] for v in program.invars]
    digest = hashlib.sha256()
    for part in [_without_addresses(str(traced.in_tree)),
                 _without_addresses(str(traced.out_tree)), static_repr]:
        digest.update(part.encode() + b"\0")
    digest.update(";".join(argument_text(a) for a in argument_avals).encode())
    if any(eqn.primitive.name == "random_bits" for eqn in program.eqns):
        # whether random bits may be split depends on this flag: a plan made under one
        # setting is priced for it
        digest.update(f"threefry_partitionable={threefry_partitionable()}".encode())
    digest.update(repr((program.invars, [a if isinstance(a, int) else "lit"
                                         for a in program.outvars])).encode())
    for eqn, signature in zip(program.eqns, traced.signatures):
        wiring = ([a for a in eqn.inputs if isinstance(a, int)], eqn.outputs)
        digest.update(repr((signature, wiring)).encode())
    return digest.hexdigest()[:16]


def check_fingerprint(plan, got: str, advice: str) -> None:
    """Raise ``ValueError`` unless ``plan`` was made for the program whose fingerprint is
    ``got``; ``advice`` ends the message (what to do instead)."""
    if got != plan.fingerprint:
        raise ValueError(
            f"the plan passed to parallelize(plan=...) was made for another function or "
            f"input signature: fingerprint mismatch (plan {plan.fingerprint}, this function "
            f"with these arguments {got}). Plans are tied to the traced program and to the "
            f"argument tree structure, shapes, dtypes and static arguments; {advice}")


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PLAIN = (type(None), bool, int, float, complex, str, bytes, np.dtype, np.generic)


def _without_addresses(text: str) -> str:
    """``text`` with the memory addresses some reprs hold (``<object at 0x7f…>``) cut out."""
    return _ADDRESS.sub("", text)


def _qualified(obj) -> str:
    """``module.qualname`` of a function, class or other named object; functions defined
    inside others or lambdas also get their first line (two lambdas of one module differ)."""
    module = getattr(obj, "__module__", None) or "?"
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or "?"
    text = f"{module}.{name}"
    code = getattr(obj, "__code__", None) or getattr(getattr(obj, "__wrapped__", None),
                                                     "__code__", None)
    if code is not None and ("<" in name):
        text += f":{code.co_firstlineno}"
    return text


def static_identity(value) -> str:
    """A process-independent text for a static argument, for fingerprints and plan digests.

    Plain data by value (numbers, strings, dtypes; tuples, lists, sets and dicts of them,
    sets sorted so hash seeds do not matter); functions, classes, methods and modules by
    ``module.qualname``; ``functools.partial`` by its function and arguments; enum
    members, dataclasses and namedtuples by type and fields; anything else by its type
    and its ``repr`` when that holds no memory address, else by its type alone (the
    fingerprint also hashes the program the argument produces, so two objects of one
    type that trace differently still get different fingerprints).
    """
    if isinstance(value, _PLAIN):
        return f"{type(value).__name__}:{value!r}"
    if isinstance(value, enum.Enum):
        return f"{_qualified(type(value))}.{value.name}"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        fields = ",".join(f"{k}={static_identity(v)}" for k, v in zip(value._fields, value))
        return f"{_qualified(type(value))}({fields})"
    if isinstance(value, (tuple, list)):
        inner = ",".join(static_identity(v) for v in value)
        return f"{type(value).__name__}({inner})"
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}({','.join(sorted(static_identity(v) for v in value))})"
    if isinstance(value, dict):
        items = sorted(f"{static_identity(k)}:{static_identity(v)}" for k, v in value.items())
        return f"dict({','.join(items)})"
    if isinstance(value, functools.partial):
        kwargs = sorted(f"{k}={static_identity(v)}" for k, v in value.keywords.items())
        args = [static_identity(a) for a in value.args]
        return f"partial({static_identity(value.func)},{','.join(args + kwargs)})"
    if isinstance(value, types.MethodType):
        return f"method({static_identity(value.__self__)}.{value.__func__.__name__})"
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType,
                          types.ModuleType)) or hasattr(value, "__qualname__"):
        return _qualified(value) if not isinstance(value, types.ModuleType) else value.__name__
    if dataclasses.is_dataclass(value):
        fields = ",".join(f"{f.name}={static_identity(getattr(value, f.name))}"
                          for f in dataclasses.fields(value))
        return f"{_qualified(type(value))}({fields})"
    text = repr(value)
    if _ADDRESS.search(text) or " object at " in text:
        return f"instance of {_qualified(type(value))}{_plain_attributes(value)}"
    return f"{_qualified(type(value))}:{text}"


def _plain_attributes(value) -> str:
    """``(name=…, …)`` of an object's attributes when all are plain data (an activation
    object's settings), else nothing: large or nested state is not worth hashing."""
    attributes = getattr(value, "__dict__", None)
    if not isinstance(attributes, dict) or not attributes or len(attributes) > 32:
        return ""
    if not all(isinstance(v, _PLAIN) for v in attributes.values()):
        return ""
    return "(" + ",".join(f"{k}={static_identity(v)}" for k, v in sorted(attributes.items())) + ")"


def statics_text(statics) -> str:
    """The text of a call's static arguments, ``(position or name, value)`` pairs."""
    return "(" + ",".join(f"({k!r},{static_identity(v)})" for k, v in statics) + ")"
