"""A loop over layers planned once (intra.loop_plans): the scan stays a loop in the compiled
program, its body planned as one step run for every layer, the layouts pinned inside it."""
import json
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.cost_model import MeshCostModel
from autoshard.intra.graph import build_graph
from autoshard.intra.liveness import live_ranges
from autoshard.ir import hlo
from autoshard.ir.hlo import collective_stats
from autoshard.ir.loop_view import loop_view
from autoshard.ir.program import Literal
from autoshard.ir.trace import trace
from examples import models
from tests.trees import ADAM_ATOL, assert_trees_allclose

MESHES = [((8,), ("model",)), ((2, 4), ("data", "model"))]


def _gpt(layers: int):
    """MaxText's way: the blocks' weights stacked, a ``lax.scan`` over them (adamw)."""
    return models.gpt(num_layers=layers, batch=8, seq=8, d_model=32, heads=2, vocab=64,
                      scan_layers=True)


def _parallelize(workload, mesh_shape=(2, 4), axes=("data", "model"), **kwargs):
    return autoshard.parallelize(workload.fn, mesh=autoshard.make_mesh(mesh_shape, axes),
                                 batch_argnums=workload.batch_argnums, **kwargs)


@pytest.mark.parametrize("mesh_shape, axes", MESHES)
def test_a_scanned_gpt_runs_as_a_loop_as_planned_and_matches_jit(mesh_shape, axes):
    workload = _gpt(3)
    step = _parallelize(workload, mesh_shape, axes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = step.plan(*workload.args)
    assert [loop.eqn for loop in plan.loops] and len(plan.loops) == 2  # forward, backward
    assert " while(" in step.lower(*workload.args).compile().as_text()  # not unrolled
    report = step.audit(*workload.args)
    assert report.ok, report.summary()
    assert_trees_allclose(step(*workload.args), jax.jit(workload.fn)(*workload.args),
                          atol=ADAM_ATOL)


def test_planning_a_loop_does_not_grow_with_its_layers():
    # the view the search runs on holds one copy of the body however many layers run,
    # and the unrolled program one per layer
    sizes = {}
    for layers in (2, 6):
        workload = _gpt(layers)
        rolled = loop_view(trace(workload.fn, workload.args, step_limit=True,
                                 rolled_layers=True))
        assert [loop.length for loop in rolled.loops] == [layers, layers]
        unrolled = trace(workload.fn, workload.args, step_limit=True)
        sizes[layers] = (len(rolled.traced.program.eqns), len(unrolled.program.eqns))
    assert sizes[2][0] == sizes[6][0]
    assert sizes[6][1] > 2 * sizes[2][1]


def test_the_loop_is_laid_out_as_the_unrolled_layers_are():
    # every layer laid out alike, as the loop runs them: here the unrolled plan lays its
    # layers out so too, with the same collectives; the loop's own traffic (its stacked
    # residuals written, XLA's copies of their buffers) is what its compute adds (measured
    # on this step: 11 % modelled, the same step time; at 6 layers the loop's plan is the
    # cheaper, 1.229 against 1.276 ms, and it ran in 19.3 against 21.4 ms)
    workload = _gpt(3)
    loop, unrolled = (_parallelize(workload, method=autoshard.ShardParallel(unroll_scans=unroll))
                      .plan(*workload.args) for unroll in (False, True))
    assert loop.flat_in_specs == unrolled.flat_in_specs
    moved = [p.cost.communication_s + p.cost.resharding_s for p in (loop, unrolled)]
    assert moved[0] <= 1.01 * moved[1]
    assert loop.cost.compute_s <= 1.15 * unrolled.cost.compute_s


def test_a_saved_plan_with_loops_runs_without_planning(tmp_path):
    workload = _gpt(2)
    plan = _parallelize(workload).plan(*workload.args)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = autoshard.Plan.from_json(path.read_text())
    assert loaded.loops == plan.loops
    step = _parallelize(workload, plan=loaded)
    assert_trees_allclose(step(*workload.args), jax.jit(workload.fn)(*workload.args),
                          atol=ADAM_ATOL)
    # a loop's layouts pinned on an equation that is no loop: said, before anything runs
    data = json.loads(path.read_text())
    data["loops"][0]["equation"] = 0
    bad = autoshard.Plan.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="inside a loop at equation 0, but that equation is "
                                         "not a scan"):
        _parallelize(workload, plan=bad)(*workload.args)
    data["loops"][0]["equation"] = -1
    with pytest.raises(autoshard.PlanFormatError, match=r"plan.loops\[0\].equation"):
        autoshard.Plan.from_json(json.dumps(data))


