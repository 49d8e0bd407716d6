"""PipeshardParallel differentiates each stage itself (``jax.vjp``), so a loss's
``jax.custom_vjp`` / ``jax.custom_jvp`` functions must keep the user's rule there, as
``jax.jit`` does (``autoshard.ir.custom_rules``): straight-through estimators, gradient
reversal, a block with a hand-written backward, a safe norm, jax's linear solves; a
``lax.cond`` differentiates only its branch taken; ``jax.checkpoint`` recomputes its block
in the backward pass."""
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autoshard
from autoshard.ir.custom_rules import RULE_PRIMITIVE
from autoshard.ir.trace import trace
from autoshard.pipeline.layers import assign_layers
from autoshard.pipeline.markers import GRAD_PRIMITIVE, pipeline_tracing
from autoshard.pipeline.stage_program import stage_program
from autoshard.pipeline.trace import loss_of, split_step
from tests.trees import assert_trees_allclose

D = 32


@jax.custom_vjp
def straight_through_round(w):
    """Quantized weights whose gradient passes straight through (inlined: zero)."""
    return jnp.round(w * 4) / 4


straight_through_round.defvjp(lambda w: (straight_through_round(w), None), lambda _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def reverse_gradient(h, scale):
    """Identity forward, ``-scale`` times the cotangent backward (inlined: an identity)."""
    return h


reverse_gradient.defvjp(lambda h, scale: (h, None), lambda scale, _, g: (-scale * g,))


@jax.custom_vjp
def residual_block(w1, w2, h):
    """A block whose hand-written backward halves ``w1``'s gradient (unlike its math)."""
    return jax.nn.gelu(h @ w1) @ w2 + h


def _block_backward(saved, g):
    _, vjp = jax.vjp(lambda *a: jax.nn.gelu(a[2] @ a[0]) @ a[1] + a[2], *saved)
    g1, g2, gh = vjp(g)
    return 0.5 * g1, g2, gh


residual_block.defvjp(lambda w1, w2, h: (residual_block(w1, w2, h), (w1, w2, h)),
                      _block_backward)


@jax.custom_jvp
def safe_norm(v):
    """Row norms whose derivative is 0 at a zero row (inlined: NaN)."""
    return jnp.sqrt(jnp.sum(v * v, -1))


@safe_norm.defjvp
def _safe_norm_jvp(primals, tangents):
    (v,), (t,) = primals, tangents
    n = safe_norm(v)
    return n, jnp.sum(v * t, -1) / jnp.where(n == 0, 1.0, n)


def _loss(p, x, y, rules=True):
    ste = straight_through_round if rules else lambda w: jnp.round(w * 4) / 4
    rev = reverse_gradient if rules else lambda h, _: h
    block = residual_block if rules else lambda a, b, h: jax.nn.gelu(h @ a) @ b + h
    norm = safe_norm if rules else lambda v: jnp.sqrt(jnp.sum(v * v, -1))
    h = block(p["w1"], p["w2"], x)
    # the branch not taken has a NaN slope at negative values (inlined as a select: NaN)
    h = jax.lax.cond(p["w3"][0, 0] > -1e9, lambda h: 2.0 * h, jnp.sqrt, h) if rules else \
        jnp.where(p["w3"][0, 0] > -1e9, 2.0 * h, jnp.sqrt(h))
    h = jax.nn.relu(h @ ste(p["w3"])) * (y[:, None] % 2)      # zero rows for the norm
    # jnp.linalg.solve: its inlined solve reads LU factors behind a stop_gradient
    mixing = jnp.linalg.solve(jnp.eye(D) * 2 + 0.1 * p["w4"] @ p["w4"].T, p["w3"])
    adversary = jnp.mean((rev(h, 0.3) @ mixing) ** 2)
    logits = h @ p["head"]
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + adversary
            + 0.1 * jnp.mean(norm(h @ p["w4"])))


def _step(p, x, y):
    loss, grads = jax.value_and_grad(_loss)(p, x, y)
    return jax.tree.map(lambda a, g: a - 0.1 * g, p, grads), loss


