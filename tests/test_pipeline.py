"""PipeshardParallel end to end: stages on sub-meshes give jax.jit's numbers."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autoshard
from examples.models import gpt, mlp
from tests.trees import assert_trees_allclose


@pytest.fixture(scope="module")
def mlp8():
    w = mlp(num_layers=8, batch=16, hidden=16)
    return w, jax.jit(w.fn)(*w.args)


def _check_partition(plan, num_devices):
    ids = [d for st in plan.stages for d in st.device_ids]
    assert sorted(ids) == list(range(num_devices))   # sub-meshes partition the devices
    for st in plan.stages:
        assert math.prod(st.mesh_shape) == len(st.device_ids)
    layers = [lv for st in plan.stages for lv in st.layers]
    assert layers == list(range(len(layers)))         # contiguous layer ranges, in order


@pytest.mark.parametrize("num_stages", [2, 4])
@pytest.mark.parametrize("num_microbatches", [1, 4, 8])
def test_mlp_matches_jit_both_schedules(mlp8, num_stages, num_microbatches):
    w, reference = mlp8
    mesh = autoshard.make_mesh((8,), ("data",))
    method = autoshard.PipeshardParallel(num_microbatches=num_microbatches,
                                         num_stages=num_stages, num_layers=4,
                                         stage_method=autoshard.DataParallel())
    step = autoshard.parallelize(w.fn, mesh=mesh, method=method)
    assert_trees_allclose(step(*w.args), reference)
    plan = step.plan(*w.args)
    assert len(plan.stages) == num_stages
    _check_partition(plan, 8)
    assert all(st.schedule == "1f1b" and st.num_microbatches == num_microbatches
               for st in plan.stages)
    # the same stage programs under GPipe (the schedule only changes the dispatch order)
    entry = next(iter(step._cache.values()))
    gpipe = dataclasses.replace(entry.program, schedule="gpipe")
    flat = jax.tree.leaves(w.args)
    assert_trees_allclose(jax.tree.unflatten(entry.traced.out_tree, gpipe(flat)), reference)


def test_mlp_gpipe_through_the_api(mlp8):
    w, reference = mlp8
    method = autoshard.PipeshardParallel(num_microbatches=4, num_stages=2, schedule="gpipe",
                                         num_layers=2, stage_method=autoshard.DataParallel())
    step = autoshard.parallelize(w.fn, mesh=autoshard.make_mesh((2, 4), ("data", "model")),
                                 method=method)
    assert_trees_allclose(step(*w.args), reference)
    plan = step.plan(*w.args)
    assert [st.schedule for st in plan.stages] == ["gpipe", "gpipe"]
    _check_partition(plan, 8)


@pytest.fixture(scope="module")
def small_gpt():
    w = gpt(num_layers=2, batch=8, seq=4, d_model=16, heads=2, vocab=32)
    return w, jax.jit(w.fn)(*w.args)


@pytest.mark.parametrize("mesh_shape, names, num_stages, num_microbatches, schedule", [
    ((2, 4), ("data", "model"), 2, 8, "1f1b"),
    ((8,), ("data",), 4, 2, "gpipe"),
])
def test_gpt_matches_jit(small_gpt, mesh_shape, names, num_stages, num_microbatches,
                         schedule):
    w, reference = small_gpt
    method = autoshard.PipeshardParallel(num_microbatches=num_microbatches,
                                         num_stages=num_stages, schedule=schedule,
                                         num_layers=num_stages,
                                         stage_method=autoshard.Megatron())
    step = autoshard.parallelize(w.fn, mesh=autoshard.make_mesh(mesh_shape, names),
                                 method=method)
    assert_trees_allclose(step(*w.args), reference)
    plan = step.plan(*w.args)
    assert len(plan.stages) == num_stages
    _check_partition(plan, 8)
    # the tied embedding is read by the first and the last stage: its gradient is summed
    entry = next(iter(step._cache.values()))
    stages = entry.pipeline.stages
    params = set(entry.pipeline.layering.program.invars)
    assert params & set(stages[0].program.inputs) & set(stages[-1].program.inputs)
    other = {"1f1b": "gpipe", "gpipe": "1f1b"}[schedule]
    flat = jax.tree.leaves(w.args)
    again = dataclasses.replace(entry.program, schedule=other)(flat)
    assert_trees_allclose(jax.tree.unflatten(entry.traced.out_tree, again), reference)


def _marked_mlp(widths, batch=8):
    """An MLP whose layers have the given widths, each ended by mark_layer_boundary."""
    opt = optax.sgd(1e-2)

    def loss_fn(params, batch):
        x = batch["x"]
        for i, layer in enumerate(params):
            if i:
                x = autoshard.mark_layer_boundary(x)   # between layers
            x = jnp.tanh(x @ layer)
        return jnp.mean((x - batch["y"]) ** 2)

    def step(params, opt_state, batch):
        loss, grads = autoshard.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    keys = jax.random.split(jax.random.key(1), len(widths) + 1)
    dims = [widths[0]] + list(widths)
    params = [jax.random.normal(k, (a, b)) / a ** 0.5
              for k, a, b in zip(keys, dims[:-1], dims[1:])]
    data = {"x": jax.random.normal(keys[-1], (batch, widths[0])),
            "y": jnp.zeros((batch, widths[-1]))}
    return step, (params, opt.init(params), data)


def test_user_boundaries_and_uneven_layers_get_balanced_stages():
    # Layer 0 is a 256-wide matmul (16x the flops of the 64-wide ones), layers 1-3 are small:
    # on one device per stage the balanced cut is {0} | {1, 2, 3}.
    step, args = _marked_mlp([256, 64, 64, 64])
    mesh = autoshard.abstract_mesh((2,), ("data",))
    method = autoshard.PipeshardParallel(num_microbatches=8, num_stages=2,
                                         stage_method=autoshard.DataParallel())
    plan = autoshard.parallelize(step, mesh=mesh, method=method).plan(*args)
    assert [st.layers for st in plan.stages] == [(0,), (1, 2, 3)]
    times = [st.cost.total_s for st in plan.stages]
    assert max(times) < 2.5 * min(times)


def test_dp_never_costs_more_than_a_fixed_slicing():
    # num_stages=None searches every stage count, and also one stage on the whole batch
    # (pure intra-op): it is never worse than forcing 1 or 2 stages.
    w = mlp(num_layers=4, batch=64, hidden=64, abstract=True)
    mesh = autoshard.abstract_mesh((4,), ("data",))

    def cost(**kw):
        method = autoshard.PipeshardParallel(num_layers=4, stage_method=autoshard.DataParallel(),
                                             **kw)
        return autoshard.parallelize(w.fn, mesh=mesh, method=method).plan(*w.args)

    best = cost(num_microbatches=4)
    assert best.method == autoshard.PipeshardParallel(num_microbatches=4, num_layers=4,
                                                      stage_method=autoshard.DataParallel())
    for other in (cost(num_microbatches=1, num_stages=1), cost(num_microbatches=4, num_stages=1),
                  cost(num_microbatches=4, num_stages=2)):
        assert best.cost.total_s <= other.cost.total_s * (1 + 1e-9)


def test_pure_intra_op_is_chosen_when_best(mlp8):
    # Weight-bound layers (hidden 256, 8 samples): B micro-batches would read every weight B
    # times, so one stage on the whole batch — plain intra-op, one program — is cheapest.
    w = mlp(num_layers=4, batch=8, hidden=256)
    method = autoshard.PipeshardParallel(num_microbatches=4, num_layers=4,
                                         stage_method=autoshard.DataParallel())
    step = autoshard.parallelize(w.fn, mesh=autoshard.make_mesh((1,), ("data",)),
                                 method=method)
    plan = step.plan(*w.args)
    assert [(st.layers, st.num_microbatches) for st in plan.stages] == [((0, 1, 2, 3), 1)]
    plain = autoshard.parallelize(w.fn, mesh=autoshard.make_mesh((1,), ("data",)),
                                  method=autoshard.DataParallel()).plan(*w.args)
    assert plan.cost.total_s == pytest.approx(plain.cost.total_s)
    assert_trees_allclose(step(*w.args), jax.jit(w.fn)(*w.args))
    saved = autoshard.Plan.from_json(plan.to_json())   # a saved plan runs it the same way
    again = autoshard.parallelize(w.fn, mesh=autoshard.make_mesh((1,), ("data",)), plan=saved)
    assert_trees_allclose(again(*w.args), jax.jit(w.fn)(*w.args))


def test_modelled_cost_falls_as_microbatches_grow():
    # Large enough that compute (which shrinks with the micro-batch) dominates fixed costs:
    # the bubble's share (S - 1) / (B + S - 1) shrinks as B grows.
    w = mlp(num_layers=4, batch=1024, hidden=512, abstract=True)
    mesh = autoshard.abstract_mesh((4,), ("data",))
    costs = []
    for B in (1, 2, 4, 8):
        method = autoshard.PipeshardParallel(num_microbatches=B, num_stages=4, num_layers=4,
                                             stage_method=autoshard.DataParallel())
        costs.append(autoshard.parallelize(w.fn, mesh=mesh, method=method)
                     .plan(*w.args).cost.total_s)
    assert all(a > b for a, b in zip(costs, costs[1:])), costs


def test_plan_with_stages_round_trips_and_draws():
    w = mlp(num_layers=4, batch=16, hidden=16, abstract=True)
    method = autoshard.PipeshardParallel(num_microbatches=4, num_stages=2, num_layers=2,
                                         stage_method=autoshard.DataParallel())
    plan = autoshard.parallelize(w.fn, mesh=autoshard.abstract_mesh((2, 4), ("d", "m")),
                                 method=method).plan(*w.args)
    assert all(isinstance(st, autoshard.StageAssignment) for st in plan.stages)
    again = autoshard.Plan.from_json(plan.to_json())
    assert again.stages == plan.stages
    assert again.to_json() == plan.to_json()
    assert "2 stages, 4 micro-batches, schedule 1f1b" in plan._repr_html_()
    assert "pipeline: 2 stage(s)" in plan.summary()


def test_grad_is_jax_grad_outside_pipelines():
    f = lambda p: jnp.sum(autoshard.mark_layer_boundary(p) ** 2)  # noqa: E731
    x = jnp.arange(3.0)
    np.testing.assert_allclose(autoshard.grad(f)(x), jax.grad(f)(x))
    v, g = jax.jit(autoshard.value_and_grad(f))(x)
    np.testing.assert_allclose(g, 2 * x)


def test_errors_name_the_problem(mlp8):
    w, _ = mlp8
    mesh = autoshard.abstract_mesh((8,), ("data",))

    def plan(fn, args, **kw):
        method = autoshard.PipeshardParallel(stage_method=autoshard.DataParallel(), **kw)
        return autoshard.parallelize(fn, mesh=mesh, method=method).plan(*args)

    with pytest.raises(ValueError, match="num_microbatches=3 does not divide the batch"):
        plan(w.fn, w.args, num_microbatches=3)
    with pytest.raises(ValueError, match="num_stages=5 but the loss has only 4 layer"):
        plan(w.fn, w.args, num_stages=5, num_layers=4)

    def vjp_step(params, opt_state, batch):   # jax.vjp: no gradient call to cut at
        loss, pullback = jax.vjp(lambda p: jnp.sum(p["layers"][0]["w"]), params)
        return pullback(jnp.ones_like(loss))[0], opt_state

    with pytest.raises(ValueError, match="with jax.value_and_grad or jax.grad .* or "
                                         "autoshard.value_and_grad / autoshard.grad"):
        plan(vjp_step, w.args)
    def batch_outside(params, opt_state, batch):
        loss, grads = autoshard.value_and_grad(
            lambda p, b: jnp.mean(b["x"] @ p["layers"][0]["w"]))(params, batch)
        # (a sum of the batch alone would move into the loss: batch_epilogue)
        return grads, jnp.sum(batch["x"] @ grads["layers"][0]["w"])

    with pytest.raises(ValueError, match="uses the batch outside the function it "
                                         "differentiates"):
        plan(batch_outside, w.args, num_microbatches=2)

    def with_aux(params, opt_state, batch):
        return autoshard.value_and_grad(lambda p: jnp.sum(p["layers"][0]["w"]),
                                        has_aux=True)(params)

    with pytest.raises(TypeError, match=r"has_aux=True\): the function must return a pair"):
        plan(with_aux, w.args)
    saved = plan(w.fn, w.args, num_stages=2, num_layers=2)
    assert autoshard.parallelize(w.fn, mesh=mesh, plan=saved).plan(*w.args) is saved
    with pytest.raises(ValueError, match="schedule must be"):
        autoshard.PipeshardParallel(schedule="zigzag")
    with pytest.raises(ValueError, match="num_microbatches must be a positive int"):
        autoshard.PipeshardParallel(num_microbatches=0)


def test_pre_gradient_work_and_a_cross_stage_update():
    # Work before the gradient (a parameter cast) runs once per step; global-norm clipping
    # reads every stage's gradients, so the update runs as one program on the whole mesh.
    opt = optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-2))

    def loss_fn(params, batch):
        x = batch["x"]
        for w in params:
            x = jnp.tanh(x @ w)
        return jnp.mean((x - batch["y"]) ** 2)

    def step(params, opt_state, batch):
        used = [w.astype(jnp.bfloat16).astype(jnp.float32) for w in params]
        loss, grads = autoshard.value_and_grad(loss_fn)(used, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    keys = jax.random.split(jax.random.key(2), 5)
    params = [jax.random.normal(k, (16, 16)) / 4 for k in keys[:4]]
    args = (params, opt.init(params), {"x": jax.random.normal(keys[4], (8, 16)),
                                       "y": jnp.zeros((8, 16))})
    method = autoshard.PipeshardParallel(num_microbatches=2, num_stages=2, num_layers=2,
                                         stage_method=autoshard.DataParallel())
    pstep = autoshard.parallelize(step, mesh=autoshard.make_mesh((4,), ("data",)),
                                  method=method)
    assert_trees_allclose(pstep(*args), jax.jit(step)(*args))
    entry = next(iter(pstep._cache.values()))
    assert len(entry.pipeline.pre) == 1
    assert [a.stage for a in entry.pipeline.apply] == [-1]


def test_cli_plans_a_pipeline(tmp_path, capsys):
    from autoshard.cli import main as _cli
    out = tmp_path / "pipe.json"
    assert _cli.main(["plan", "examples.models:mlp", "--mesh", "8", "--microbatches", "4",
                      "--stages", "2", "--layers", "2", "--method", "dp", "--no-compare",
                      "--json", str(out)]) == 0
    assert "pipeline: 2 stage(s), 4 micro-batch(es)" in capsys.readouterr().out
    assert len(autoshard.Plan.from_json(out.read_text()).stages) == 2
    assert _cli.main(["plan", "examples.models:mlp", "--mesh", "8", "--stages", "2"]) != 0
    assert "give --microbatches too" in capsys.readouterr().err


def test_benchmark_tables_render():
    from benchmarks import pipeline as bench
    row = dict(workload="deep_mlp", description="MLP", mesh="8", method="ShardParallel",
               modelled_s=2e-3, measured_s=3e-2, planning_s=1.0, stages="1 program",
               jit_1dev_s=1e-2, modelled_ratio=1.0, measured_ratio=1.0, cluster="h100-80gb",
               audit=[])
    text = bench.markdown([row, dict(row, method="Pipeshard B=4 (DP)", modelled_ratio=0.9,
                                     audit=["stage 0: missing all-to-all"])],
                          quick=True, repeats=3)
    assert "| 8 | Pipeshard B=4 (DP) | 2.000 ms | 0.90 |" in text
    assert "| 1 program | clean |" in text and "| 1 program | 1 difference(s) |" in text
    assert "- 8, Pipeshard B=4 (DP): stage 0: missing all-to-all" in text
    assert "| ShardParallel | 2.000 ms | 1.00 |" in bench.markdown_modelled([[dict(row, mesh="4x8")]])


@pytest.mark.parametrize("layers, shape, names, stages", [
    (2, (2, 4), ("data", "model"), 2),
    (4, (8,), ("data",), 4),   # stages on 2 devices, gradients reduced once per step
], ids=["2x4", "8_deferred"])
def test_a_residual_the_forward_resharded_reaches_the_backward_resharded(
        layers, shape, names, stages):
    """A stage's plan is one program, in which an activation gathered for a forward dot is
    gathered once for its backward readers too; run as a forward and a backward program,
    the backward gathered it again, unpriced (the audit found one more all-gather per
    stage of these GPTs). The forward now hands such a residual over in the layout its
    backward readers read it in."""
    w = gpt(num_layers=layers, d_model=64, heads=4 * (1 + (layers == 2)), seq=32,
            batch=8 * (1 + (layers == 4)), vocab=256)
    step = autoshard.parallelize(w.fn, mesh=autoshard.make_mesh(shape, names),
                                 batch_argnums=w.batch_argnums,
                                 method=autoshard.PipeshardParallel(
                                     num_microbatches=4, num_stages=stages, num_layers=layers,
                                     stage_method=autoshard.ShardParallel(time_limit_s=2.0)))
    report = step.audit(*w.args)
    assert report.ok, report.summary()
    assert_trees_allclose(step(*w.args), jax.jit(w.fn)(*w.args), atol=1e-4)
