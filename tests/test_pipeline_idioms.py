"""PipeshardParallel on steps written the way jax users write them: losses closing over the
batch and over constants, argnums tuples, has_aux, None leaves, several batch arguments,
dropout; and its errors (an impossible memory budget)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autoshard
from autoshard.pipeline.batch_arguments import infer_batch_argnums
from tests.trees import assert_trees_allclose

D, H, N = 8, 16, 16
# an (H,) table: misordered gradients would still broadcast against b1 and b2
TABLE = np.linspace(-1.0, 1.0, H, dtype=np.float32)
JAX_TABLE = jnp.cos(jnp.arange(H, dtype=jnp.float32))


def _method(**kw):
    return autoshard.PipeshardParallel(**{**dict(num_microbatches=2, num_stages=2,
                                                 num_layers=2), **kw})


def _pipelined(fn, **kw):
    return autoshard.parallelize(fn, mesh=autoshard.make_mesh((8,), ("data",)),
                                 method=_method(**kw))


def _mlp(seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    params = {"w1": jax.random.normal(k[0], (D, H)) / D ** 0.5,
              "b1": 0.1 * jax.random.normal(k[1], (H,)),
              "b2": 0.1 * jax.random.normal(k[2], (H,)),
              "w2": jax.random.normal(k[3], (H, D)) / H ** 0.5}
    return params, jax.random.normal(k[4], (N, D)), jax.random.normal(k[5], (N, D))


def _forward(p, x, y, table=0.0):
    h = jnp.tanh(x @ p["w1"] + p["b1"] + table) * p["b2"]
    h = autoshard.mark_layer_boundary(h)
    return jnp.mean((h @ p["w2"] - y) ** 2)


# each: step(params, x, y) -> value_and_grad's result, written as a jax user would
def lambda_closure(params, x, y):
    return autoshard.value_and_grad(lambda ps: _forward(ps, x, y))(params)


def def_closure(params, x, y):
    def loss(ps):   # uses x and y without taking them
        return _forward(ps, x, y)
    return autoshard.value_and_grad(loss)(params)


def numpy_constant(params, x, y):
    return autoshard.value_and_grad(lambda ps: _forward(ps, x, y, TABLE))(params)


def jax_constant(params, x, y):
    return autoshard.value_and_grad(lambda ps: _forward(ps, x, y, JAX_TABLE))(params)


def argnums_tuple(params, x, y):
    first = {"w1": params["w1"], "b1": params["b1"]}
    second = {"b2": params["b2"], "w2": params["w2"]}
    loss = lambda a, scale, b: _forward({**a, **b}, x, y, TABLE) * scale  # noqa: E731
    return autoshard.value_and_grad(loss, argnums=(0, 2))(first, 2.0, second)


def has_aux(params, x, y):
    def loss(ps):
        value = _forward(ps, x, y, TABLE)
        return value, {"loss_x2": 2.0 * value, "mean_x": jnp.mean(x)}
    return autoshard.value_and_grad(loss, has_aux=True)(params)


def none_leaves(params, x, y):
    def loss(ps, batch):
        assert ps["frozen"] is None and batch[1] is None
        return _forward(ps["trained"], batch[0], batch[2], TABLE)
    return autoshard.value_and_grad(loss)({"trained": params, "frozen": None}, (x, None, y))


def keyword_batch(params, x, y):
    return autoshard.value_and_grad(lambda ps, y: _forward(ps, x, y))(params, y=y)


def grad_only(params, x, y):
    return autoshard.grad(lambda ps: _forward(ps, x, y, JAX_TABLE))(params)


@pytest.mark.parametrize("step", [lambda_closure, def_closure, numpy_constant, jax_constant,
                                  argnums_tuple, has_aux, none_leaves, keyword_batch, grad_only],
                         ids=lambda f: f.__name__)
def test_closure_patterns_match_jit(step):
    params, x, y = _mlp()
    expected = jax.jit(step)(params, x, y)
    # the marker's abstract values line up with jax's own gradients
    jax_result = jax.jit(lambda *a: jax.tree.map(jnp.shape, step(*a)))(params, x, y)
    assert jax.tree.map(jnp.shape, expected) == jax_result
    assert_trees_allclose(_pipelined(step)(params, x, y), expected)


def test_numpy_constant_with_one_microbatch():
    params, x, y = _mlp(1)
    step = _pipelined(numpy_constant, num_microbatches=1)
    assert_trees_allclose(step(params, x, y), jax.jit(numpy_constant)(params, x, y))


def test_arrays_on_a_mesh_of_explicit_axes_match_jit():
    # jax.make_mesh's default axes are Explicit: the batch laid out over them carries its
    # sharding in its type, and the pipeline's split into microbatches (an eager reshape)
    # raised jax's ShardingTypeError on it. It runs now, as on host arrays.
    params, x, y = _mlp(2)
    explicit = jax.make_mesh((8,), ("d",))
    on = lambda a, *spec: jax.device_put(  # noqa: E731
        a, jax.sharding.NamedSharding(explicit, jax.sharding.PartitionSpec(*spec)))
    args = ({k: on(v, "d") if v.shape[0] % 8 == 0 else on(v) for k, v in params.items()},
            on(x, "d"), on(y, None, "d"))
    assert_trees_allclose(_pipelined(lambda_closure)(*args),
                          jax.jit(lambda_closure)(params, x, y))


# ------------------------------------------------------------------ a GPT-like step
V, T, DM, BLOCKS = 32, 8, 16, 2


def _sinusoids(length, dim):
    angle = np.arange(length)[:, None] / 10000 ** (2 * np.arange(dim // 2)[None] / dim)
    return np.concatenate([np.sin(angle), np.cos(angle)], -1).astype(np.float32)


POSITIONS = _sinusoids(T, DM)   # flax's lm1b adds a numpy table like this one


def _gpt(seed=0, batch=8):
    keys = iter(jax.random.split(jax.random.key(seed), 4 * BLOCKS + 4))
    normal = lambda shape: jax.random.normal(next(keys), shape) / shape[0] ** 0.5  # noqa: E731
    blocks = [{"ln1": jnp.ones(DM), "qkv": normal((DM, 3 * DM)), "out": normal((DM, DM)),
               "ln2": jnp.ones(DM), "up": normal((DM, 4 * DM)), "down": normal((4 * DM, DM))}
              for _ in range(BLOCKS)]
    params = {"embed": normal((V, DM)), "blocks": blocks, "ln_f": jnp.ones(DM),
              "head": normal((DM, V))}
    tokens = jax.random.randint(next(keys), (batch, T + 1), 0, V)
    return params, tokens[:, :-1], tokens[:, 1:]


def _norm(h, g):
    h = h - h.mean(-1, keepdims=True)
    return h * jax.lax.rsqrt((h ** 2).mean(-1, keepdims=True) + 1e-5) * g


def _gpt_logits(params, x, rng=None, rate=0.1):
    h = params["embed"][x] + POSITIONS
    causal = np.tril(np.ones((T, T), bool))
    for i, b in enumerate(params["blocks"]):
        q, k, v = jnp.split(_norm(h, b["ln1"]) @ b["qkv"], 3, -1)
        scores = jnp.where(causal, q @ k.swapaxes(-1, -2) / DM ** 0.5, -1e9)
        h = h + jax.nn.softmax(scores) @ v @ b["out"]
        h = h + jax.nn.gelu(_norm(h, b["ln2"]) @ b["up"]) @ b["down"]
        if rng is not None:   # dropout, as flax applies it
            keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1 - rate, h.shape)
            h = jnp.where(keep, h / (1 - rate), 0.0)
    return _norm(h, params["ln_f"]) @ params["head"]


OPT = optax.adamw(1e-2)


def gpt_step(params, opt_state, x, y):
    def loss(ps):
        return optax.softmax_cross_entropy_with_integer_labels(_gpt_logits(ps, x), y).mean()
    value, grads = autoshard.value_and_grad(loss)(params)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_gpt_step_two_batch_arguments_matches_jit(schedule):
    params, x, y = _gpt()
    args = (params, OPT.init(params), x, y)
    step = _pipelined(gpt_step, schedule=schedule)   # default batch_argnums
    assert_trees_allclose(step(*args), jax.jit(gpt_step)(*args))
    assert len(step.plan(*args).stages) == 2


def test_batch_arguments_are_inferred():
    params, x, y = _gpt()
    args = (params, OPT.init(params), x, y)
    assert infer_batch_argnums(gpt_step, args, (), 3) == (2, 3)

    def uses_x_after(params, x, y):   # x is also read outside the loss: not inferred
        value, grads = autoshard.value_and_grad(lambda p: _forward(p, x, y))(params)
        return grads, value + jnp.mean(x)

    p, x, y = _mlp()
    assert infer_batch_argnums(uses_x_after, (p, x, y), (), 2) == (2,)
    with pytest.raises(ValueError, match=r"arguments \[1\] have the batch's leading "
                                         r"dimension 16 but are not split.*"
                                         r"batch_argnums=\(1, 2\)"):
        _pipelined(uses_x_after).plan(p, x, y)

    def batch_first(batch, state):   # the state's scalar step count keeps it from being data
        value, grads = jax.value_and_grad(lambda p: _forward(p, batch["x"], batch["y"]))(
            state["params"])
        return value, {"params": jax.tree.map(lambda a, g: a - 0.1 * g, state["params"], grads),
                       "step": state["step"] + 1}

    state = {"params": p, "step": jnp.int32(0)}
    assert infer_batch_argnums(batch_first, ({"x": x, "y": y}, state), (), 1) == (0,)


def test_scalars_and_keys_in_the_batch_are_read_whole():
    # a scalar beside the batch's arrays (a temperature) and a PRNG key in the same dict:
    # every micro-batch reads them as they are; batch_argnums may be given or inferred.
    # Before, the scalar was refused, and the inference took the parameters for the batch.
    p, x, y = _mlp()
    batch = {"x": x, "y": y, "temperature": jnp.float32(0.5), "raw_key": jax.random.PRNGKey(3)}

    def step(params, batch):
        def loss(ps):
            noise = jax.random.normal(batch["raw_key"], (D,))   # one draw for the whole batch
            return _forward(ps, batch["x"] * batch["temperature"] + noise, batch["y"])
        return jax.value_and_grad(loss)(params)

    want = jax.jit(step)(p, batch)
    for batch_argnums in (None, 1):
        pipelined = autoshard.parallelize(step, mesh=autoshard.make_mesh((8,), ("data",)),
                                          method=_method(), batch_argnums=batch_argnums)
        assert_trees_allclose(pipelined(p, batch), want)
        assert pipelined.plan(p, batch).batch == ("args[1]",)


def test_impossible_memory_budget_raises_infeasible_plan_error():
    params, x, y = _mlp()
    make = lambda budget: autoshard.parallelize(  # noqa: E731
        def_closure, mesh=autoshard.make_mesh((8,), ("data",)), method=_method(),
        memory_budget=budget)
    with pytest.raises(autoshard.InfeasiblePlanError,
                       match="smallest budget a stage slicing fits") as err:
        make(1000).plan(params, x, y)
    assert err.value.memory_budget == 1000 and err.value.min_peak_bytes > 1000
    assert make(int(err.value.min_peak_bytes)).plan(params, x, y).stages


# ------------------------------------------------------------------ dropout
def dropout_step(params, rng, x, y):
    def loss(ps):
        k_mask, k_noise = jax.random.split(rng)
        h = jnp.tanh(x @ ps["w1"] + ps["b1"])
        h = jnp.where(jax.random.bernoulli(k_mask, 0.7, h.shape), h / 0.7, 0.0)
        h = autoshard.mark_layer_boundary(h)
        noise = jax.vmap(lambda k: jax.random.normal(k, (D,)))(  # per-example keys
            jax.random.split(k_noise, x.shape[0]))
        return jnp.mean((h @ ps["w2"] + 0.1 * noise - y) ** 2)
    return autoshard.value_and_grad(loss)(params)


@pytest.mark.parametrize("key", ["typed", "raw"])
def test_dropout_matches_jit_exactly(key):
    params, x, y = _mlp()
    rng = jax.random.key(7) if key == "typed" else jax.random.PRNGKey(7)
    step = _pipelined(dropout_step, num_microbatches=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # reproduced: nothing to warn about
        got = step(params, rng, x, y)
    expected = jax.jit(dropout_step)(params, rng, x, y)
    assert_trees_allclose(got, expected)
    if key == "typed":   # a saved plan makes the same draws
        saved = autoshard.Plan.from_json(step.plan(params, rng, x, y).to_json())
        again = autoshard.parallelize(dropout_step, mesh=autoshard.make_mesh((8,), ("data",)),
                                      plan=saved)
        assert_trees_allclose(again(params, rng, x, y), expected)


def test_gpt_step_with_dropout_matches_jit():
    def step(params, opt_state, rng, x, y):
        def loss(ps):
            logits = _gpt_logits(ps, x, rng)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        value, grads = autoshard.value_and_grad(loss)(params)
        updates, opt_state = OPT.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params, x, y = _gpt()
    args = (params, OPT.init(params), jax.random.key(3), x, y)
    planned = _pipelined(step, stage_method=autoshard.DataParallel())  # rows sharded
    assert_trees_allclose(planned(*args), jax.jit(step)(*args))


def test_dropout_that_cannot_be_reproduced_warns_once():
    params, x, y = _mlp()
    rng = jax.random.key(7, impl="rbg")
    step = _pipelined(dropout_step, num_microbatches=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(params, rng, x, y)
        step(params, rng, x, y)
    ours = [w for w in caught if "PipeshardParallel" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert ours[0].filename == __file__
    assert "random_bits of shape (4, 16)" in message and "PRNG is rbg" in message
    assert "every micro-batch gets the same values" in message
    assert "num_microbatches=1" in message


def test_indexing_rows_with_arange_is_refused_with_take_along_axis_suggested():
    """``logp[jnp.arange(n), labels]`` reads as picking rows of the whole batch (the analysis
    follows rows through a gather's batch dimensions, not through an iota's values); the
    error says how to write it row by row."""
    params, x, _ = _mlp()
    labels = jnp.arange(N) % D

    def step(p, x, labels):
        def loss(p):
            logp = jax.nn.log_softmax(jnp.tanh(x @ p["w1"]) @ p["w2"])
            return -logp[jnp.arange(x.shape[0]), labels].mean()
        return jax.value_and_grad(loss)(p)

    with pytest.raises(ValueError, match=r"jnp\.arange .*test_pipeline_idioms.*take_along_axis"):
        _pipelined(step).plan(params, x, labels)
