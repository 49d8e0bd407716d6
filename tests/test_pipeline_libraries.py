"""PipeshardParallel on training steps written as flax users write them, unmodified: a linen
decoder-only LM in the style of flax's lm1b example (``TrainState``, ``jax.value_and_grad``,
``nn.Dropout`` and attention dropout driven by ``rngs={'dropout': key}``, the key passed
last), the nnx decoder of ``examples/nnx_gemma_style.py`` (``nnx.value_and_grad``,
``nnx.Optimizer``) and an nnx model whose dropout keeps its RNG state in the model. Every
step's loss and new state equal ``jax.jit``'s, dropout masks included, under both
schedules. Then: jax's gradient is found however it is written, and a step without one is
refused with an error saying what to write."""
from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax import grad as imported_grad
from jax import value_and_grad as imported_value_and_grad

import autoshard
from autoshard.pipeline.markers import GRAD_PRIMITIVE
from autoshard.pipeline.trace import split_step
from examples import nnx_gemma_style
from tests.trees import ADAM_ATOL, assert_trees_allclose

VOCAB, EMBED, HEADS, LAYERS, SEQ, BATCH = 64, 32, 2, 2, 16, 8
DROPOUT = 0.1


def _position_table(length: int, dim: int) -> np.ndarray:
    """``(1, length, dim)`` fixed sinusoids, made with numpy: a constant of the step."""
    position = np.arange(length, dtype=np.float64)[:, None]
    rate = np.exp(-np.log(10000.0) * np.arange(0, dim, 2) / dim)
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2] = np.sin(position * rate)
    table[:, 1::2] = np.cos(position * rate)
    return table[None]


class FeedForward(nn.Module):
    hidden: int
    dropout: float

    @nn.compact
    def __call__(self, x, *, train: bool):
        h = nn.relu(nn.Dense(self.hidden)(x))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = nn.Dense(x.shape[-1])(h)
        return nn.Dropout(self.dropout)(h, deterministic=not train)


class DecoderBlock(nn.Module):
    """Pre-LN: self-attention (attention dropout), then the feed-forward, each residual."""

    heads: int
    dropout: float

    @nn.compact
    def __call__(self, x, mask, *, train: bool):
        h = nn.LayerNorm()(x)
        # as lm1b: no biases (a key bias gets a zero gradient, whose float noise Adam
        # would blow up to its learning rate) and a dropout mask per (example, head)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, use_bias=False,
                                            broadcast_dropout=False, dropout_rate=self.dropout,
                                            deterministic=not train)(h, h, mask=mask)
        x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
        return x + FeedForward(4 * x.shape[-1], self.dropout)(nn.LayerNorm()(x), train=train)


class DecoderLM(nn.Module):
    """Token embedding, a fixed sinusoidal position table, decoder blocks, logits through
    the embedding (``attend``): what lm1b's ``TransformerLM`` is, smaller."""

    vocab: int = VOCAB
    embed: int = EMBED
    heads: int = HEADS
    layers: int = LAYERS
    max_len: int = SEQ
    dropout: float = DROPOUT

    @nn.compact
    def __call__(self, tokens, *, train: bool):
        embedding = nn.Embed(self.vocab, self.embed,
                             embedding_init=nn.initializers.normal(stddev=1.0))
        inputs = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]   # shifted right: predict next
        x = embedding(inputs) + _position_table(self.max_len, self.embed)[:, :tokens.shape[1]]
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        mask = nn.combine_masks(nn.make_attention_mask(tokens > 0, tokens > 0),
                                nn.make_causal_mask(tokens))
        for i in range(self.layers):
            x = DecoderBlock(self.heads, self.dropout, name=f"block_{i}")(x, mask, train=train)
        x = nn.LayerNorm()(x)
        return embedding.attend(x) / jnp.sqrt(x.shape[-1])


def lm_train_step(state, batch, dropout_key):
    """One step as lm1b's ``train_step`` takes it: padding weights computed before the
    gradient, the loss closing over them and over the batch, dropout keys folding in the
    step number, ``jax.value_and_grad`` returning the logits as aux, and the metrics
    computed from them after the gradient; the loss and the accuracy are means over the
    tokens that are not padding (0), weighted sums over the weights' sum, as lm1b's
    ``compute_weighted_cross_entropy`` and ``compute_metrics`` compute them."""
    tokens = batch["inputs"]
    weights = jnp.where(tokens > 0, 1.0, 0.0)
    key = jax.random.fold_in(dropout_key, state.step)

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, tokens, train=True,
                                rngs={"dropout": key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens) * weights
        return loss.sum() / weights.sum(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    hits = (jnp.argmax(logits, -1) == tokens) * weights
    return state.apply_gradients(grads=grads), {"loss": loss,
                                                "accuracy": hits.sum() / weights.sum()}


def _lm_state():
    model = DecoderLM()
    tokens = jnp.ones((1, SEQ), jnp.int32)
    # under jax.jit, as flax's examples initialise: one compile, not one per initializer
    params = jax.jit(lambda key: model.init(key, tokens, train=False))(jax.random.key(0))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=optax.adamw(1e-2))