def _inputs():
    k = jax.random.split(jax.random.key(0), 7)
    p = {name: jax.random.normal(key, (D, D)) / D ** 0.5
         for name, key in zip(["w1", "w2", "w3", "w4", "head"], k)}
    return p, jax.random.normal(k[5], (16, D)), jax.random.randint(k[6], (16,), 0, D)


def test_every_rule_changes_the_gradient():
    """The oracle of the test below: differentiated through their bodies, each function
    gives another gradient (or NaN)."""
    p, x, y = _inputs()
    with_rules = jax.jit(jax.grad(_loss))(p, x, y)
    inlined = jax.jit(jax.grad(functools.partial(_loss, rules=False)))(p, x, y)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(with_rules))
    # the block's rule, the rounding's, the reversal's and the norm's (NaN inlined)
    for name in ["w1", "w3", "w4"]:
        assert not np.allclose(with_rules[name], inlined[name]), name
    assert np.isnan(inlined["w2"]).any()   # the cond's, as a select


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_custom_rules_match_jit(schedule):
    p, x, y = _inputs()
    step = autoshard.parallelize(
        _step, mesh=autoshard.make_mesh((2, 2), ("data", "model")),
        method=autoshard.PipeshardParallel(num_microbatches=2, num_stages=2,
                                           schedule=schedule))
    assert_trees_allclose(step(p, x, y), jax.jit(_step)(p, x, y))


def test_layers_are_not_cut_inside_a_custom_rule():
    """The block (two matmuls under one custom rule) lies in one layer: asked for as many
    layers as there are matmuls, the cuts fall around it."""
    p, x, y = _inputs()
    with pipeline_tracing():
        traced = trace(lambda p, x, y: jax.value_and_grad(_loss)(p, x, y), (p, x, y))
    geqn = next(e for e in traced.program.eqns if e.primitive.name == GRAD_PRIMITIVE)
    forward = loss_of(geqn).program
    rules = [e for e, eqn in enumerate(forward.eqns) if eqn.primitive.name == RULE_PRIMITIVE]
    block = rules[0]   # the first call: the block's
    assert forward.eqns[block].params["call_primitive"].name == "custom_vjp_call"
    body = range(block - forward.eqns[block].params["num_inlined"], block + 1)
    assert sum(forward.eqns[e].primitive.name == "dot_general" for e in body) == 2
    batch_ids = set(traced.program.invars[-2:])   # x and y
    layering = assign_layers(forward, geqn.params["diff"],
                             [isinstance(a, int) and a in batch_ids for a in geqn.inputs],
                             num_layers=6)
    assert layering.num_layers >= 3
    assert len({layering.layer_of[e] for e in body}) == 1


def _layer(w, h, key=None):
    h = jax.nn.gelu(h @ w)
    if key is not None:   # dropout
        h = h * jax.random.bernoulli(key, 0.8, h.shape) / 0.8
    return h


def _layers_loss(p, x, y, checkpoint):
    h = x
    for name in ["w1", "w2", "w3", "w4"]:
        h = (jax.checkpoint(_layer) if checkpoint else _layer)(p[name], h)
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["head"], y).mean()


def _residual_bytes(checkpoint: bool) -> int:
    """Bytes the first of two stages keeps from its forward for its backward."""
    p, x, y = _inputs()
    step = lambda p, x, y: jax.value_and_grad(_layers_loss)(p, x, y, checkpoint)  # noqa: E731
    split = split_step(step, (p, x, y), (), [False] * 5 + [True, True], 2)
    layering = assign_layers(split.forward.program, split.layer_anchors(), split.batch, 2)
    stage = stage_program(layering, 0, 0, split.diff, split.batch)
    avals = stage.traced.program.avals
    return sum(math.prod(avals[v].shape) * avals[v].dtype.itemsize for v in stage.residuals)


def test_checkpointed_layers_keep_less_for_the_backward():
    """jax.checkpoint'd layers are recomputed in the stage's backward, as under jax.jit:
    their stage keeps their inputs, not their activations."""
    assert _residual_bytes(checkpoint=True) < 0.6 * _residual_bytes(checkpoint=False)


