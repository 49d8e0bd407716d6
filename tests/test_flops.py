"""intra/flops.py: an equation's arithmetic and traffic, bodies of control flow included,
and control flow run replicated priced as XLA compiles it (the audit's flops and bytes)."""
import jax
import jax.numpy as jnp
import pytest

import autoshard
from autoshard.intra.flops import body_flops, op_flops

M, K = 8, 16
MATMUL = 2 * M * K * K  # one (M, K) @ (K, K)


def _eqn(fn, *args, name):
    """The first equation named ``name`` of ``fn``'s jaxpr, and its operand/result avals."""
    eqn = next(e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == name)
    return eqn, [v.aval for v in eqn.invars], [v.aval for v in eqn.outvars]


def _while(w, x, n):
    return jax.lax.while_loop(lambda c: c[0] < n,
                              lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1]


def _cond(w, x, flag):
    return jax.lax.cond(flag > 0, lambda: jnp.tanh(x @ w) @ w, lambda: x + 1.0)


def _cond_step(w, x, flag):  # its gradient: a second cond, of the branches' transposes
    def loss(w):
        h = jax.lax.cond(flag > 0, lambda: jnp.tanh(x @ w), lambda: jax.nn.relu(x @ w))
        return (h @ w.T).mean()
    loss, grad = jax.value_and_grad(loss)(w)
    return w - 0.1 * grad, loss


def _scan(w, x):
    return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=5)[0]


@pytest.mark.parametrize("fn, extra, name, matmuls", [
    (_while, (3,), "while", 1),  # the body once: its trip count is not known
    (_cond, (1,), "cond", 2),    # the dearer branch: two matmuls, not the sum of both
    (_scan, (), "scan", 5),      # the body times the length
])
def test_control_flow_is_counted_as_its_bodies_run(fn, extra, name, matmuls):
    w, x = jnp.ones((K, K)), jnp.ones((M, K))
    eqn, in_avals, out_avals = _eqn(fn, w, x, *extra, name=name)
    flops = op_flops(eqn, in_avals, out_avals)
    # the matmuls, plus elementwise work (a tanh per element, the loop's counter) only
    assert matmuls * MATMUL <= flops <= matmuls * MATMUL + matmuls * 4 * M * K


def test_a_body_with_a_rule_keeps_the_rule():
    # a variadic reduce carries its combining jaxpr: the rule (the reduction's size), not
    # that jaxpr's few scalar ops, counts it
    x = jnp.ones((M, K))
    eqn, in_avals, out_avals = _eqn(
        lambda x: jax.lax.reduce((x, x), (0.0, 0.0),
                                 lambda a, b: (a[0] + b[0], a[1] * b[1]), (1,)),
        x, name="reduce")
    assert op_flops(eqn, in_avals, out_avals) >= M * K
    assert body_flops(eqn.params["jaxpr"].jaxpr) < M * K


@pytest.mark.parametrize("fn, extra", [(_while, (3,)), (_cond, (1,)), (_cond_step, (1,))])
def test_control_flow_run_replicated_is_priced_as_compiled(fn, extra):
    # it used to be priced as its operands' and results' bytes alone, no arithmetic:
    # the audit found the body's flops missing (0.01x of the compiled while's). No dim
    # the 8 devices divide: the loop does not split (tests/test_control_flow.py)
    w, x = jnp.ones((7, 7)) * 0.1, jnp.ones((61, 7))
    step = autoshard.parallelize(fn, mesh=autoshard.make_mesh((8,), ("data",)))
    with pytest.warns(UserWarning, match="control flow primitive"):
        audit = step.audit(w, x, *extra)
    assert audit.ok, audit.summary()
