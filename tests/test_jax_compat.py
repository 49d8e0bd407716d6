"""The tracer inlines every call-like primitive jax uses to structure a program, under the
names of this jax and of the next (``autoshard.ir.jax_compat``)."""
from __future__ import annotations

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest

from autoshard.ir.jax_compat import INLINED_CALLS
from autoshard.ir.trace import trace
from autoshard.runtime import evaluate_program


def _call_primitive(name: str, param: str) -> jcore.Primitive:
    """A call-like primitive as jax defines them: runs the jaxpr in ``param``."""
    prim = jcore.Primitive(name)
    prim.multiple_results = True
    prim.def_abstract_eval(lambda *avals, **params: [v.aval for v in params[param].jaxpr.outvars])
    prim.def_impl(lambda *args, **params: jcore.jaxpr_as_fun(params[param])(*args))
    return prim


@pytest.mark.parametrize("name,param", [("eval_jaxpr", "call_jaxpr"), ("eval_jaxpr", "jaxpr"),
                                        ("closed_call", "call_jaxpr")])
def test_call_like_primitives_are_inlined(name, param):
    prim = _call_primitive(name, param)
    callee = jax.make_jaxpr(lambda w, x: [jnp.tanh(x @ w)])(
        jax.ShapeDtypeStruct((4, 4), jnp.float32), jax.ShapeDtypeStruct((2, 4), jnp.float32))

    def f(w, x):
        return prim.bind(w, x, **{param: callee})[0].sum()

    w = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)
    x = np.ones((2, 4), np.float32)
    traced = trace(f, (w, x))
    names = [e.primitive.name for e in traced.program.eqns]
    assert name not in names and "dot_general" in names and "tanh" in names
    (out,) = evaluate_program(traced.program, (w, x))
    np.testing.assert_allclose(out, np.tanh(x @ w).sum(), rtol=1e-6)


def test_the_table_names_where_each_callee_lives():
    assert INLINED_CALLS["eval_jaxpr"] == ("call_jaxpr", "jaxpr")
    assert all(params for params in INLINED_CALLS.values())
