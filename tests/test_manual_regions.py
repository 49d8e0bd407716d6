"""``jax.shard_map`` inside a step: its layouts and collectives priced as the user wrote them."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.cost_model import MeshCostModel, cluster_preset
from autoshard.intra.graph import build_graph
from autoshard.ir.trace import trace
from tests.trees import ADAM_ATOL, assert_trees_allclose

MESH = ((2, 4), ("data", "model"))

# (body of (x shard, w shard), in_specs, out_specs): x is [16, 32], w [32, 64]
BODIES = {
    "psum": (lambda xb, wb: jax.lax.psum(xb @ wb, "model"),
             (P("data", "model"), P("model", None)), P("data", None)),
    "all_gather": (lambda xb, wb: jax.lax.all_gather(xb, "model", axis=1, tiled=True) @ wb,
                   (P("data", "model"), P(None, "model")), P("data", "model")),
    "psum_scatter": (lambda xb, wb: jax.lax.psum_scatter(xb @ wb, "model", scatter_dimension=1,
                                                         tiled=True),
                     (P("data", "model"), P("model", None)), P("data", "model")),
    "ppermute": (lambda xb, wb: jax.lax.ppermute(xb @ wb, "model",
                                                 [(i, (i + 1) % 4) for i in range(4)]),
                 (P("data", None), P(None, "model")), P("data", "model")),
    "all_to_all": (lambda xb, wb: jax.lax.all_to_all(xb @ wb, "model", 1, 0, tiled=True),
                   (P("data", None), P(None, "model")), P(("data", "model"), None)),
}


def _step(mesh, name):
    """A step whose layer is the user's shard_map (plain jax.grad: the loss is not
    returned, so its computation is dead code XLA removes), then an optax adam update."""
    body, in_specs, out_specs = BODIES[name]
    layer = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    optimizer = optax.adam(1e-2)

    def step(params, opt_state, x):
        grads = jax.grad(lambda ps: (jnp.tanh(layer(x, ps["w"])) ** 2).mean())(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    keys = jax.random.split(jax.random.key(0), 2)
    params = {"w": jax.random.normal(keys[0], (32, 64)) * 0.1}
    return step, (params, optimizer.init(params), jax.random.normal(keys[1], (16, 32)))


@pytest.mark.parametrize("name", list(BODIES))
def test_a_shard_map_runs_the_collectives_the_plan_priced(name):
    """Before: planned as an unsupported op run replicated (with a warning saying so),
    while it ran as written; the audit found every collective of the body and the
    reshardings around it unpriced (4 differences for the psum body)."""
    mesh = autoshard.make_mesh(*MESH)
    step, args = _step(mesh, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = autoshard.parallelize(step, mesh=mesh, batch_argnums=2)
        plan = f.plan(*args)
    report = f.audit(*args)
    assert report.rows and all(r.planned_count == r.compiled_count and
                               r.planned_bytes == r.compiled_bytes for r in report.rows), \
        report.summary()
    kind = {"psum": "all-reduce", "all_gather": "all-gather", "psum_scatter": "reduce-scatter",
            "ppermute": "collective-permute", "all_to_all": "all-to-all"}[name]
    assert any(c.kind == kind and c.axes == ("model",) and c.op.startswith("shard_map#")
               for c in plan.collectives), plan.collectives
    assert_trees_allclose(f(*args), jax.jit(step)(*args), atol=ADAM_ATOL)


def test_the_region_is_one_strategy_with_the_users_layouts():
    mesh = autoshard.make_mesh(*MESH)
    step, args = _step(mesh, "psum")
    model = MeshCostModel(cluster_preset("h100-80gb"), MESH[0])
    graph = build_graph(trace(step, args), model, axis_names=MESH[1])
    forward = next(n for n in graph.nodes if n.name.startswith("shard_map#"))
    (strategy,) = forward.strategies
    assert strategy.in_specs == (((0,), (1,)), ((1,), ()))  # x P(data, model), w P(model)
    assert strategy.out_specs == (((0,), ()),)             # P(data, None)
    (psum,) = strategy.collectives  # over model, the [8, 64] float32 partial product
    assert (psum.kind, psum.axes, psum.nbytes) == ("all-reduce", (1,), 8 * 64 * 4)
    assert psum.seconds == pytest.approx(model.all_reduce(8 * 64 * 4, (1,)))
    assert strategy.flops == pytest.approx(2 * 8 * 8 * 64)  # the local dot


def test_a_region_on_another_mesh_still_runs_replicated_with_a_warning():
    """A shard_map over a mesh other than the plan's (here all 8 devices as one axis)
    stays unplanned, as before."""
    other = autoshard.make_mesh((8,), ("x",))
    layer = jax.shard_map(lambda xb: xb * 2.0, mesh=other, in_specs=P("x"), out_specs=P("x"))

    def step(w, x):
        return w - 0.1 * jax.grad(lambda w: (layer(x @ w) ** 2).mean())(w)

    w, x = jnp.ones((32, 64)) * 0.01, jnp.ones((16, 32))
    with pytest.warns(UserWarning, match="primitive 'shard_map'"):
        out = autoshard.parallelize(step, mesh=autoshard.make_mesh(*MESH))(w, x)
    assert_trees_allclose(out, jax.jit(step)(w, x))


@pytest.mark.parametrize("manual", ["model", "data"])
def test_a_region_manual_over_some_axes_is_planned_over_the_others_too(manual):
    """``axis_names`` names the manual axes; the others are left to the compiler. The
    region reads its operands split as its specs say over the manual axes, and over the
    others whole or split where its body follows the split. Before: planned as an
    unsupported op run replicated (with a warning saying so); the audit found the body's
    all-reduce and an all-gather unpriced and the flops 0.17x the compiled."""
    mesh = autoshard.make_mesh(*MESH)
    layer = jax.shard_map(lambda xb, wb: jax.lax.psum(xb @ wb, manual), mesh=mesh,
                          in_specs=(P(None, manual), P(manual, None)), out_specs=P(),
                          axis_names={manual})

    def step(w, x):
        loss, grad = jax.value_and_grad(lambda w: (jnp.tanh(layer(x, w)) ** 2).mean())(w)
        return w - 0.1 * grad, loss

    keys = jax.random.split(jax.random.key(0), 2)
    w, x = jax.random.normal(keys[0], (64, 128)) * 0.1, jax.random.normal(keys[1], (32, 64))
    model = MeshCostModel(cluster_preset("h100-80gb"), MESH[0])
    graph = build_graph(trace(step, (w, x)), model, axis_names=MESH[1])
    forward = next(n for n in graph.nodes if n.name.startswith("shard_map#"))
    strategy = forward.strategies[0]  # whole over the other axis
    axis = MESH[1].index(manual)
    assert strategy.in_specs == (((), (axis,)), ((axis,), ()))  # x P(None, manual), w P(manual)
    assert strategy.flops == pytest.approx(2 * 32 * (64 // MESH[0][axis]) * 128)
    # and split over the other axis where the body follows: x's rows (the psum's partial
    # products split by row) or w's columns, each with half or a quarter the arithmetic
    other = 1 - axis
    splits = {s.in_specs: s.flops for s in forward.strategies[1:]}
    assert splits[(((other,), (axis,)), ((axis,), ()))] == \
        pytest.approx(strategy.flops / MESH[0][other])
    assert splits[(((), (axis,)), ((axis,), (other,)))] == \
        pytest.approx(strategy.flops / MESH[0][other])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = autoshard.parallelize(step, mesh=mesh)
        f.plan(w, x)
    report = f.audit(w, x)
    assert report.ok, report.summary()
    assert_trees_allclose(f(w, x), jax.jit(step)(w, x))


def test_a_pipeline_refuses_a_region_it_would_cut_onto_sub_meshes_clearly():
    """Before: jax's "incompatible devices" from inside the first stage's call."""
    mesh = autoshard.make_mesh(*MESH)
    step, args = _step(mesh, "psum")
    with pytest.raises(ValueError, match=r"jax.shard_map \(at .*test_manual_regions.py.*"
                       r"num_stages=2.*ShardParallel"):
        method = autoshard.PipeshardParallel(num_microbatches=2, num_stages=2)
        autoshard.parallelize(step, mesh=mesh, batch_argnums=2, method=method).plan(*args)


def test_a_region_reading_a_python_scalar_is_planned():
    """jax passes a Python scalar operand as a literal (no layout to choose)."""
    mesh = autoshard.make_mesh(*MESH)
    layer = jax.shard_map(lambda xb, s: xb * s, mesh=mesh, in_specs=(P("data", "model"), P()),
                          out_specs=P("data", "model"))

    def step(w, x):
        return w - 0.1 * jax.grad(lambda w: (layer(x @ w, 2.0) ** 2).mean())(w)

    w, x = jnp.ones((32, 64)) * 0.01, jnp.ones((16, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = autoshard.parallelize(step, mesh=mesh)
        out = f(w, x)
    assert f.audit(w, x).ok
    assert_trees_allclose(out, jax.jit(step)(w, x))