def _lm_batches(steps: int):
    rng = np.random.default_rng(0)
    for _ in range(steps):   # sequences of different lengths, padded with 0
        tokens = rng.integers(1, VOCAB, (BATCH, SEQ))
        tokens[np.arange(SEQ)[None, :] >= rng.integers(2, SEQ + 1, (BATCH, 1))] = 0
        yield {"inputs": jnp.asarray(tokens, jnp.int32)}


def _pipeline(schedule: str, num_microbatches: int = 2):
    return autoshard.PipeshardParallel(num_microbatches=num_microbatches, num_stages=2,
                                       num_layers=2, schedule=schedule,
                                       stage_method=autoshard.DataParallel())


@pytest.fixture(scope="module")
def mesh():
    return autoshard.make_mesh((8,), ("data",))


@pytest.fixture(scope="module")
def lm_reference():
    """``jax.jit``'s two steps from the initial state: (state, batches, dropout key, the
    metrics of each step, the final state)."""
    state, batches, key = _lm_state(), list(_lm_batches(2)), jax.random.key(42)
    jitted = jax.jit(lm_train_step)
    metrics, final = [], state
    for batch in batches:
        final, step_metrics = jitted(final, batch, key)
        metrics.append(step_metrics)
    # the dropout is live: another key gives another loss
    other_key = jitted(state, batches[0], jax.random.key(43))[1]["loss"]
    assert abs(float(other_key) - float(metrics[0]["loss"])) > 1e-4
    return state, batches, key, metrics, final


@pytest.mark.parametrize("schedule", ["1f1b"])  # gpipe: the nnx test below
def test_flax_lm1b_style_train_state_with_dropout_matches_jit(mesh, lm_reference, schedule):
    state, batches, key, ref_metrics, ref = lm_reference
    step = autoshard.parallelize(lm_train_step, mesh=mesh, method=_pipeline(schedule))
    ours = state
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # every dropout mask is reproduced: no warning
        for batch, expected in zip(batches, ref_metrics):
            ours, metrics = step(ours, batch, key)
            assert_trees_allclose(metrics, expected)
    assert int(ours.step) == 2
    assert_trees_allclose(ours.params, ref.params)
    assert_trees_allclose(ours.opt_state, ref.opt_state)
    plan = step.plan(ours, batches[0], key)
    assert len(plan.stages) == 2
    assert plan.batch == ("args[1]",)   # the key, last, is not the batch


def test_nnx_optimizer_step_matches_jit(mesh):
    """examples/nnx_gemma_style.py's step (nnx.value_and_grad, nnx.Optimizer, tied
    embeddings), under GPipe (the dropout test below runs 1F1B)."""
    graphdef, state = nnx_gemma_style.create(vocab=VOCAB, dim=EMBED, heads=HEADS,
                                             layers=LAYERS)
    train_step = nnx_gemma_style.make_step(graphdef)
    step = autoshard.parallelize(train_step, mesh=mesh, method=_pipeline("gpipe"))
    ours = ref = state
    rng = np.random.default_rng(1)
    for _ in range(2):
        tokens = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ + 1)), jnp.int32)
        ours, loss = step(ours, tokens)
        ref, ref_loss = jax.jit(train_step)(ref, tokens)
        assert_trees_allclose(loss, ref_loss)
    assert_trees_allclose(ours, ref, atol=ADAM_ATOL)  # parameters, Adam's moments, the step count
    plan = step.plan(ours, tokens)
    assert len(plan.stages) == 2 and plan.batch == ("args[1]",)


