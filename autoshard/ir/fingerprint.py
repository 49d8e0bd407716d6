"""A stable, process-independent hash of a traced program and its signature: what ties a
saved plan to the function it was made for, and what processes compare."""
from __future__ import annotations

import hashlib

from .jax_compat import threefry_partitionable
from .program import Literal
from .signature import argument_text, equation_signature
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
    for part in [str(traced.in_tree), str(traced.out_tree), static_repr]:
        digest.update(part.encode() + b"\0")
    digest.update(";".join(argument_text(a) for a in argument_avals).encode())
    if any(eqn.primitive.name == "random_bits" for eqn in program.eqns):
        # whether random bits may be split depends on this flag: a plan made under one
        # setting is priced for it
        digest.update(f"threefry_partitionable={threefry_partitionable()}".encode())
    digest.update(repr((program.invars, [a if isinstance(a, int) else "lit"
                                         for a in program.outvars])).encode())
    for eqn in program.eqns:
        in_avals = [None if isinstance(a, Literal) else program.avals[a] for a in eqn.inputs]
        out_avals = [program.avals[v] for v in eqn.outputs]
        wiring = ([a for a in eqn.inputs if isinstance(a, int)], eqn.outputs)
        digest.update(repr((equation_signature(eqn, in_avals, out_avals), wiring)).encode())
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
