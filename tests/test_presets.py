"""The presets are the hand-written layouts their names say: fixed in/out shardings, nothing
searched, XLA's propagation inside, so they compile to what ``jax.jit`` with the same
hand-written shardings compiles to (``benchmarks/baselines.py`` writes those by hand,
without autoshard)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.ir.hlo import collective_stats
from benchmarks import baselines
from examples import models
from tests.trees import ADAM_ATOL, assert_trees_allclose

MESHES = [((8,), ("devices",)), ((2, 4), ("data", "model"))]
# preset -> the hand-written baseline it must equal, on a 1-D and a 2-D mesh
EQUIVALENT = {"DataParallel": ("dp", "dp"), "ZeRO3": ("fsdp", "fsdp"),
              "Megatron": ("tp", "dp_tp")}
WORKLOADS = {
    "mlp": lambda: models.mlp(num_layers=4, batch=32, hidden=256, abstract=True),
    "gpt": lambda: models.gpt(num_layers=1, d_model=64, heads=8, seq=16, batch=8, vocab=256,
                              abstract=True),
    "wide_resnet_block": lambda: models.wide_resnet_block(abstract=True),
    # its router stays replicated under Megatron (a softmax over the experts right after it,
    # and narrower than its activation: Megatron-LM's plain linear layer); column-parallel
    # over the experts, it split the routing against the experts' FFN split over F (the
    # code before: 3.7x hand TP's yardstick on the benchmark's MoE)
    "moe": lambda: models.moe(abstract=True),
}


def _collectives(compiled) -> dict:
    return {k: (v["count"], v["bytes"]) for k, v in collective_stats(compiled.as_text()).items()
            if v["count"]}


@pytest.mark.parametrize("shape,names", MESHES, ids=["8", "2x4"])
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("preset", sorted(EQUIVALENT))
def test_preset_compiles_like_the_hand_written_jit(preset, workload, shape, names):
    w = WORKLOADS[workload]()
    mesh = autoshard.make_mesh(shape, names)
    step = autoshard.parallelize(w.fn, mesh=mesh, method=getattr(autoshard, preset)(),
                                 batch_argnums=w.batch_argnums)
    plan = step.plan(*w.args)
    baseline = EQUIVALENT[preset][len(shape) - 1]
    specs = baselines.baseline_specs(w, workload, mesh, baseline)
    flat = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert dict(zip(plan.in_paths, plan.flat_in_specs)) == dict(zip(plan.in_paths, flat))
    # nothing pinned inside: XLA propagates the layouts, as for the hand-written jit
    assert plan.value_specs == () and plan.operand_specs == ()
    assert plan.solver is None
    by_path = dict(zip(plan.in_paths, plan.flat_in_specs))
    for path, spec in zip(plan.out_paths, plan.flat_out_specs):
        if "args" + path in by_path:  # carried into the next step in its input layout
            assert spec == by_path["args" + path], path
    hand, _ = baselines.baseline_jit(w, workload, mesh, baseline, donate=False)
    compiled = step.lower(*w.args).compile()
    assert _collectives(compiled) == _collectives(hand.lower(*w.args).compile())
    # and priced as compiled: every collective of XLA's propagation of the layouts is in
    # the plan, no other (kind, mesh axes, count and bytes: intra/xla_propagation)
    audit = plan.audit(compiled)
    assert audit.ok, audit.differences


def test_megatron_reads_column_row_and_vocab_parallel_off_the_program():
    w = WORKLOADS["gpt"]()
    mesh = autoshard.abstract_mesh((2, 4), ("data", "model"))
    plan = autoshard.parallelize(w.fn, mesh=mesh, method=autoshard.Megatron()).plan(*w.args)
    params, (adam_state, *_), batch = plan.in_specs
    block = params["blocks"][0]
    column, row = P(None, "model"), P("model")
    assert [block[k] for k in ("wq", "wk", "wv", "w1")] == [column] * 4
    assert [block[k] for k in ("wo", "w2")] == [row] * 2
    assert block["b1"] == P("model") and block["b2"] == P()       # bias of column / row
    assert block["ln1"] == {"scale": P(), "bias": P()}             # norms stay whole
    assert params["wte"] == P("model")                              # vocab-parallel
    assert adam_state.mu == params and adam_state.nu == params      # state follows params
    assert batch == {"tokens": P("data")}


def test_megatron_with_fewer_heads_than_devices_is_the_hand_written_layout():
    # 4 heads on an 8-device model axis: q/k/v split column-parallel (64 features over 8)
    # reach the attention split over heads and part of head_dim, as XLA propagates them,
    # so the attention output's projection is row-parallel and the MLP after it
    # column-then-row, as hand-written Megatron has it. The code before took the head
    # reshape for a whole activation and laid out every later weight the other way round
    # (wo column-parallel, w1 row-parallel: 2.2x hand TP's yardstick on this model).
    w = models.gpt(num_layers=2, d_model=64, heads=4, seq=16, batch=8, vocab=256)
    mesh = autoshard.make_mesh((8,), ("devices",))
    step = autoshard.parallelize(w.fn, mesh=mesh, method=autoshard.Megatron(),
                                 batch_argnums=w.batch_argnums)
    plan = step.plan(*w.args)
    specs = baselines.baseline_specs(w, "gpt", mesh, "tp")
    flat = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert dict(zip(plan.in_paths, plan.flat_in_specs)) == dict(zip(plan.in_paths, flat))
    hand, _ = baselines.baseline_jit(w, "gpt", mesh, "tp", donate=False)
    assert _collectives(step.lower(*w.args).compile()) == \
        _collectives(hand.lower(*w.args).compile())
    assert_trees_allclose(step(*w.args), jax.jit(w.fn)(*w.args), atol=ADAM_ATOL)


def test_megatron_lays_an_output_projection_to_a_vocabulary_column_parallel():
    # embedding -> dense (column-parallel: its activation arrives whole) -> [64, 4096]
    # projection. Row-parallel after the dense layer, the projection would all-reduce the
    # [32, 4096] logits (512 KiB); column-parallel over the vocabulary, as Megatron-LM lays
    # out its output layer, it gathers the [32, 64] activation (8 KiB) and the loss sums
    # over the split vocabulary in a few [32] all-reduces. The code before summed the
    # logits (2.9x hand TP's yardstick on the benchmark's 32768-word model).
    w = models.embedding_model(vocab=4096)
    mesh = autoshard.make_mesh((8,), ("devices",))
    step = autoshard.parallelize(w.fn, mesh=mesh, method=autoshard.Megatron(),
                                 batch_argnums=w.batch_argnums)
    params, *_ = step.plan(*w.args).in_specs
    assert params["embed"] == P("devices")                                   # vocab-parallel
    assert params["dense"] == {"w": P(None, "devices"), "b": P("devices")}   # column
    assert params["out"] == {"w": P(None, "devices"), "b": P("devices")}     # vocab, column
    compiled = _collectives(step.lower(*w.args).compile())
    assert compiled["all-reduce"][1] < 64 * 1024, compiled   # no [32, 4096] sum
    assert_trees_allclose(step(*w.args), jax.jit(w.fn)(*w.args))


def test_megatron_leaves_a_dim_the_model_axis_does_not_divide_whole():
    # hidden 12 on a 8-device model axis: no column or row split divides it
    w = models.mlp(num_layers=2, batch=16, hidden=12, abstract=True)
    mesh = autoshard.abstract_mesh((8,), ("model",))
    plan = autoshard.parallelize(w.fn, mesh=mesh, method=autoshard.Megatron()).plan(*w.args)
    assert set(plan.flat_in_specs) == {P()}


@pytest.mark.parametrize("preset", [autoshard.DataParallel(), autoshard.ZeRO3(),
                                    autoshard.Megatron()], ids=lambda m: type(m).__name__)
def test_preset_runs_a_user_step_like_jax_jit(preset):
    # a loss closing over the batch, a Python-float learning rate, keyword arguments inside
    def step(params, x, y):
        def loss(p):
            h = jax.nn.relu(x @ p["w1"] + p["b1"])
            return jax.numpy.mean((h @ p["w2"] - y) ** 2)
        g = jax.grad(loss)(params)
        return jax.tree.map(lambda p, d: p - 0.05 * d, params, g), loss(params)

    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(16, 32)).astype(np.float32),
              "b1": np.zeros(32, np.float32), "w2": rng.normal(size=(32, 8)).astype(np.float32)}
    x, y = rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(8, 8)).astype(np.float32)
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    got = autoshard.parallelize(step, mesh=mesh, method=preset, batch_argnums=(1, 2))(params, x, y)
    want = jax.jit(step)(params, x, y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_data_parallel_leaves_an_axis_the_batch_does_not_use_idle():
    # A batch of 2 on 2x4 is split over "data" alone. XLA's propagation never splits an op
    # over "model" (no fixed layout uses it): the preset is priced so, with no collective
    # over "model", and its audit against the compiled program is clean. The code before
    # summed dots' contractions split over "model" (all-reduces XLA does not run).
    w = models.gpt(num_layers=1, d_model=64, heads=8, seq=16, batch=2, vocab=256)
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    step = autoshard.parallelize(w.fn, mesh=mesh, method=autoshard.DataParallel(),
                                 batch_argnums=w.batch_argnums)
    plan = step.plan(*w.args)
    assert plan.in_specs[2] == {"tokens": P("data")}
    assert plan.collectives and all(c.axes == ("data",) for c in plan.collectives)
    audit = plan.audit(step.lower(*w.args).compile())
    assert audit.ok, audit.differences
    assert_trees_allclose(step(*w.args), jax.jit(w.fn)(*w.args), atol=ADAM_ATOL)


def test_data_parallel_of_a_flax_step_keeps_off_the_idle_axis():
    # A user's step: a flax model, a loss closing over the batch, optax SGD with a Python
    # float learning rate, the batch passed by keyword and the parameters donated. The
    # batch of 2 fills "data" on 2x4 only: the preset prices no collective over "model",
    # audits clean, and matches jax.jit. (The code before split the [512, 1024] kernel's
    # update over "model" and gathered it: 2 MiB XLA does not move.)
    import flax.linen as nn
    import optax

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(nn.relu(nn.Dense(1024)(x)))

    model, opt = MLP(), optax.sgd(0.1)

    def step(params, opt_state, *, x, y):
        def loss(p):
            return jax.numpy.mean((model.apply(p, x) - y) ** 2)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 512)).astype(np.float32)
    y = rng.normal(size=(2, 8)).astype(np.float32)
    params = model.init(jax.random.key(0), x)
    want = jax.jit(step)(params, opt.init(params), x=x, y=y)
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    parallel = autoshard.parallelize(step, mesh=mesh, method=autoshard.DataParallel(),
                                     donate_argnums=(0,))
    plan = parallel.plan(params, opt.init(params), x=x, y=y)
    assert plan.collectives and all(c.axes == ("data",) for c in plan.collectives)
    audit = plan.audit(parallel.lower(params, opt.init(params), x=x, y=y).compile())
    assert audit.ok, audit.differences
    assert_trees_allclose(parallel(params, opt.init(params), x=x, y=y), want)
