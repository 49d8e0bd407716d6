"""intra/control_flow.py: a ``while``, a ``cond`` with a contraction and a ``scan`` too
long to unroll, split where their bodies follow one layout, priced as compiled."""
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import autoshard
from autoshard.cost_model import MeshCostModel, cluster_preset
from autoshard.intra.control_flow import control_flow_strategies
from autoshard.ir import trace as _trace
from tests.recurrences import rnn_arguments, rnn_train_step
from tests.trees import ADAM_ATOL, assert_trees_allclose

MESH = ((2, 4), ("data", "model"))


def _while(w, x, n):  # a dynamic trip count: a while, not a scan
    return jax.lax.while_loop(lambda c: c[0] < n,
                              lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1]


def _while_solving(a, x, n):  # a batched jnp.linalg.solve in the body: its solve jaxpr
    return jax.lax.while_loop(
        lambda c: c[0] < n,
        lambda c: (c[0] + 1, jnp.linalg.solve(a, c[1][..., None])[..., 0] + c[1]), (0, x))[1]


def _cond(w, x, flag):  # a contraction in a branch keeps it a cond; its gradient too
    def loss(w):
        h = jax.lax.cond(flag > 0, lambda: jnp.tanh(x @ w), lambda: jax.nn.relu(x @ w))
        return (h @ w.T).mean()
    loss, grad = jax.value_and_grad(loss)(w)
    return w - 0.1 * grad, loss


def _accumulating(params, opt_state, xs, ys):
    """Gradient accumulation over micro-batches with lax.scan, then adam."""
    def body(acc, batch):
        x, y = batch
        grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            jnp.tanh(x @ p["w1"]) @ p["w2"], y).mean())(params)
        return jax.tree.map(jnp.add, acc, grads), None
    grads, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), (xs, ys))
    updates, opt_state = _ADAM.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


_ADAM = optax.adam(1e-2)


def _accumulating_embeddings(params, tokens, labels):
    """The same over token micro-batches: an embedding lookup (a gather; its gradient a
    scatter-add, whose combining jaxpr once read as a body nested in the loop's)."""
    def body(acc, batch):
        t, y = batch
        grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            p["emb"][t].mean(1) @ p["out"], y).mean())(params)
        return jax.tree.map(jnp.add, acc, grads), None
    grads, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), (tokens, labels))
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


def _cases():
    keys = jax.random.split(jax.random.key(0), 4)
    w, x = jax.random.normal(keys[0], (64, 64)) * 0.1, jax.random.normal(keys[1], (256, 64))
    params = {"w1": jax.random.normal(keys[0], (64, 128)) * 0.1,
              "w2": jax.random.normal(keys[1], (128, 10)) * 0.1}
    xs = jax.random.normal(keys[2], (4, 64, 64))
    ys = jax.random.randint(keys[3], (4, 64), 0, 10)
    embeddings = {"emb": jax.random.normal(keys[0], (128, 32)) * 0.1,
                  "out": jax.random.normal(keys[1], (32, 10)) * 0.1}
    tokens = jax.random.randint(keys[2], (4, 64, 16), 0, 128)
    systems = 2.0 * jnp.eye(16) + 0.1 * jax.random.normal(keys[2], (8, 16, 16))
    return {"while": (_while, (w, x, 3)), "cond": (_cond, (w, x, 1)),
            "while_solving": (_while_solving, (systems, x[:8, :16], 3)),
            "scan": (_accumulating, (params, _ADAM.init(params), xs, ys)),
            "scan_embedding": (_accumulating_embeddings, (embeddings, tokens, ys))}


@pytest.fixture
def short_unrolls(monkeypatch):
    """Scans longer than 10 equations stay scans (the accumulation's 4 steps would be
    unrolled otherwise)."""
    monkeypatch.setattr(_trace, "MAX_UNROLLED_EQUATIONS", 10)


