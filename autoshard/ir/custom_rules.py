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
"""
from __future__ import annotations

import functools

import jax.extend.core as jcore

RULE_PRIMITIVE = "autoshard_custom_rule"
#: call primitives whose differentiation rule is the user's
CUSTOM_RULE_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


class _CustomRule(jcore.Primitive):
    """``autoshard_custom_rule``: binding it binds the call it stands for (see the module
    doc); it is never bound as itself."""

    multiple_results = True

    def bind(self, *operands, call_primitive, call_params, num_outputs, num_inlined):
        del num_inlined
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
