"""flax (linen and nnx) and equinox training steps as their users write them
(``examples/flax_lm.py``, ``nnx_gemma_style.py``, ``equinox_vit.py`` at small sizes): one
plan across steps, the batch inferred, ops named by their module path, the model's own
sharding annotations run (``Annotated``) and searched from, every step equal to
``jax.jit``'s."""
from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from examples import equinox_vit, flax_lm, nnx_gemma_style
from tests.test_jit_parity import count_plans
from tests.trees import assert_trees_allclose

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mesh():
    return autoshard.make_mesh((2, 4), ("data", "model"))


def _small_lm():
    return flax_lm.TransformerLM(vocab=64, d_model=32, heads=2, layers=1, max_len=16)


def test_flax_train_state_loop_plans_once_and_matches_jit(mesh, monkeypatch):
    model = _small_lm()
    plans = count_plans(monkeypatch)
    step = autoshard.parallelize(flax_lm.train_step, mesh=mesh)
    ours = ref = flax_lm.create_state(model, 8, 16)
    assert isinstance(ours.step, int)   # a Python 0 first, an array after one step
    for batch in flax_lm.batches(8, 16, model.vocab, 3):
        ours, metrics = step(ours, batch)
        ref, ref_metrics = jax.jit(flax_lm.train_step)(ref, batch)
        assert_trees_allclose(metrics, ref_metrics)
    assert len(plans) == 1
    assert_trees_allclose(ours.params, ref.params)
    assert int(ours.step) == 3
    plan = step.plan(ours, batch)
    assert plan.batch == ("args[1]",) and plan.batch_inferred
    # ops are named by the flax module that made them (jax's name stack, with its
    # transforms: "jvp(TransformerLM)/layer_0/Dense_0"), not by flax's own source file
    scopes = [op.scope for op in plan.top_ops]
    assert any(s.startswith("jvp(TransformerLM)/layer_0/") for s in scopes), scopes
    assert any(s.startswith("transpose(jvp(TransformerLM))/layer_0/") for s in scopes), scopes
    # ... and their source is the user's line, then the library line that made them
    sources = [op.source for op in plan.top_ops]
    assert any("examples/flax_lm.py:" in s and " via flax/linen/" in s for s in sources), sources


def test_a_flax_train_state_on_jax_make_mesh_matches_jit():
    """As a jax 0.10 user writes it: ``jax.make_mesh`` (Explicit axes) for the mesh and for
    the batches their loader lays out, under ``jax.set_mesh`` of that mesh, a flax
    ``TrainState`` step. Planned and run as on the mesh's Auto twin."""
    model = _small_lm()
    explicit = jax.make_mesh((2, 4), ("data", "model"))
    step = autoshard.parallelize(flax_lm.train_step, mesh=explicit)
    ours = ref = flax_lm.create_state(model, 8, 16)
    batch_sharding = jax.sharding.NamedSharding(explicit, P("data"))
    for batch in flax_lm.batches(8, 16, model.vocab, 3):
        with jax.set_mesh(explicit):
            ours, metrics = step(ours, jax.device_put(batch, batch_sharding))
        ref, ref_metrics = jax.jit(flax_lm.train_step)(ref, batch)
        assert_trees_allclose(metrics, ref_metrics)
    assert_trees_allclose(ours.params, ref.params)


def test_flax_lm_runs_its_own_annotations_and_the_search_starts_from_them(mesh):
    model = flax_lm.TransformerLM(vocab=64, d_model=32, heads=4, layers=1, max_len=16)
    state = flax_lm.create_state(model, 8, 16)
    batch = next(flax_lm.batches(8, 16, model.vocab, 1))
    own = autoshard.parallelize(flax_lm.train_step, mesh=mesh,
                                method=autoshard.Annotated(flax_lm.RULES))
    plan = own.plan(state, batch)
    specs = dict(zip(plan.in_paths, plan.flat_in_specs))
    query = [s for p, s in specs.items() if p.startswith("args[0].params") and
             p.endswith("['query']['kernel'].value")]
    assert query == [P(None, "model")]              # (embed, heads, head_dim): heads split
    assert specs["args[1]['tokens']"] == P("data")  # "batch" → data
    assert_trees_allclose(own(state, batch), jax.jit(flax_lm.train_step)(state, batch))
    with nn.logical_axis_rules(flax_lm.RULES):
        searched = autoshard.parallelize(flax_lm.train_step, mesh=mesh).plan(state, batch)
    annotated = {a.method: a for a in searched.alternatives}["Annotated"]
    assert searched.cost.total_s <= annotated.total_s * (1 + 1e-9)


