"""``plan.audit``: the compiled program against the plan that priced it."""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.ir.hlo import compiler_log, fresh_compile
from autoshard.plan.audit import audit
from autoshard.plan.parts import Collective
from examples.models import gpt, mlp
from tests.trees import assert_trees_allclose

MESHES = [((8,), ("data",)), ((2, 4), ("data", "model"))]


@pytest.fixture(scope="module", params=MESHES, ids=["8", "2x4"])
def planned(request):
    shape, names = request.param
    w = mlp(num_layers=4, batch=32, hidden=512, abstract=True)
    step = autoshard.parallelize(w.fn, mesh=autoshard.make_mesh(shape, names),
                                 batch_argnums=w.batch_argnums)
    plan = step.plan(*w.args)
    compiled = step.lower(*w.args).compile()
    return step, w, plan, compiled


def test_an_honest_plan_audits_clean(planned):
    step, w, plan, compiled = planned
    report = step.audit(*w.args)
    assert report.ok, report.summary()
    assert report.rows and all(r.planned_count and r.compiled_count for r in report.rows)
    # every collective XLA runs is one the plan priced, over the same mesh axes
    assert {(r.kind, r.axes) for r in report.rows} == \
        {(c.kind, c.axes) for c in plan.collectives if c.nbytes}
    assert report.flops[1] == pytest.approx(report.flops[0], rel=0.1)


def test_a_collective_the_plan_did_not_price_is_reported(planned):
    _, _, plan, compiled = planned
    priced = [c for c in plan.collectives if c.nbytes]
    dropped = dataclasses.replace(plan, collectives=tuple(
        c for c in plan.collectives if (c.kind, c.axes) != (priced[0].kind, priced[0].axes)))
    report = dropped.audit(compiled)
    axes = priced[0].axes
    where = "mesh axis " + axes[0] if len(axes) == 1 else "mesh axes " + ", ".join(axes)
    assert not report.ok
    assert any(d.startswith(f"unexpected {priced[0].kind} over {where}")
               for d in report.differences), report.differences


def test_mispriced_bytes_and_phantom_collectives_are_reported(planned):
    _, _, plan, compiled = planned
    doubled = tuple(dataclasses.replace(c, nbytes=2 * c.nbytes) for c in plan.collectives)
    phantom = Collective("made up", "all-to-all", 1e-6, 4096,
                         (plan.axis_names[0],))
    report = dataclasses.replace(plan, collectives=doubled + (phantom,)).audit(compiled)
    assert any("the compiled program moves" in d for d in report.differences)
    assert any(d.startswith("missing all-to-all") for d in report.differences)


def test_mispriced_work_is_reported(planned):
    _, _, plan, compiled = planned
    wrong = dataclasses.replace(plan, cost=dataclasses.replace(plan.cost, flops=3 * plan.cost.flops))
    report = wrong.audit(compiled)
    assert any(d.startswith("flops per device") for d in report.differences)


def test_work_xla_cannot_count_is_no_difference():
    """XLA's ``cost_analysis`` counts -1 flops and bytes for an op it cannot price (the CPU's
    TopK custom call): a program of such ops alone has no count to compare, where the
    audit reported the modelled flops at -2048x the compiled."""
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    v = jnp.ones((64, 256))
    step = autoshard.parallelize(lambda v: jax.lax.approx_max_k(v, 8), mesh=mesh)
    compiled = step.lower(v).compile()
    assert compiled.cost_analysis()["flops"] < 0
    report = step.audit(v)
    assert report.ok, report.summary()


def test_xla_rematerialization_warnings_are_differences(planned):
    _, _, plan, compiled = planned
    log = ("W0000 spmd_partitioner.cc:652] [spmd] Involuntary full rematerialization. The "
           "compiler cannot go from sharding {devices=[8,1]<=[8]} to {devices=[1,8]<=[8]}")
    report = audit(plan, compiled.as_text(), {}, log)
    assert report.rematerializations and not report.ok
    assert any("rematerialized" in d for d in report.differences)