def test_a_flax_nn_scan_stack_trained_with_donated_adam_matches_jit():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(32)(jax.nn.gelu(nn.Dense(64)(x))), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=4)
            return nn.Dense(1)(stack()(x, None)[0])

    model, opt = Model(), optax.adam(1e-3)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x, y = jax.random.normal(kx, (16, 32)), jax.random.normal(ky, (16, 1))
    params = model.init(kp, x)

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    expected = jax.jit(step)(params, opt.init(params), x, y)
    run = autoshard.parallelize(step, mesh=autoshard.make_mesh((2, 4), ("data", "model")),
                                donate_argnums=(0, 1))
    assert len(run.plan(params, opt.init(params), x, y).loops) == 2
    assert_trees_allclose(run(params, opt.init(params), x, y), expected, atol=ADAM_ATOL)


def _remat_layers(w, x, key):
    layer = jax.checkpoint(lambda h, wi: (jnp.tanh(h @ wi), None))
    return jnp.mean(jax.lax.scan(layer, x, w)[0] ** 2)


def _dropout_layers(w, x, key):
    def layer(h, step):
        wi, k = step
        h = jnp.tanh(h @ wi)
        return jnp.where(jax.random.bernoulli(k, 0.9, h.shape), h / 0.9, 0.0), None
    return jnp.mean(jax.lax.scan(layer, x, (w, jax.random.split(key, w.shape[0])))[0] ** 2)


def _tuple_carry_layers(w, x, key):
    def layer(carry, wi):
        h, total = carry
        h = jnp.tanh(h @ wi)
        return (h, total + jnp.sum(h)), h.mean(0)
    (h, total), means = jax.lax.scan(layer, (x, 0.0), w)
    return jnp.mean(h ** 2) + 1e-3 * (total + jnp.sum(means))


def _unrolled_twice_layers(w, x, key):
    return jnp.mean(jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w, unroll=2)[0] ** 2)


@pytest.mark.parametrize("loss", [_remat_layers, _dropout_layers, _tuple_carry_layers,
                                  _unrolled_twice_layers])
def test_scanned_layers_as_users_write_them_run_as_priced_and_match_jit(loss):
    # a checkpointed layer, dropout keyed per layer (keys as stacked operands), a pytree
    # carry with per-layer outputs, a scan unrolled twice (its compiled body holds two
    # copies of the step: the audit counts both)
    def step(w, x, key):
        return jax.value_and_grad(loss)(w, x, key)

    w = jax.random.normal(jax.random.key(0), (4, 64, 64)) / 8
    args = (w, jax.random.normal(jax.random.key(1), (16, 64)), jax.random.key(2))
    run = autoshard.parallelize(step, mesh=autoshard.make_mesh((2, 4), ("data", "model")))
    assert len(run.plan(*args).loops) == 2
    report = run.audit(*args)
    assert report.ok, report.summary()
    assert_trees_allclose(run(*args), jax.jit(step)(*args), atol=1e-4)


def test_equinox_blocks_vmapped_into_a_stack_and_scanned_match_jit():
    # equinox's idiom: blocks made by filter_vmap (their arrays stacked), the static part
    # split off and the arrays scanned over, trained by adamw
    import equinox as eqx

    class Block(eqx.Module):
        up: eqx.nn.Linear
        down: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.up, self.down = eqx.nn.Linear(32, 64, key=k1), eqx.nn.Linear(64, 32, key=k2)

        def __call__(self, x):
            return x + self.down(jax.nn.gelu(self.up(x)))

    params, static = eqx.partition(eqx.filter_vmap(Block)(jax.random.split(jax.random.key(0), 4)),
                                   eqx.is_array)
    opt = optax.adamw(1e-3)

    def step(params, opt_state, x, y):
        def loss(params):
            def layer(h, p):
                return jax.vmap(eqx.combine(p, static))(h), None
            return jnp.mean((jax.lax.scan(layer, x, params)[0] - y) ** 2)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    args = (params, opt.init(params), jax.random.normal(jax.random.key(1), (16, 32)),
            jnp.ones((16, 32)))
    run = autoshard.parallelize(step, mesh=autoshard.make_mesh((2, 4), ("data", "model")))
    assert len(run.plan(*args).loops) == 2
    assert run.audit(*args).ok
    assert_trees_allclose(run(*args), jax.jit(step)(*args), atol=ADAM_ATOL)