def test_equinox_step_splits_the_images_by_default(mesh):
    # the search on this step, run against jax.jit: test_example_runs[equinox_vit.py]
    model = equinox_vit.ViT(image=8, patch=4, dim=16, heads=2, depth=1,
                            key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.adam(1e-3)
    train_step = equinox_vit.make_step(static, optimizer)
    # 512 images: with 8, splitting them is not the cheapest plan (XLA's CPU collectives run
    # each gradient's all-reduce on its own; measured on 2x4: the search's plan, images
    # whole, 9.9 ms a step against DataParallel's 14.4 ms); with 128 the plans splitting
    # them and not cost the same (measured on 2x4: 23.8 ms a step both), and since dot
    # operand copies are priced the search keeps them whole
    images = jax.random.normal(jax.random.key(1), (512, 8, 8, 3))
    labels = jnp.arange(512) % 10
    args = (params, optimizer.init(params), images, labels, jax.random.key(2))
    for method in (autoshard.DataParallel(), autoshard.ShardParallel()):
        plan = autoshard.parallelize(train_step, mesh=mesh, method=method).plan(*args)
        assert plan.batch == ("args[2]", "args[3]"), method
    specs = dict(zip(plan.in_paths, plan.flat_in_specs))
    assert specs["args[2]"][0] is not None, "the search left the images unsplit"


def test_nnx_optimizer_loop_plans_once_and_matches_jit(mesh, monkeypatch):
    graphdef, state = nnx_gemma_style.create(vocab=64, dim=32, heads=2, layers=1)
    train_step = nnx_gemma_style.make_step(graphdef)
    plans = count_plans(monkeypatch)
    step = autoshard.parallelize(train_step, mesh=mesh)
    ours = ref = state
    tokens = jnp.arange(8 * 9, dtype=jnp.int32).reshape(8, 9) % 64
    for _ in range(3):
        ours, loss = step(ours, tokens)
        ref, ref_loss = jax.jit(train_step)(ref, tokens)
        assert_trees_allclose(loss, ref_loss)
    assert len(plans) == 1
    assert step.plan(ours, tokens).batch == ("args[1]",)


@pytest.mark.parametrize("example", ["flax_lm.py", "equinox_vit.py", "nnx_gemma_style.py"])
def test_example_runs(example, capsys):
    # as `python examples/<example>` runs it (in this process: jax is imported already)
    runpy.run_path(str(REPO / "examples" / example), run_name="__main__")
    out = capsys.readouterr().out
    assert "match jax.jit" in out
    assert "autoshard plan" in out and "step 2: loss" in out
    if example == "equinox_vit.py":   # images and labels: the batch, inferred
        assert "batch: args[2], args[3] (inferred" in out


class _NormedNet(eqx.Module):
    """Linear, equinox BatchNorm over the vmapped batch (``axis_name``), Linear."""

    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    last: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(32, 64, key=k1)
        self.norm = eqx.nn.BatchNorm(64, axis_name="batch", mode="ema")
        self.last = eqx.nn.Linear(64, 10, key=k2)

    def __call__(self, x, state):
        h, state = self.norm(self.first(x), state)
        return self.last(jax.nn.relu(h)), state


@pytest.mark.parametrize("method", [autoshard.ShardParallel(), autoshard.DataParallel()],
                         ids=["ilp", "dp"])
def test_an_equinox_batchnorm_over_the_vmapped_batch_is_a_reduction(mesh, method):
    # BatchNorm takes the batch's mean with jax.lax.pmean over the axis that jax.vmap names;
    # vmap makes it a psum over positional axes (and its transpose a psum over none): a
    # sum over the batch's dim, no collective. Before, psum had no rule: each such op ran
    # replicated, with a warning.
    net, state = eqx.nn.make_with_state(_NormedNet)(jax.random.key(0))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    x = jax.random.normal(jax.random.key(1), (64, 32))
    y = jnp.arange(64) % 10

    def step(params, state, x, y):
        def loss(params):
            model = eqx.combine(params, static)
            logits, state2 = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                                      out_axes=(0, None))(x, state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state2
        (value, state2), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), state2, value

    f = autoshard.parallelize(step, mesh=mesh, method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = f(params, state, x, y)
    assert_trees_allclose(out, jax.jit(step)(params, state, x, y))