@pytest.mark.parametrize("name", ["while", "while_solving", "cond", "scan", "scan_embedding"])
def test_control_flow_is_split_and_runs_what_was_priced(name, short_unrolls):
    """Before: every such equation ran replicated with a warning, and was priced as its
    operands' bytes alone (the audit: 0.01x of a while's compiled flops). A body's
    ``custom_linear_solve`` is read as the solve it runs, as the tracer inlines one."""
    fn, args = _cases()[name]
    mesh = autoshard.make_mesh(*MESH)
    traced = _trace.trace(fn, args)
    eqn = next(e for e in traced.program.eqns if e.primitive.name == name.split("_")[0])
    avals = [None if isinstance(a, _trace.Literal) else traced.program.avals[a]
             for a in eqn.inputs]
    strategies = control_flow_strategies(
        eqn, avals, [traced.program.avals[v] for v in eqn.outputs],
        MeshCostModel(cluster_preset("host-cpu"), MESH[0]))
    assert len(strategies) > 1 and strategies[0].name == "replicated"
    # the split strategies run less arithmetic per device than the replicated one
    assert min(s.flops for s in strategies[1:]) < strategies[0].flops
    if name.startswith("scan"):  # among them: the micro-batches' rows split, data-parallel
        xs = eqn.params["num_consts"] + eqn.params["num_carry"]
        assert any(s.in_specs[xs][:2] == ((), (0, 1)) for s in strategies)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step = autoshard.parallelize(fn, mesh=mesh)
        step.plan(*args)
    report = step.audit(*args)
    assert report.ok, report.summary()
    assert_trees_allclose(step(*args), jax.jit(fn)(*args), atol=ADAM_ATOL)


@pytest.mark.parametrize("body", [
    lambda h, w: jnp.tanh(h @ w),            # rows follow, a split contraction reduces
    lambda h, w: (h @ w).T,                  # rows come back as columns
    lambda h, w: h - h.sum(0, keepdims=True) @ w,  # a sum over rows
    lambda h, w: jnp.roll(h, 1, axis=0) @ w,  # a roll: no rule follows a split row
])
def test_a_loops_carry_comes_back_in_the_layout_it_went_in(body, short_unrolls):
    def fn(w, x):
        return jax.lax.scan(lambda h, _: (body(h, w), None), x, None, length=8)[0]

    args = (jnp.ones((32, 32)), jnp.ones((32, 32)))
    traced = _trace.trace(fn, args)
    (eqn,) = [e for e in traced.program.eqns if e.primitive.name == "scan"]
    strategies = control_flow_strategies(
        eqn, [traced.program.avals[a] for a in eqn.inputs],
        [traced.program.avals[v] for v in eqn.outputs],
        MeshCostModel(cluster_preset("host-cpu"), MESH[0]))
    carry = eqn.params["num_consts"]
    for s in strategies:
        assert s.in_specs[carry] == s.out_specs[0], s


@pytest.mark.parametrize("name", ["cond", "scan", "scan_embedding"])
def test_under_a_memory_budget_the_compiled_program_runs_the_priced_collectives(
        name, short_unrolls):
    """A budget pushes the plan to split the loop. Splits XLA does not follow were once
    among the strategies and the budget picked them: a contraction dim split against a
    whole operand (XLA gathered it instead), a gradient accumulator split while the body
    computes the gradients whole (XLA split the gradients' producers instead, with an
    all-reduce no strategy priced); the audit found collectives unplanned and missing."""
    fn, args = _cases()[name]
    mesh = autoshard.make_mesh(*MESH)
    peak = autoshard.parallelize(fn, mesh=mesh).plan(*args).cost.peak_memory_bytes
    step = autoshard.parallelize(fn, mesh=mesh, memory_budget=int(0.8 * peak))
    report = step.audit(*args)
    assert not [d for d in report.differences if "flops" not in d and "bytes" not in d], \
        report.summary()
    assert_trees_allclose(step(*args), jax.jit(fn)(*args), atol=ADAM_ATOL)


