"""Work on the batch written after the gradient (pipeline.batch_epilogue): metrics
computed from the logits a loss returns as aux, as flax's examples compute them (lm1b's
weighted accuracy, with the padding weights computed before the gradient; a count the
gradients are divided by), and aux leaves the step never reads. Each pipelined step gives
jax.jit's numbers; work on the batch with a gradient is refused, naming it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import autoshard
from tests.test_batch_prelude import VOCAB, _lm, _logits, _pipelined
from tests.trees import assert_trees_allclose

OPT = optax.adamw(1e-2)


def lm1b_metrics(params, opt_state, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = jnp.where(targets > 0, 1.0, 0.0)

    def loss(p):
        logits = _logits(p, inputs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return (ce * weights).sum() / weights.sum(), logits
    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = OPT.update(grads, opt_state, params)
    hits = (jnp.argmax(logits, -1) == targets) * weights
    metrics = {"loss": value, "accuracy": hits.sum() / weights.sum(),
               "targets": jnp.mean(jax.nn.one_hot(targets, VOCAB), axis=(0, 1))}
    return optax.apply_updates(params, updates), opt_state, metrics


def unread_logits(params, opt_state, tokens):
    def loss(p):
        logits = _logits(p, tokens[:, :-1])
        value = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return value, (logits, jnp.max(logits))
    (value, (logits, peak)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, peak, grads


def gradients_over_a_count(params, opt_state, tokens):
    # the count reads no gradient: it moves into the loss, a sum over the batch; the
    # division reads its total
    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(
            _logits(p, tokens[:, :-1]), tokens[:, 1:]).sum()
    value, grads = jax.value_and_grad(loss)(params)
    seen = jnp.sum(tokens[:, 1:] > 0)
    return value / seen, jax.tree.map(lambda g: g / seen, grads)


@pytest.fixture(scope="module")
def mesh():
    return autoshard.make_mesh((8,), ("data",))


@pytest.mark.parametrize("fn", [lm1b_metrics, unread_logits, gradients_over_a_count])
def test_metrics_after_the_gradient_match_jit(fn, mesh):
    params, tokens = _lm()
    args = (params, OPT.init(params), tokens)
    step = _pipelined(fn, mesh, batch_argnums=2)
    assert_trees_allclose(step(*args), jax.jit(fn)(*args))
    assert len(step.plan(*args).stages) == 2


def test_work_on_the_batch_reading_a_gradient_is_refused_naming_it(mesh):
    def embedding_rows_seen(params, opt_state, tokens):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(
                _logits(p, tokens[:, :-1]), tokens[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        return value, jnp.sum(grads["embed"][tokens[:, 0]] ** 2)

    params, tokens = _lm()
    # the gather of the gradient's rows cannot move into the loss, and its shape follows
    # the batch: refused, naming it (pipeline.batch_sizes)
    with pytest.raises(ValueError, match=r"gather at .*test_batch_epilogue.* makes a value "
                                         r"whose shape follows the batch's size"):
        _pipelined(embedding_rows_seen, mesh, batch_argnums=2).plan(
            params, OPT.init(params), tokens)