def test_xlas_warnings_are_read_from_a_program_already_compiled():
    # jax hands back a program it compiled before without compiling it again, so without
    # XLA's warnings: an audit after the step had run read an empty log (a reshape whose
    # split dims XLA can only reach by replicating: "Involuntary full rematerialization"
    # printed by the first compile only). The audit's compile is its own.
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))

    def f(x):
        y = jax.lax.with_sharding_constraint(x.reshape(8, 8, 8) * 2,
                                             NamedSharding(mesh, P(None, "model", "data")))
        return y + 1

    x = jax.device_put(jnp.ones((64, 8)), NamedSharding(mesh, P(("data", "model"), None)))
    step = jax.jit(f)
    step(x)  # compiled here
    with compiler_log() as cached:
        step.lower(x).compile()
    assert "Involuntary" not in cached.text  # what the audit read before
    for _ in range(2):  # a second audit of the same program reads the warning too
        compiled, log = fresh_compile(step.lower(x))
        assert "Involuntary full rematerialization" in log
    assert compiled.as_text() == step.lower(x).compile().as_text()  # the same program


def test_a_gathers_reduce_scatter_runs_as_priced():
    # a GPT's embedding table split on its vocabulary over "model", the looked-up rows
    # reduce-scattered over it. Pinned straight to the scattered layout, XLA's gather
    # partitioner moved the indices (two all-gathers over "data" the plan never priced);
    # pinned first to the summed rows, it all-reduces them and slices
    w = gpt(num_layers=1, d_model=1024, heads=8, seq=64, batch=8, vocab=4096)
    step = autoshard.parallelize(w.fn, mesh=autoshard.make_mesh((2, 4), ("data", "model")),
                                 cluster=autoshard.cluster_preset("h100-80gb"),
                                 batch_argnums=w.batch_argnums)
    plan = step.plan(*w.args)
    assert any(c.op.startswith("gather") and c.kind == "reduce-scatter"
               for c in plan.collectives), "the case this test is about: a gather reduce-scatters"
    report = step.audit(*w.args)
    assert report.ok, report.summary()
    (_, state, loss), (_, expected_state, expected_loss) = step(*w.args), jax.jit(w.fn)(*w.args)
    # the gradients' moments and the loss (adam's step, lr * m / (sqrt(v) + eps), turns
    # float32 reduction-order noise in a near-zero gradient into up to lr)
    assert_trees_allclose((state, loss), (expected_state, expected_loss))


def test_a_pipeline_plan_is_not_read_as_one_program():
    w = mlp(num_layers=4, batch=32, hidden=64, abstract=True)
    method = autoshard.PipeshardParallel(num_microbatches=2, num_stages=2, num_layers=2)
    plan = autoshard.parallelize(w.fn, mesh=autoshard.abstract_mesh((8,), ("data",)),
                                 method=method).plan(*w.args)
    with pytest.raises(ValueError, match="pipeline plan runs several"):
        audit(plan, "", {})


@pytest.fixture(scope="module")
def pipelined():
    w = mlp(num_layers=4, batch=32, hidden=512)
    method = autoshard.PipeshardParallel(num_microbatches=4, num_stages=2)
    step = autoshard.parallelize(w.fn, mesh=autoshard.make_mesh((2, 4), ("data", "model")),
                                 method=method, batch_argnums=w.batch_argnums)
    return step, w


def test_a_pipelined_step_is_audited_program_by_program(pipelined):
    """``step.audit(*args)`` of a pipelined step compares each program it runs with the
    part of the plan that prices it: a stage's forward and backward programs (one
    micro-batch) on the stage's sub-mesh, the apply programs. It failed inside with an
    AttributeError, then refused; a stage's bytes were priced at 1.58x (the transposes of
    its weight gradients, which XLA folds into their dots, priced as copies)."""
    step, w = pipelined
    plan = step.plan(*w.args)
    assert any(p.mesh_shape != plan.mesh_shape for p in plan.programs)  # sub-meshes
    report = step.audit(*w.args)
    assert report.ok, report.summary()
    names = [name for name, _ in report.programs]
    assert names[:2] == ["stage 0", "stage 1"] and len(names) == len(plan.programs)
    assert sum(row.compiled_count for row in report["stage 1"].rows) > 0
    assert report["stage 0"].flops[1] > 0 and report["stage 0"].bytes_accessed[1] > 0


