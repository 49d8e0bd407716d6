"""Without ``batch_argnums`` the batch is inferred (``autoshard.intra.batch``): state
(returned at its key path, or donated), PRNG keys and scalars are not data; the data
arguments sharing the last one's leading dim are. The plan says what it took."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.intra.batch import default_batch_argnums
from autoshard.ir.trace import trace

B, D, H = 16, 12, 8


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (D, H)) * 0.3, "w2": jax.random.normal(k2, (H, 1)) * 0.3}


def _data():
    x = jax.random.normal(jax.random.key(1), (B, D))
    return x, jnp.sin(x.sum(axis=1, keepdims=True))


def _loss(params, x, y, key=None):
    h = jnp.tanh(x @ params["w1"])
    if key is not None:  # dropout
        h = h * jax.random.bernoulli(key, 0.9, h.shape) / 0.9
    return jnp.mean((h @ params["w2"] - y) ** 2)


TX = optax.adam(1e-2)


def equinox_style_step(params, opt_state, x, y, key):
    """The PRNG key last: the old default (the last argument) took it as the batch."""
    loss, grads = jax.value_and_grad(_loss)(params, x, y, key)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def state_step(state, batch):
    """flax ``TrainState`` style: one state argument, the batch a dict."""
    loss, grads = jax.value_and_grad(_loss)(state["params"], batch["x"], batch["y"])
    updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
            "step": state["step"] + 1}, loss


def _mesh():
    return autoshard.make_mesh((2, 4), ("data", "model"))


def test_equinox_style_step_splits_the_data_not_the_key():
    params, (x, y) = _params(), _data()
    args = (params, TX.init(params), x, y, jax.random.key(2))
    step = autoshard.parallelize(equinox_style_step, mesh=_mesh(), method=autoshard.DataParallel())
    plan = step.plan(*args)
    assert plan.batch == ("args[2]", "args[3]") and plan.batch_inferred
    specs = dict(zip(plan.in_paths, plan.flat_in_specs))
    assert specs["args[2]"] == specs["args[3]"] == P(("data", "model"))
    assert specs["args[4]"] == P() and specs["args[0]['w1']"] == P()
    summary = plan.summary().splitlines()
    assert any(line.startswith("batch: args[2], args[3] (inferred") for line in summary)
    title = summary.index("inputs (the batch first, then the largest):")
    rows = summary[title + 1:title + 4]
    # the batch, then the largest tensor (w1 of (D, H) outgrows every other), with shapes
    assert [row.split()[0] for row in rows] == ["args[2]", "args[3]", "args[0]['w1']"]
    assert rows[0].endswith(str(list(x.shape))) and rows[2].endswith(str([D, H]))
    got, want = step(*args), jax.jit(equinox_style_step)(*args)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_state_and_dict_batch_step_splits_the_batch_dict():
    params, (x, y) = _params(), _data()
    state = {"params": params, "opt_state": TX.init(params), "step": 0}
    step = autoshard.parallelize(state_step, mesh=_mesh(), method=autoshard.DataParallel())
    plan = step.plan(state, {"x": x, "y": y})
    assert plan.batch == ("args[1]",)
    specs = dict(zip(plan.in_paths, plan.flat_in_specs))
    assert specs["args[1]['x']"] == specs["args[1]['y']"] == P(("data", "model"))


def test_keyword_batch_is_named_by_its_keyword():
    params, (x, y) = _params(), _data()

    def loss(params, *, x, y):
        return _loss(params, x, y)

    step = autoshard.parallelize(loss, mesh=_mesh(), method=autoshard.DataParallel())
    plan = step.plan(params, x=x, y=y)
    assert plan.batch == ("args[1] (x=)", "args[2] (y=)")


@pytest.mark.parametrize("fn, args, expected", [
    # no carried state: the data share the last argument's leading dim, the weights do not
    (lambda w, x: x @ w, (np.ones((D, H)), np.ones((B, D))), (1,)),
    # a scalar hyper-parameter after the data is not data
    (lambda w, x, lr: w - lr * (x @ w).sum(), (np.ones((D, H)), np.ones((B, D)), 0.1), (1,)),
    # state returned at its key path is not data, even with the batch's leading dim
    (lambda w, x: (w + x[:1].sum(), x.sum()), (np.ones((B, H)), np.ones((B, D))), (1,)),
    # a raw PRNGKey (uint32[2]) is not data
    (lambda x, key: x * jax.random.uniform(key, x.shape),
     (np.ones((B, D)), jax.random.PRNGKey(0)), (0,)),
    # nothing but state and scalars: no batch
    (lambda w, lr: (w * lr,), (np.ones((D, H)), 0.5), ()),
])
def test_default_batch_argnums(fn, args, expected):
    assert default_batch_argnums(trace(fn, args)) == expected


def test_donated_arguments_are_state():
    w, x = np.ones((B, H)), np.ones((B, D))
    traced = trace(lambda w, x: (x.sum(), x.sum() * w), (w, x))  # nothing at its key path
    assert default_batch_argnums(traced) == (0, 1)  # both share the leading dim
    assert default_batch_argnums(traced, donated_flat=(True, False)) == (1,)


def test_given_batch_argnums_are_kept_and_saved():
    params, (x, y) = _params(), _data()
    step = autoshard.parallelize(lambda p, x, y: _loss(p, x, y), mesh=_mesh(),
                                 method=autoshard.DataParallel(), batch_argnums=(1,))
    plan = step.plan(params, x, y)
    assert plan.batch == ("args[1]",) and not plan.batch_inferred
    assert "batch: args[1] (batch_argnums)" in plan.summary()
    again = autoshard.Plan.from_json(plan.to_json())
    assert (again.batch, again.batch_inferred) == (plan.batch, plan.batch_inferred)