def test_a_checkpoint_cut_by_a_stage_boundary_matches_jit():
    """A checkpoint around the whole loss is cut (each stage differentiates its part as it
    is), yet the custom rule and the dropout inside it stay as jax.jit runs them."""
    p, x, y = _inputs()

    def loss(p, x, y, key):
        keys = jax.random.split(key, 4)
        h = x
        for name, k in zip(["w1", "w2", "w3", "w4"], keys):
            h = _layer(straight_through_round(p[name]), h, k)
        return optax.softmax_cross_entropy_with_integer_labels(h @ p["head"], y).mean()

    def step(p, x, y, key):
        return jax.value_and_grad(jax.checkpoint(loss))(p, x, y, key)

    key = jax.random.key(3)
    pipelined = autoshard.parallelize(
        step, mesh=autoshard.make_mesh((2, 2), ("data", "model")), batch_argnums=(1, 2),
        method=autoshard.PipeshardParallel(num_microbatches=2, num_stages=2))
    assert_trees_allclose(pipelined(p, x, y, key), jax.jit(step)(p, x, y, key))


@jax.custom_vjp
def normalised_gradient(w):
    """Identity forward; the cotangent divided by its norm (not linear in it)."""
    return w


normalised_gradient.defvjp(lambda w: (w, None),
                           lambda _, g: (g / jnp.maximum(1.0, jnp.linalg.norm(g)),))


@pytest.mark.parametrize("rule, warns", [(normalised_gradient, True),
                                         (straight_through_round, False)],
                         ids=["normalised", "straight-through"])
def test_a_weights_rule_not_linear_in_its_cotangent_warns(rule, warns):
    """A weight's cotangent is summed from the micro-batches' parts: a backward that
    normalises it per part is not jax.jit's, and is warned of; a linear one is exact."""
    p, x, y = _inputs()

    def step(p, x, y):
        return jax.value_and_grad(lambda p: jnp.mean((x @ rule(p["w1"])) ** 2))(p)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split_step(step, (p, x, y), (), [False] * 5 + [True, True], 2)
    messages = [str(w.message) for w in caught if "custom_vjp" in str(w.message)]
    assert len(messages) == warns
    if warns:
        assert "test_pipeline_custom_rules.py" in messages[0] and "num_microbatches=1" in messages[0]


def test_an_equinox_models_filter_checkpoint_keeps_less_for_the_backward():
    """The same through a library: an equinox model whose layers run under
    ``eqx.filter_checkpoint``, trained with ``eqx.filter_value_and_grad`` over a loss that
    closes over the batch."""
    eqx = pytest.importorskip("equinox")
    keys = jax.random.split(jax.random.key(0), 4)

    class MLP(eqx.Module):
        layers: list

        def __call__(self, x, checkpoint):
            for layer in self.layers:
                apply = lambda layer, h: jax.nn.gelu(jax.vmap(layer)(h))  # noqa: E731
                x = (eqx.filter_checkpoint(apply) if checkpoint else apply)(layer, x)
            return x

    model = MLP([eqx.nn.Linear(D, D, key=k) for k in keys[:3]])
    x, y = jax.random.normal(keys[3], (16, D)), jnp.zeros((16, D))

    def residual_bytes(checkpoint):
        def step(model, x, y):
            return eqx.filter_value_and_grad(
                lambda m: jnp.mean((m(x, checkpoint) - y) ** 2))(model)
        params, static = eqx.partition(model, eqx.is_array)
        run = lambda p, x, y: step(eqx.combine(p, static), x, y)  # noqa: E731
        n = len(jax.tree.leaves(params))
        split = split_step(run, (params, x, y), (), [False] * n + [True, True], 2)
        layering = assign_layers(split.forward.program, split.layer_anchors(), split.batch, 2)
        stage = stage_program(layering, 0, 0, split.diff, split.batch)
        avals = stage.traced.program.avals
        return sum(math.prod(avals[v].shape) * avals[v].dtype.itemsize for v in stage.residuals)

    assert residual_bytes(True) < 0.6 * residual_bytes(False)