def test_a_mispriced_pipeline_program_is_reported_under_its_name(pipelined):
    step, w = pipelined
    plan = step.plan(*w.args)
    compiled = step.lower(*w.args).compile()
    programs = list(plan.programs)
    programs[1] = dataclasses.replace(programs[1], flops=3 * programs[1].flops)
    phantom = Collective("stage 0: phantom", "all-to-all", 1e-6, 4096, ("model",))
    wrong = dataclasses.replace(plan, programs=tuple(programs),
                                collectives=plan.collectives + (phantom,))
    report = wrong.audit(compiled)
    assert any(d.startswith("stage 1: flops per device") for d in report.differences), \
        report.differences
    assert any(d.startswith("stage 0: missing all-to-all") for d in report.differences)
    with pytest.raises(ValueError, match="every program"):
        plan.audit(compiled["stage 0 forward"])


@pytest.mark.parametrize("cpu", [True, False], ids=["cpu", "gpu"])
def test_an_ops_all_reduce_and_reduce_scatter_fold_on_the_cpu(cpu):
    # On 2x2x2 ("data", "fsdp", "model"), a dot contracting over fsdp and model: its output
    # all-reduced over model (4 MiB per device) and reduce-scattered over fsdp (2 MiB). The
    # CPU runs the reduce-scatter as an all-reduce (4 MiB) plus a slice and folds the two
    # all-reduces into one over fsdp and model; a GPU runs both as priced. A resharding's
    # reduce-scatter (another op's) and a lone one are not folded.
    from types import SimpleNamespace

    from autoshard.plan.audit import _as_compiled

    mib = 2 ** 20
    plan = SimpleNamespace(axis_names=("data", "fsdp", "model"), mesh_shape=(2, 2, 2),
                           collectives=(
        Collective("dot#1", "all-reduce", 1e-6, 4 * mib, ("model",)),
        Collective("dot#1", "reduce-scatter", 1e-6, 2 * mib, ("fsdp",)),
        Collective("dot#2", "all-reduce", 1e-6, 4 * mib, ("model",)),
        Collective("dot#2→add#3", "reduce-scatter", 1e-6, 2 * mib, ("fsdp",), resharding=True),
        Collective("reduce#4", "reduce-scatter", 1e-6, mib, ("data",))))
    if cpu:
        assert _as_compiled(plan, True) == [
            ("all-reduce", ("fsdp", "model"), 4 * mib), ("all-reduce", ("model",), 4 * mib),
            ("all-reduce", ("fsdp",), 4 * mib), ("all-reduce", ("data",), 2 * mib)]
    else:
        assert _as_compiled(plan, False) == [(c.kind, c.axes, c.nbytes) for c in plan.collectives]


@pytest.mark.parametrize("shape, names", MESHES, ids=["8", "2x4"])
def test_a_host_callbacks_result_is_sent_from_one_device_as_priced(shape, names):
    """jax runs a ``pure_callback`` on one device and XLA all-reduces its result over the
    mesh: the audit found that all-reduce unpriced. It is priced, and no warning is given
    (host code has nothing to split)."""
    def step(w, x):
        loss, grad = jax.value_and_grad(lambda w: (jnp.tanh(x @ w) ** 2).mean())(w)
        norm = jax.pure_callback(lambda g: np.float32(np.linalg.norm(g)),
                                 jax.ShapeDtypeStruct((), jnp.float32), grad)
        return w - 0.1 * grad / (1.0 + norm), loss

    keys = jax.random.split(jax.random.key(0))
    args = (jax.random.normal(keys[0], (128, 128)) * 0.1, jax.random.normal(keys[1], (64, 128)))
    planned = autoshard.parallelize(step, mesh=autoshard.make_mesh(shape, names))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = planned.audit(*args)
    assert not [d for d in report.differences if "flops" not in d and "bytes" not in d], \
        report.summary()
    assert any(c.kind == "all-reduce" and c.axes == names and c.op.startswith("pure_callback")
               for c in planned.plan(*args).collectives)
    assert_trees_allclose(planned(*args), jax.jit(step)(*args), atol=1e-5)


