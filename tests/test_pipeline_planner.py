"""Stage candidates' once-per-step costs (autoshard/pipeline/planner.py): the stage DP
prices each stage's apply-gradient program and the step-level values sent to it before the
stages are chosen, and those prices equal what the chosen stages then run."""
import math

import jax
import jax.numpy as jnp
import optax
import pytest

import autoshard
from examples.models import gpt
from tests.trees import assert_trees_allclose

MESHES = [((8,), ("data",)), ((2, 4), ("data", "model"))]


def _layout(fn, args, mesh_shape, names, **method):
    step = autoshard.parallelize(fn, mesh=autoshard.make_mesh(mesh_shape, names),
                                 method=autoshard.PipeshardParallel(**method))
    plan = step.plan(*args)
    return plan, next(iter(step._cache.values())).pipeline


@pytest.mark.parametrize("mesh_shape, names", MESHES)
def test_apply_programs_and_the_tied_embedding_are_priced_per_step(mesh_shape, names):
    # vocab 32 x d_model 16: the tied embedding is the only [32, 16] parameter
    w = gpt(num_layers=2, batch=8, seq=4, d_model=16, heads=2, vocab=32)
    plan, layout = _layout(w.fn, w.args, mesh_shape, names, num_microbatches=4, num_stages=2,
                           num_layers=2)
    apply = {a.stage: a.plan.cost.total_s for a in layout.apply}
    assert sorted(apply) == [0, 1]   # AdamW without clipping: one apply program per stage
    for s, st in enumerate(layout.stages):
        # the DP's once-per-step work of a stage: the apply program it then runs (priced
        # with the stage plan's layouts before the stages were chosen), plus the values it
        # is sent once per step
        assert st.cost.per_step_s - st.step_send_s == pytest.approx(apply[s], rel=1e-9)
    first, last = layout.stages
    assert first.step_send_s == 0.0   # it owns every parameter it reads
    # the last stage reads the embedding stage 0 owns: it is sent the embedding and sends
    # the embedding's gradient back, once per step each
    P = last.program.traced.program
    [k] = [k for k, v in enumerate(last.program.inputs)
           if P.avals[P.invars[k]].shape == (32, 16)]
    sizes = dict(zip(names, last.mesh_shape))
    spec = last.plan.flat_in_specs[k]
    split = math.prod(sizes[a] for entry in spec if entry is not None
                      for a in (entry if isinstance(entry, tuple) else (entry,)))
    grad_out = len(last.program.outputs) + sum(last.program.diff_in[:k])
    gspec = last.plan.flat_out_specs[grad_out]
    gsplit = math.prod(sizes[a] for entry in gspec if entry is not None
                       for a in (entry if isinstance(entry, tuple) else (entry,)))
    link = plan.cluster.links_for_mesh(mesh_shape)[0]
    expected = 2 * link.latency + (32 * 16 * 4 / split + 32 * 16 * 4 / gsplit) / link.bandwidth
    assert last.step_send_s == pytest.approx(expected, rel=1e-9)


def _tanh_mlp(opt, num_layers: int, x, marked: bool = False):
    """A step over ``num_layers`` square tanh layers (cut by markers when ``marked``),
    updated by ``opt``, and its arguments."""

    def loss_fn(params, x):
        for i, layer in enumerate(params):
            if marked and i:
                x = autoshard.mark_layer_boundary(x)
            x = jnp.tanh(x @ layer)
        return jnp.mean(x ** 2)

    def step(params, opt_state, x):
        loss, grads = autoshard.value_and_grad(loss_fn)(params, x)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = [jnp.full((x.shape[1],) * 2, 0.1 * (i + 1)) for i in range(num_layers)]
    return step, (params, opt.init(params), x)


@pytest.mark.parametrize("mesh_shape, names", MESHES)
def test_an_update_mixing_stages_is_charged_once(mesh_shape, names):
    # SGD after global-norm clipping: the clipping reads every gradient, so the update
    # cannot be split by stage
    fn, args = _tanh_mlp(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-2)), 4,
                         jnp.ones((16, 16)))
    _, layout = _layout(fn, args, mesh_shape, names, num_microbatches=2, num_stages=2,
                        num_layers=2, stage_method=autoshard.DataParallel())
    [whole] = layout.apply
    assert whole.stage == -1   # one apply program on the full mesh
    first, second = layout.stages
    # its cost is charged to the stage holding layer 0 only (every slicing has one)
    assert first.cost.per_step_s == pytest.approx(whole.plan.cost.total_s, rel=1e-9)
    assert second.cost.per_step_s == 0.0


def test_identical_layer_ranges_are_planned_once(monkeypatch):
    # six equal tanh layers cut by markers: the first reads the batch, the last makes the
    # loss, the four between are the same program whatever their position, so a range of
    # k middle layers is planned once per sub-mesh, not once per starting layer
    from autoshard.pipeline import planner as _pipeline_planner
    calls = []
    plan_traced = _pipeline_planner.plan_traced
    monkeypatch.setattr(_pipeline_planner, "plan_traced",
                        lambda *a, **k: calls.append(1) or plan_traced(*a, **k))
    step, args = _tanh_mlp(optax.sgd(0.1), 6, jnp.linspace(-1.0, 1.0, 64).reshape(8, 8),
                           marked=True)
    method = autoshard.PipeshardParallel(num_microbatches=2,
                                         stage_method=autoshard.DataParallel())
    parallel = autoshard.parallelize(step, mesh=autoshard.make_mesh((8,), ("data",)),
                                     method=method)
    plan = parallel.plan(*args)
    # candidates on (8,): the whole range on (8,), the other 20 ranges on (1,), (2,), (4,):
    # 61. Distinct programs: 5 ranges starting at layer 0 (short of the whole), 5 ending at
    # layer 5, and 4 among the 10 ranges of middle layers (one per length): 14 x 3 + 1 = 43,
    # and one more: the whole step as one program (plain intra-op, num_stages=None)
    assert int(plan.solver.status.split(" over ")[1].split()[0]) == 61
    assert len(calls) == 43 + 1
    assert_trees_allclose(parallel(*args), jax.jit(step)(*args))
