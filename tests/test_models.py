"""Smoke tests for the reference workloads in examples/models.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.models import WORKLOADS, Workload, gpt, mlp

# (id, factory, kwargs): every registered workload with defaults, plus the variants.
CASES = [(name, factory, {}) for name, factory in WORKLOADS.items()] + [
    ("mlp_adam", mlp, {"optimizer": "adam"}),
    ("gpt_remat", gpt, {"remat": True}),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,factory,kwargs", CASES, ids=IDS)
def test_train_step_runs_and_loss_decreases(name, factory, kwargs):
    w = factory(**kwargs)
    assert isinstance(w, Workload)
    params, opt_state, batch = w.args
    assert w.batch_argnums == (len(w.args) - 1,)
    step = jax.jit(w.fn)

    losses = []
    for _ in range(3):
        out = step(params, opt_state, batch)
        assert isinstance(out, tuple) and len(out) == 3
        new_params, new_opt_state, loss = out
        assert jax.tree.structure(new_params) == jax.tree.structure(params)
        assert jax.tree.structure(new_opt_state) == jax.tree.structure(opt_state)
        assert jnp.shape(loss) == ()
        assert np.isfinite(float(loss))
        losses.append(float(loss))
        params, opt_state = new_params, new_opt_state
    assert losses[0] > losses[1] > losses[2], losses


@pytest.mark.parametrize("name,factory,kwargs", CASES, ids=IDS)
def test_abstract_args_match(name, factory, kwargs):
    concrete = factory(**kwargs)
    abstract = factory(**kwargs, abstract=True)
    assert abstract.name == concrete.name
    assert abstract.batch_argnums == concrete.batch_argnums
    assert jax.tree.structure(abstract.args) == jax.tree.structure(concrete.args)
    for a, c in zip(jax.tree.leaves(abstract.args), jax.tree.leaves(concrete.args)):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert isinstance(c, jax.Array)
        assert a.shape == c.shape and a.dtype == c.dtype

    # The step can be traced from shapes alone and keeps (params, opt_state, loss).
    params, opt_state, _ = abstract.args
    new_params, new_opt_state, loss = jax.eval_shape(abstract.fn, *abstract.args)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    assert jax.tree.structure(new_opt_state) == jax.tree.structure(opt_state)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert loss.shape == ()


def test_deterministic():
    a, b = mlp(seed=3), mlp(seed=3)
    for x, y in zip(jax.tree.leaves(a.args), jax.tree.leaves(b.args)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_default_split_dims_divisible_by_8():
    for name, factory in WORKLOADS.items():
        for leaf in jax.tree.leaves(factory(abstract=True).args):
            for dim in leaf.shape:
                if name == "gpt" and dim == 17:  # tokens [batch, seq + 1]
                    continue
                if dim > 3:  # 3x3 conv kernel dims are never split
                    assert dim % 8 == 0, (name, leaf.shape)