class DropoutMLP(nnx.Module):
    """nnx's dropout keeps its RNG stream in the model: each call advances a counter that
    ``nnx.value_and_grad`` hands back as an (integer) update beside the loss."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(EMBED, 4 * EMBED, rngs=rngs)
        self.dropout = nnx.Dropout(DROPOUT, rngs=rngs)
        self.out = nnx.Linear(4 * EMBED, EMBED, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(jax.nn.gelu(self.hidden(x))))


def _key_data(tree):
    """``tree`` with typed PRNG keys as their integer data (comparable with numpy)."""
    is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)  # noqa: E731
    return jax.tree.map(lambda a: jax.random.key_data(a) if is_key(a) else a, tree)


def test_nnx_dropout_with_its_rng_state_matches_jit(mesh):
    model = DropoutMLP(nnx.Rngs(params=0, dropout=1))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.adam(1e-2),
                                                      wrt=nnx.Param)))

    def train_step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    keys = jax.random.split(jax.random.key(5), 2)
    x, y = (jax.random.normal(k, (2 * BATCH, EMBED)) for k in keys)
    step = autoshard.parallelize(train_step, mesh=mesh, method=_pipeline("1f1b", 4))
    ours = ref = state
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the dropout masks are reproduced
        for _ in range(2):
            ours, loss = step(ours, x, y)
            ref, ref_loss = jax.jit(train_step)(ref, x, y)
            assert_trees_allclose(loss, ref_loss)
    # the RNG counter advanced once per step, as under jax.jit, not once per micro-batch
    assert int(ours[0]["dropout"]["rngs"]["count"].get_value()) == 2
    assert_trees_allclose(_key_data(ours), _key_data(ref))


def test_nnx_metrics_updated_after_the_gradient_match_jit(mesh):
    """The nnx tutorials' step: ``nnx.MultiMetric`` (accuracy, average loss) updated from the
    logits the loss returns as aux, after the gradient (``pipeline.batch_epilogue``). The
    accuracy metric's count adds ``labels.size``, the whole batch's
    (``pipeline.batch_sizes``): one micro-batch's before, silently."""
    model = DropoutMLP(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
    graphdef, state = nnx.split((model, optimizer, metrics))

    def train_step(state, x, labels):
        model, optimizer, metrics = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits
        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        metrics.update(loss=loss, logits=logits, labels=labels)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer, metrics))

    x = jax.random.normal(jax.random.key(5), (2 * BATCH, EMBED))
    labels = jax.random.randint(jax.random.key(6), (2 * BATCH,), 0, EMBED)
    step = autoshard.parallelize(train_step, mesh=mesh, method=_pipeline("1f1b", 4))
    ours, ref = step(state, x, labels), jax.jit(train_step)(state, x, labels)
    assert_trees_allclose(_key_data(ours), _key_data(ref))
    assert int(ours[2]["accuracy"]["count"].get_value()) == 2 * BATCH


# ------------------------------------------------------------------ finding jax's gradient
def _mlp_loss(params, x):
    return jnp.mean(jnp.tanh(x @ params["w1"]) @ params["w2"])


def with_jax_value_and_grad(params, x):
    return jax.value_and_grad(lambda p: _mlp_loss(p, x))(params)


def with_imported_value_and_grad(params, x):   # bound before any pipeline traced it
    return imported_value_and_grad(lambda p: _mlp_loss(p, x))(params)


def with_imported_grad_and_aux(params, x):
    return imported_grad(lambda p: (_mlp_loss(p, x), {"mean": jnp.mean(x)}),
                         has_aux=True)(params)


def with_jacrev_after(params, x):   # a jax.jacrev outside the loss stays jax's
    value, grads = jax.value_and_grad(lambda p: _mlp_loss(p, x))(params)
    return value, jax.jacrev(lambda w: jnp.tanh(w).sum(0))(grads["w2"])


def with_gradient_penalty(params, x):   # a gradient inside the loss is second order
    def loss(p):
        # each example's own input gradient (of a sum: a mean's would scale with the batch)
        slope = jax.grad(lambda inputs: jnp.sum(jnp.tanh(inputs @ p["w1"]) @ p["w2"]))(x)
        return _mlp_loss(p, x) + jnp.mean(slope ** 2)
    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("step", [with_jax_value_and_grad, with_imported_value_and_grad,
                                  with_imported_grad_and_aux, with_jacrev_after,
                                  with_gradient_penalty], ids=lambda f: f.__name__)
def test_jax_gradient_is_the_pipeline_cut_however_written(step):
    params = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 2))}
    x = jnp.ones((8, 4))
    split = split_step(step, (params, x), (), [False, False, True], num_microbatches=2)
    markers = [e for e in split.traced.program.eqns if e.primitive.name == GRAD_PRIMITIVE]
    assert len(markers) == 1
    assert split.diff.count(True) == 2   # w1 and w2
    assert not any(e.primitive.name == GRAD_PRIMITIVE for e in split.forward.program.eqns)
    # the marker's results line up with jax's own (at one micro-batch of x)
    expected = jax.eval_shape(step, params, jax.ShapeDtypeStruct((4, 4), x.dtype))
    program = split.traced.program
    assert jax.tree.structure(expected) == split.traced.out_tree
    assert [e.shape for e in jax.tree.leaves(expected)] == \
        [program.avals[v].shape for v in program.outvars]
    # outside a pipeline's tracing, jax differentiates as always
    assert GRAD_PRIMITIVE not in str(jax.make_jaxpr(step)(params, x))


def test_a_step_without_a_gradient_call_is_refused_clearly(mesh):
    def vjp_step(params, x):
        loss, pullback = jax.vjp(lambda p: _mlp_loss(p, x), params)
        return loss, pullback(jnp.ones_like(loss))[0]

    params, x = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 2))}, jnp.ones((8, 4))
    step = autoshard.parallelize(vjp_step, mesh=mesh, method=_pipeline("1f1b"))
    # (without a gradient the step runs forward only: the gradient jax.vjp takes per
    # micro-batch is not combined into the batch's, and the error says to use jax.grad)
    with pytest.raises(ValueError, match=r"in vjp_step \(no gradient: run forward only\).*"
                                         r"take its gradient with jax.value_and_grad or "
                                         r"jax.grad: one taken with jax.vjp"):
        step.plan(params, x)
