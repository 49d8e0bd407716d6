"""Work on the batch written before the differentiated loss (pipeline.batch_prelude):
token slices, padding weights, a count, input noise and a projection outside the gradient,
as language-model steps write them. Each pipelined step gives jax.jit's loss and
gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autoshard
from tests.trees import assert_trees_allclose

VOCAB, D, B, T = 32, 16, 8, 12


def _lm():
    rng = np.random.default_rng(0)
    params = {"embed": jnp.asarray(rng.normal(size=(VOCAB, D)) * .2, jnp.float32),
              "layers": [{"w": jnp.asarray(rng.normal(size=(D, D)) * .2, jnp.float32)}
                         for _ in range(4)]}
    tokens = rng.integers(1, VOCAB, size=(B, T + 1))
    tokens[np.arange(T + 1)[None, :] >= rng.integers(3, T + 1, size=(B, 1))] = 0  # padding
    return params, jnp.asarray(tokens, jnp.int32)


def _logits(params, inputs):
    h = params["embed"][inputs]
    for layer in params["layers"]:
        h = h + jnp.tanh(h @ layer["w"])
    return h @ params["embed"].T


def slices_and_weights(params, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = jnp.where(targets > 0, 1.0, 0.0)

    def loss(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(_logits(p, inputs), targets)
        return (ce * weights).sum() / weights.sum()
    return jax.value_and_grad(loss)(params)


def count_outside(params, tokens):
    weights = (tokens[:, 1:] > 0).astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)

    def loss(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(_logits(p, tokens[:, :-1]),
                                                             tokens[:, 1:])
        return jnp.sum(ce * weights) / count, {"tokens": count}
    return jax.value_and_grad(loss, has_aux=True)(params)


def noise_and_projection_outside(params, tokens, key):
    # outside the gradient: noise added to the embeddings, which a projection reads; no
    # gradient flows through either, under jax.jit as in the pipeline
    h0 = params["embed"][tokens[:, :-1]]
    h0 = h0 + 0.1 * jax.random.normal(key, h0.shape)
    h0 = h0 @ params["layers"][0]["w"]

    def loss(p):
        h = h0
        for layer in p["layers"]:
            h = h + jnp.tanh(h @ layer["w"])
        return jnp.mean(h ** 2)
    return jax.value_and_grad(loss)(params)


@pytest.fixture(scope="module")
def mesh():
    return autoshard.make_mesh((8,), ("data",))


def _pipelined(fn, mesh, batch_argnums=1):
    method = autoshard.PipeshardParallel(num_microbatches=2, num_stages=2, num_layers=2,
                                         stage_method=autoshard.DataParallel())
    return autoshard.parallelize(fn, mesh=mesh, method=method, batch_argnums=batch_argnums)


@pytest.mark.parametrize("fn", [slices_and_weights, count_outside, noise_and_projection_outside])
def test_work_on_the_batch_before_the_loss_matches_jit(fn, mesh):
    params, tokens = _lm()
    args = (params, tokens) if fn is not noise_and_projection_outside else \
        (params, tokens, jax.random.key(1))
    step = _pipelined(fn, mesh)
    assert_trees_allclose(step(*args), jax.jit(fn)(*args))
    assert len(step.plan(*args).stages) == 2


def test_a_gradient_with_respect_to_work_on_the_batch_is_refused(mesh):
    def step(params, tokens):
        h0 = params["embed"][tokens[:, :-1]]

        def loss(p, h):
            for layer in p["layers"]:
                h = h + jnp.tanh(h @ layer["w"])
            return jnp.mean(h ** 2)
        return jax.value_and_grad(loss, argnums=(0, 1))(params, h0)

    with pytest.raises(ValueError, match="uses the batch outside the function it differentiates"):
        _pipelined(step, mesh).plan(*_lm())