@pytest.mark.parametrize("donate", [(), (0,)], ids=["kept", "donated"])
def test_an_argument_returned_unchanged_is_priced_as_the_copy_xla_makes(donate):
    """A frozen table returned as it came (the audit found the step's bytes at 0.73x the
    compiled program's): not donated, XLA copies it into the output's buffer; donated,
    the buffer is the output's already."""
    def step(params, x):
        grad = jax.grad(lambda w: (jnp.tanh(x @ w) ** 2).mean())(params["w"])
        return {"frozen": params["frozen"], "w": params["w"] - 0.1 * grad}

    keys = jax.random.split(jax.random.key(0), 3)

    def args():
        return ({"frozen": jax.random.normal(keys[0], (1024, 256)) * 0.1,
                 "w": jax.random.normal(keys[1], (256, 256)) * 0.1},
                jax.random.normal(keys[2], (64, 256)))

    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    planned = autoshard.parallelize(step, mesh=mesh, donate_argnums=donate)
    report = planned.audit(*args())
    assert report.ok, report.summary()
    assert_trees_allclose(planned(*args()), jax.jit(step)(*args()), atol=1e-5)


def test_a_value_gathered_from_both_mesh_axes_runs_one_all_gather_as_priced():
    # the user pins an activation split over both axes of a 2x4 mesh, then whole: XLA
    # gathers both axes in one all-gather over the 8 devices, and the plan prices (and
    # pins) that one, not a gather per axis
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = autoshard.make_mesh((2, 4), ("data", "model"))

    def loss(w, x):
        h = jax.lax.with_sharding_constraint(x @ w, NamedSharding(mesh, P(("data", "model"))))
        h = jax.lax.with_sharding_constraint(jnp.tanh(h), NamedSharding(mesh, P()))
        return jnp.sum(h ** 2)

    w = jax.random.normal(jax.random.PRNGKey(0), (256, 256)) / 16
    x = jax.random.normal(jax.random.PRNGKey(1), (512, 256))
    step = autoshard.parallelize(loss, mesh=mesh)
    report = step.audit(w, x)
    # (its bytes too: the gathered value's read is the sum's, not also the constraint's)
    assert report.ok, report.summary()
    gathers = [r for r in report.rows if r.kind == "all-gather"]
    assert [(r.axes, r.planned_count, r.compiled_count) for r in gathers] == \
        [(("data", "model"), 1, 1)], report.summary()
    np.testing.assert_allclose(step(w, x), jax.jit(loss)(w, x), rtol=1e-5)


def test_a_training_step_pinning_its_activations_audits_clean():
    # as users write it: params in a dict, donated; the loss closes over a batch passed by
    # keyword; a Python scalar learning rate; the hidden activation pinned split over both
    # axes (MaxText-style), the logits whole
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = autoshard.make_mesh((2, 4), ("data", "model"))

    def train_step(params, *, batch, lr=0.1):
        def loss_fn(p):
            h = jnp.tanh(batch["x"] @ p["w1"])
            h = jax.lax.with_sharding_constraint(h, NamedSharding(mesh, P(("data", "model"))))
            logits = jax.lax.with_sharding_constraint(h @ p["w2"], NamedSharding(mesh, P()))
            return jnp.mean((logits - batch["y"]) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(keys[0], (128, 256)) / 11,
              "w2": jax.random.normal(keys[1], (256, 16)) / 16}
    batch = {"x": jax.random.normal(keys[2], (512, 128)), "y": jax.random.normal(keys[3], (512, 16))}
    expected = jax.jit(train_step)(params, batch=batch)
    step = autoshard.parallelize(train_step, mesh=mesh, donate_argnums=0)
    report = step.audit(params, batch=batch)
    assert report.ok, report.summary()
    assert_trees_allclose(step(jax.tree.map(jnp.copy, params), batch=batch), expected)