def test_a_warning_from_a_pipeline_stage_names_the_users_line():
    """A stage's program is traced again from ours; its warnings named autoshard's own
    ``bind`` ("first at .../jax_compat.py ... (bind)") before equations kept jax's source
    info and were evaluated under it."""
    fn, args = _cases()["cond"]  # micro-batches of 61 x 7: its conds split nowhere
    w, x, flag = args
    args = (w[:7, :7], x[:122, :7], flag)
    method = autoshard.PipeshardParallel(num_microbatches=2, num_stages=2,
                                         stage_method=autoshard.ShardParallel())
    step = autoshard.parallelize(fn, mesh=autoshard.make_mesh(*MESH), method=method,
                                 batch_argnums=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = step(*args)
    messages = [str(w.message) for w in caught if "autoshard:" in str(w.message)]
    assert messages and all(__file__ in m and "jax_compat" not in m for m in messages), messages
    assert_trees_allclose(out, jax.jit(fn)(*args))


def test_a_pipeline_with_a_splittable_cond_does_not_warn():
    """The stage search also prices one-device sub-meshes, where nothing splits: that is
    no control flow left replicated (it warned "runs replicated on every device")."""
    fn, args = _cases()["cond"]
    method = autoshard.PipeshardParallel(num_microbatches=2, num_stages=2,
                                         stage_method=autoshard.ShardParallel())
    step = autoshard.parallelize(fn, mesh=autoshard.make_mesh(*MESH), method=method,
                                 batch_argnums=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = step(*args)
    assert_trees_allclose(out, jax.jit(fn)(*args))


def test_a_flax_model_accumulating_micro_batches_with_donated_params(short_unrolls):
    """As users write it: a flax module, the loss closing over the micro-batch, the
    parameters donated and the learning rate a Python keyword argument."""
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(128), nn.tanh, nn.Dense(10)])
    keys = jax.random.split(jax.random.key(1), 3)
    xs = jax.random.normal(keys[0], (4, 64, 32))
    ys = jax.random.randint(keys[1], (4, 64), 0, 10)

    def step(params, xs, ys, *, lr):
        def body(acc, batch):
            x, y = batch
            grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                model.apply(p, x), y).mean())(params)
            return jax.tree.map(jnp.add, acc, grads), None
        grads, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), (xs, ys))
        return jax.tree.map(lambda p, g: p - lr * g / 4, params, grads)

    def fresh():
        return model.init(keys[2], xs[0])

    expected = jax.jit(step, static_argnames="lr")(fresh(), xs, ys, lr=0.1)
    f = autoshard.parallelize(step, mesh=autoshard.make_mesh(*MESH), donate_argnums=0)
    report = f.audit(fresh(), xs, ys, lr=0.1)
    assert not [d for d in report.differences if "flops" not in d and "bytes" not in d], \
        report.summary()
    assert_trees_allclose(f(fresh(), xs, ys, lr=0.1), expected)


def test_an_rnns_backward_scan_splits_its_batch_with_the_residuals(short_unrolls):
    """The backward scan of an RNN carries the state's cotangent, [batch, hidden], and
    reads the stacked residuals, [steps, batch, hidden], whose dim 1 is the body's dim 0:
    the batch splits only with both. Before, operands were split together by equal dim
    numbers alone, and the backward scan ran replicated with a warning."""
    w, xs = rnn_arguments(steps=6, batch=16, features=16)  # 16 features, as many as rows

    program = _trace.trace(rnn_train_step, (w, xs)).program
    scans = [e for e in program.eqns if e.primitive.name == "scan"]
    assert len(scans) == 2  # the forward and its transpose
    model = MeshCostModel(cluster_preset("host-cpu"), MESH[0])
    for eqn in scans:
        strategies = control_flow_strategies(
            eqn, [program.avals[a] for a in eqn.inputs], [program.avals[v] for v in eqn.outputs],
            model)
        xs_at = eqn.params["num_consts"] + eqn.params["num_carry"]
        # the stacked inputs (or residuals), [steps, batch, ...], split on the batch over
        # both axes
        assert any(spec[:2] == ((), (0, 1)) for s in strategies
                   for spec in s.in_specs[xs_at:] if len(spec) == 3), eqn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = autoshard.parallelize(rnn_train_step, mesh=autoshard.make_mesh(*MESH))
        out = f(w, xs)
    assert f.audit(w, xs).ok
    assert_trees_allclose(out, jax.jit(rnn_train_step)(w, xs))
