"""A ``jax.custom_vjp`` / ``jax.custom_jvp`` call's rule, kept beside its inlined body.

Tracing inlines such a call: the analyses read its body's equations like any others. A
program that autoshard differentiates itself (a pipeline's loss, whose stages are
differentiated each on its own with ``jax.vjp``) would then be differentiated through that
body, not by the user's rule: a straight-through estimator's gradient would be zero, a
gradient clip would not clip. Where a program keeps rules (``flatten_open_jaxpr(...,
keep_custom_rules=True)``), each outermost call's inlined body is followed by one
``autoshard_custom_rule`` equation. Its inputs are the body's results, then the call's
operands; its outputs are the call's results. The analyses read it as the identity on the
body's results. Evaluated (``jax_compat.bind``), it binds the user's call on the operands,
so jax applies the user's rule; the inlined body then has no reader and is dropped from
the traced program.

A ``jax.checkpoint`` call is kept so too: rebound, its body is recomputed in the backward
pass, as the user asked, instead of every activation being stored. Unlike a custom
gradient, it may be *dissolved* (``with_dissolved``: the rule equation becomes the
identity on its body's results) where rebinding it would not compute what the program
computes: a stage holding part of its body, or a body whose random draws the pipeline
rewrote. A ``lax.cond`` that tracing computes as every branch and a select is kept so as
well (jax differentiates only the branch taken), and dissolved only where its branches'
random draws were rewritten.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.extend.core as jcore

RULE_PRIMITIVE = "autoshard_custom_rule"
#: call primitives whose differentiation rule is the user's (or jax's own for a linear
#: solve, ``jnp.linalg.solve``: its inlined solve reads factors of the matrix behind a
#: ``stop_gradient``; its rule differentiates through the matrix-vector product)
CUSTOM_RULE_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
                               "custom_linear_solve"})
#: of those, the calls whose backward the user wrote (a ``jax.custom_vjp``'s): it may be
#: anything, where a JVP rule or a solve's transpose is linear in the cotangent by construction
USER_BACKWARD_CALLS = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})
#: ``jax.checkpoint``: differentiated, its body is recomputed in the backward pass (the
#: user's rematerialization); a rule equation of one may be *dissolved* (the identity on
#: its body's results: the body differentiated as it is, everything it makes stored)
REMAT_CALLS = frozenset({"checkpoint", "remat", "remat2"})
#: a ``lax.cond`` traced as its branches and a select: differentiated so, a branch not
#: taken would get a zero cotangent, and 0 * inf (``jnp.sqrt`` at a negative value) is NaN;
#: jax differentiates the branch taken only
BRANCH_CALLS = frozenset({"cond"})
KEPT_CALLS = CUSTOM_RULE_CALLS | REMAT_CALLS | BRANCH_CALLS


class _CustomRule(jcore.Primitive):
    """``autoshard_custom_rule``: binding it binds the call it stands for (see the module
    doc); it is never bound as itself."""

    multiple_results = True

    def bind(self, *operands, call_primitive, call_params, num_outputs, num_inlined,
             dissolved=False):
        del num_inlined
        if dissolved:
            return list(operands[:num_outputs])
        outs = call_primitive.bind(*operands[num_outputs:],
                                   **call_primitive.get_bind_params(call_params))
        return list(outs) if call_primitive.multiple_results else [outs]


@functools.cache
def custom_rule_primitive() -> jcore.Primitive:
    return _CustomRule(RULE_PRIMITIVE)


def rule_params(call_eqn, num_outputs: int, num_inlined: int) -> dict:
    """The ``autoshard_custom_rule`` equation's parameters for jax's ``call_eqn``, whose
    body was inlined as ``num_inlined`` equations making its ``num_outputs`` results."""
    return {"call_primitive": call_eqn.primitive, "call_params": dict(call_eqn.params),
            "num_outputs": num_outputs, "num_inlined": num_inlined}


def is_custom_rule(eqn) -> bool:
    return eqn.primitive.name == RULE_PRIMITIVE


def is_user_rule(eqn) -> bool:
    """A rule equation of a ``jax.custom_vjp`` / ``jax.custom_jvp`` call or a linear solve
    (``CUSTOM_RULE_CALLS``: never dissolved)."""
    return is_custom_rule(eqn) and eqn.params["call_primitive"].name in CUSTOM_RULE_CALLS


def body(eqns, m: int) -> range:
    """Indices of rule equation ``m``'s inlined body in ``eqns`` (before it)."""
    return range(max(0, m - eqns[m].params["num_inlined"]), m)


def is_cut_free(eqn) -> bool:
    """A rule equation whose body no layer boundary should cut: rebinding its call in the
    stage holding the rule equation is what keeps its gradient jax's (all but a
    checkpoint's, which may be dissolved instead)."""
    return is_custom_rule(eqn) and eqn.params["call_primitive"].name not in REMAT_CALLS


def with_dissolved(eqns, calls: frozenset, keep) -> tuple:
    """``eqns`` with each rule equation of one of ``calls`` dissolved unless ``keep(m, its
    body)`` (``m``: its index) says to keep it."""
    out = list(eqns)
    for m, eqn in enumerate(eqns):
        if is_custom_rule(eqn) and eqn.params["call_primitive"].name in calls \
                and not eqn.params.get("dissolved") and not keep(m, body(eqns, m)):
            out[m] = dataclasses.replace(eqn, params={**eqn.params, "dissolved": True})
    return tuple(out)


def backward_is_linear(eqn, operand_structs) -> bool:
    """Whether the backward of rule equation ``eqn``'s call (a ``jax.custom_vjp``'s rule),
    at operands of ``operand_structs`` (ShapeDtypeStructs), is linear in the cotangent:
    ``jax.linear_transpose`` transposes it (a clip or a norm of the cotangent does not)."""
    primitive, params = eqn.params["call_primitive"], eqn.params["call_params"]

    def call(*operands):
        return primitive.bind(*operands, **primitive.get_bind_params(params))

    inexact = lambda x: jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)  # noqa: E731

    def transposed(*operands):
        floats = [k for k, x in enumerate(operands) if inexact(x)]

        def of_floats(*xs):   # the differentiable part: inexact operands to inexact results
            full = list(operands)
            for k, x in zip(floats, xs):
                full[k] = x
            return [y for y in call(*full) if inexact(y)]

        outs, vjp = jax.vjp(of_floats, *[operands[k] for k in floats])
        return jax.linear_transpose(vjp, outs)(vjp(outs))

    try:
        jax.make_jaxpr(transposed)(*operand_structs)
    except Exception:  # noqa: BLE001 - any failure to transpose: not known to be linear
        return False
    return True