def test_a_preset_runs_a_scanned_model_as_a_loop_as_jax_jit_does():
    # the preset's layouts in and out, nothing pinned inside the loop: the program jax.jit
    # compiles with the same shardings, collective for collective (its price is XLA's
    # propagation as the view models it, which the audit compares, as for any preset)
    workload = _gpt(3)
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    step = _parallelize(workload, method=autoshard.Megatron())
    plan = step.plan(*workload.args)
    assert (plan.value_specs, plan.operand_specs, plan.loops) == ((), (), ())
    compiled = step.lower(*workload.args).compile()
    assert " while(" in compiled.as_text()
    named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree,  # noqa: E731
                                      is_leaf=lambda s: isinstance(s, P))
    hand = jax.jit(workload.fn, in_shardings=named(plan.in_specs),
                   out_shardings=named(plan.out_specs))
    assert _collectives(compiled) == _collectives(hand.lower(*workload.args).compile())
    assert_trees_allclose(step(*workload.args), jax.jit(workload.fn)(*workload.args),
                          atol=ADAM_ATOL)


def test_a_zero3_preset_keeps_a_loops_stacked_results_as_each_step_makes_them():
    # XLA writes a scan's stacked results into its buffers step by step (a dynamic update
    # slice, which its propagation passes on forward first): the residuals stacked for the
    # backward loop keep the batch split the forward step makes them in. The view stands
    # for that write with a broadcast; propagated as one, it took the layout the backward
    # loop's weight gradients want, and the preset was priced three all-to-alls of the
    # stacks XLA does not run, and half the bytes of the all-reduces it runs (a535f38)
    workload = models.gpt(num_layers=2, batch=16, seq=16, d_model=64, heads=4, vocab=128,
                          scan_layers=True)
    step = _parallelize(workload, cluster=autoshard.cluster_preset("h100-80gb"),
                        method=autoshard.ZeRO3())
    plan = step.plan(*workload.args)
    assert not [c for c in plan.collectives if c.kind == "all-to-all"]
    report = step.audit(*workload.args)
    rows = {row.kind: row for row in report.rows}
    assert rows["all-reduce"].planned_bytes == pytest.approx(rows["all-reduce"].compiled_bytes,
                                                             rel=0.02)
    assert "all-to-all" not in rows or rows["all-to-all"].compiled_count == 0
    assert_trees_allclose(step(*workload.args), jax.jit(workload.fn)(*workload.args),
                          atol=ADAM_ATOL)


def test_a_loops_stacked_buffers_are_in_memory_while_it_runs():
    # XLA's loop reads a step of a stacked operand every iteration and writes a step of a
    # stacked result into a buffer allocated before it: both whole while the loop runs.
    # The view's equations read the stacked residuals once (the backward loop's first
    # slice) and make the stacks once (after the forward step): the plan's peak left
    # the loop's buffers out while its steps ran (0.85 of the compiled peak here, a535f38)
    workload = models.gpt(num_layers=4, batch=16, seq=32, d_model=64, heads=4, vocab=128,
                          scan_layers=True)
    view = loop_view(trace(workload.fn, workload.args, step_limit=True, rolled_layers=True))
    forward, backward = view.loops
    ranges = live_ranges(view.traced.program, (), *build_graph(
        view.traced, MeshCostModel(autoshard.cluster_preset("host-cpu"), (2, 4)),
        view=view).loop_buffers)
    eqns = view.traced.program.eqns
    for s in forward.stacks:   # written from the forward loop's first step on
        assert ranges[eqns[s].outputs[0]][0] <= forward.start
    for s in backward.slices:  # read by every step of the backward loop
        if s is not None and not isinstance(eqns[s].inputs[0], Literal):
            assert ranges[eqns[s].inputs[0]][1] >= backward.stop - 1
    step = _parallelize(workload, donate_argnums=(0, 1))
    plan = step.plan(*workload.args)
    compiled = hlo.memory(step.lower(*workload.args).compile())["total"]
    assert plan.cost.peak_memory_bytes == pytest.approx(compiled, rel=0.1)


def _collectives(compiled) -> dict:
    return {k: (v["count"], v["bytes"]) for k, v in collective_stats(compiled.as_text()).items()
            if v["count"]}
