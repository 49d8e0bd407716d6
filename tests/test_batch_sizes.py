"""The work outside a pipelined loss counts the whole batch (pipeline.batch_sizes): an
examples-seen counter and a loss scaled by the batch's size, which the step traced at
micro-batch shapes wrote one micro-batch's size into (silently half jax.jit's values with
two micro-batches), and a value outside the loss whose shape follows the batch, refused."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoshard
from tests.trees import assert_trees_allclose


def _mlp():
    rng = np.random.default_rng(0)
    params = [{"w": jnp.asarray(rng.normal(size=(16, 16)) * .3, jnp.float32)} for _ in range(4)]
    return params, jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)


def _forward(params, x):
    for layer in params:
        x = jnp.tanh(x @ layer["w"])
    return x


def _pipelined(fn):
    method = autoshard.PipeshardParallel(num_microbatches=2, num_stages=2, num_layers=2,
                                         stage_method=autoshard.DataParallel())
    return autoshard.parallelize(fn, mesh=autoshard.make_mesh((8,), ("data",)), method=method,
                                 batch_argnums=2)


def test_sizes_of_the_batch_outside_the_loss_are_the_whole_batchs():
    def step(params, seen, x):
        value, grads = jax.value_and_grad(lambda p: jnp.mean(_forward(p, x) ** 2))(params)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return params, seen + x.shape[0], value * x.shape[0], x.shape[0]

    params, x = _mlp()
    args = (params, jnp.int32(3), x)
    got, want = _pipelined(step)(*args), jax.jit(step)(*args)
    assert int(got[1]) == int(want[1]) == 19 and int(got[3]) == 16
    assert_trees_allclose(got, want)


def test_a_value_outside_the_loss_shaped_like_the_batch_is_refused():
    def step(params, seen, x):
        value, grads = jax.value_and_grad(lambda p: jnp.mean(_forward(p, x) ** 2))(params)
        return grads, jnp.zeros(x.shape[0]) + value

    params, x = _mlp()
    with pytest.raises(ValueError, match=r"broadcast_in_dim at .*test_batch_sizes.* makes a "
                                         r"value whose shape follows the batch's size \(\(8,\) "
                                         r"for one micro-batch, \(16,\) for the batch\)"):
        _pipelined(step).plan(params, jnp.int32(0), x)
