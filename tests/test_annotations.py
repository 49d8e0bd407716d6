"""The model's own sharding annotations (``autoshard.intra.annotations``): flax linen's
``nn.with_partitioning`` / ``nn.with_logical_partitioning`` boxes and nnx's
``out_sharding`` metadata, run as ``method=autoshard.Annotated(rules)`` (a hand-written
layout, compiled as ``jax.jit`` with those shardings compiles it), read as a starting
plan of the search, and priced beside the presets in a searched plan's summary."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.ir import hlo
from tests.trees import assert_trees_allclose

RULES = (("batch", "data"), ("mlp", "model"), ("embed", None))


@pytest.fixture(scope="module")
def mesh():
    return autoshard.make_mesh((2, 4), ("data", "model"))


class LogicalMLP(nn.Module):
    """Two kernels with logical names, as flax's partitioning guide writes them."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(256, use_bias=False,
                     kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
        return nn.Dense(64, use_bias=False,
                        kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(
            nn.relu(h))


class MeshMLP(nn.Module):
    """The same with mesh axis names (``nn.Partitioned``) and an unannotated bias."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(256, kernel_init=nn.with_partitioning(init, (None, "model")))(x)
        return nn.Dense(64, use_bias=False,
                        kernel_init=nn.with_partitioning(init, ("model", None)))(nn.relu(h))


def _training(model):
    """(step, params, opt_state, x, y): adam on boxed parameters, the batch closed over by
    the loss, as flax users write it."""
    x = jnp.linspace(-1, 1, 32 * 64, dtype=jnp.float32).reshape(32, 64)
    y = jnp.cos(x)
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.adam(1e-3)

    def step(params, opt_state, x, y):
        def loss(p):
            return ((model.apply({"params": p}, x) - y) ** 2).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step, params, tx.init(params), x, y


def _specs(plan):
    return dict(zip(plan.in_paths, plan.flat_in_specs))


def test_logical_annotations_with_rules_give_the_layout_and_match_jit(mesh):
    step, params, opt, x, y = _training(LogicalMLP())
    f = autoshard.parallelize(step, mesh=mesh, method=autoshard.Annotated(RULES))
    specs = _specs(f.plan(params, opt, x, y))
    # embed → whole, mlp → model; optax's moments carry the parameters' boxes
    for head in ("args[0]", "args[1][0].mu", "args[1][0].nu"):
        assert specs[f"{head}['Dense_0']['kernel'].value"] == P(None, "model")
        assert specs[f"{head}['Dense_1']['kernel'].value"] == P("model")
    assert specs["args[2]"] == specs["args[3]"] == P("data")   # "batch" → data
    assert specs["args[1][0].count"] == P()
    assert_trees_allclose(f(params, opt, x, y), jax.jit(step)(params, opt, x, y))


def test_annotated_compiles_as_jit_with_those_shardings(mesh):
    step, params, opt, x, y = _training(MeshMLP())
    f = autoshard.parallelize(step, mesh=mesh, method=autoshard.Annotated())
    plan = f.plan(params, opt, x, y)
    flat = dict(zip(plan.in_paths, plan.flat_in_specs))
    assert flat["args[0]['Dense_0']['kernel'].value"] == P(None, "model")
    assert flat["args[0]['Dense_0']['bias']"] == P()    # unannotated: replicated
    # the hand-written program: jax.jit with the boxes' own specs, batch on "data"
    shard = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    param_specs = nn.get_partition_spec(params)
    opt_specs = nn.get_partition_spec(opt)
    is_spec = lambda s: isinstance(s, P)  # noqa: E731
    in_shardings = (jax.tree_util.tree_map(shard, param_specs, is_leaf=is_spec),
                    jax.tree_util.tree_map(shard, opt_specs, is_leaf=is_spec),
                    shard(P("data")), shard(P("data")))
    out_shardings = jax.tree_util.tree_map(shard, plan.out_specs, is_leaf=is_spec)
    hand = jax.jit(step, in_shardings=in_shardings, out_shardings=out_shardings)
    ours = hlo.collective_stats(f.lower(params, opt, x, y).compile().as_text())
    theirs = hlo.collective_stats(hand.lower(params, opt, x, y).compile().as_text())
    assert ours == theirs
    assert_trees_allclose(f(params, opt, x, y), hand(params, opt, x, y))


def test_nnx_out_sharding_metadata_lays_out_model_and_optimizer(mesh):
    class MLP(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.lecun_normal()
            self.up = nnx.Linear(64, 256, use_bias=False, rngs=rngs,
                                 kernel_init=nnx.with_partitioning(init, (None, "model")))
            self.down = nnx.Linear(256, 64, use_bias=False, rngs=rngs,
                                   kernel_init=nnx.with_partitioning(init, ("model", None)))

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    with nnx.use_eager_sharding(False):   # no mesh at creation: keep the annotation only
        model = MLP(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    x = jnp.linspace(-1, 1, 32 * 64, dtype=jnp.float32).reshape(32, 64)
    y = jnp.sin(x)
    f = autoshard.parallelize(step, mesh=mesh, method=autoshard.Annotated())
    specs = _specs(f.plan(state, x, y))
    assert specs["args[0][0]['up']['kernel'].value"] == P(None, "model")
    assert specs["args[0][1]['opt_state'][0]['mu']['down']['kernel'].value"] == P("model")
    assert specs["args[1]"] == P("data")
    assert_trees_allclose(f(state, x, y), jax.jit(step)(state, x, y))


def test_the_search_starts_from_annotations_and_prices_every_hand_layout(mesh):
    step, params, opt, x, y = _training(MeshMLP())
    plan = autoshard.parallelize(step, mesh=mesh).plan(params, opt, x, y)
    names = [a.method for a in plan.alternatives]
    assert names == ["DataParallel", "ZeRO3", "Megatron", "Annotated"]
    # the search starts from the cheapest of them, so it can only be cheaper
    assert plan.cost.total_s <= min(a.total_s for a in plan.alternatives) * (1 + 1e-9)
    summary = plan.summary()
    assert "hand-written layouts (method=autoshard.<name>()) priced by the same model" in summary
    assert all(f"  {name} " in summary for name in names)
    page = plan._repr_html_()
    assert "Hand-written layouts priced by the same model" in page
    assert all(f"<td><code>{name}</code></td>" in page for name in names)
    again = autoshard.Plan.from_json(plan.to_json())
    assert again.alternatives == plan.alternatives


def test_logical_rules_from_flax_context_are_read_by_the_search(mesh):
    step, params, opt, x, y = _training(LogicalMLP())
    searched = autoshard.parallelize(step, mesh=mesh)
    assert "Annotated" not in [a.method for a in searched.plan(params, opt, x, y).alternatives]
    with nn.logical_axis_rules(RULES):
        f = autoshard.parallelize(step, mesh=mesh)
        names = [a.method for a in f.plan(params, opt, x, y).alternatives]
    assert "Annotated" in names


def test_presets_plans_have_no_alternatives(mesh):
    step, params, opt, x, y = _training(MeshMLP())
    plan = autoshard.parallelize(step, mesh=mesh, method=autoshard.DataParallel()).plan(
        params, opt, x, y)
    assert plan.alternatives == ()
    assert "priced by the same model" not in plan.summary()


@pytest.mark.parametrize("rules, match", [
    ((), r"\['Dense_0'\]\['kernel'\].*'embed' is neither a mesh axis"),
    ((("mlp", "model"), ("embed", "pipe")), r"'pipe'.*lacks"),
])
def test_annotations_the_mesh_cannot_hold_are_named(mesh, rules, match):
    step, params, opt, x, y = _training(LogicalMLP())
    f = autoshard.parallelize(step, mesh=mesh, method=autoshard.Annotated(rules))
    with pytest.raises(ValueError, match=match):
        f.plan(params, opt, x, y)


def test_a_dim_the_axes_do_not_divide_is_named(mesh):
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6, use_bias=False, kernel_init=nn.with_partitioning(
                nn.initializers.lecun_normal(), (None, "model")))(x)

    model = Odd()
    x = jnp.ones((8, 4))
    params = model.init(jax.random.key(0), x)["params"]
    f = autoshard.parallelize(lambda p, x: model.apply({"params": p}, x).sum(), mesh=mesh,
                              method=autoshard.Annotated())
    with pytest.raises(ValueError, match=r"args\[0\]\['Dense_0'\]\['kernel'\] \(shape \(4, 6\)\)"):
        f.plan(params, x)


def test_annotated_without_annotations_says_what_to_do(mesh):
    f = autoshard.parallelize(lambda w, x: (x @ w).sum(), mesh=mesh,
                              method=autoshard.Annotated())
    with pytest.raises(ValueError, match="found no sharding annotations"):
        f.plan(jnp.ones((4, 4)), jnp.ones((8, 4)))


@pytest.mark.parametrize("rules", [("mlp", "model"), (("mlp",),), ((1, "model"),),
                                   (("mlp", 3),)])
def test_malformed_rules_are_refused(rules):
    with pytest.raises(TypeError, match="rules"):
        autoshard.Annotated(rules)


def test_annotated_round_trips_through_plan_files(mesh):
    step, params, opt, x, y = _training(LogicalMLP())
    method = autoshard.Annotated([["batch", "data"], ["mlp", ["model"]], ["embed", None]])
    assert method.rules == (("batch", "data"), ("mlp", ("model",)), ("embed", None))
    plan = autoshard.parallelize(step, mesh=mesh, method=method).plan(params, opt, x, y)
    again = autoshard.Plan.from_json(plan.to_json())
    assert again.method == method
    reused = autoshard.parallelize(step, mesh=mesh, plan=again)
    assert_trees_allclose(reused(params, opt, x, y), jax.jit(step)(params, opt, x, y))
