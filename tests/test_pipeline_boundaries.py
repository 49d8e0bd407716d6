"""The once-per-step programs of a pipeline read what the stage programs hand them in the
stages' layouts: no resharding between programs that the cost model does not see."""
import jax
import pytest

import autoshard
from examples.models import gpt
from tests.trees import assert_trees_allclose


def _same_devices(a, b) -> bool:
    return a.mesh.devices.shape == b.mesh.devices.shape and \
        list(a.mesh.devices.flat) == list(b.mesh.devices.flat)


def _boundary_reshards(pipe) -> list:
    """(key, program) where an apply program reads a gradient, or a step argument a stage
    also reads, in another layout than the stage on the same devices outputs or reads it."""
    made, read = {}, {}
    for st in pipe.stages:
        for key, sharding in zip(st.grad_targets, st.backward.out_shardings, strict=True):
            if key[0] == "v":
                made.setdefault(key, sharding)
        for key, sharding in zip(st.inputs, st.forward.in_shardings, strict=True):
            if key[0] == "v":
                read.setdefault(key, sharding)
    bad = []
    for step in pipe.apply:
        program = step.program
        for key, sharding, aval in zip(step.inputs, program.in_shardings, program.in_avals,
                                       strict=True):
            for theirs in (made.get(key), read.get(key)):
                if theirs is not None and _same_devices(theirs, sharding) and \
                        not theirs.is_equivalent_to(sharding, len(aval.shape)):
                    bad.append((key, step.name, theirs.spec, sharding.spec))
    return bad


@pytest.mark.parametrize("mesh_shape, names, num_stages", [
    ((8,), ("data",), 1),
    ((2, 4), ("data", "model"), 2),
])
def test_apply_reads_gradients_and_parameters_in_the_stage_layouts(mesh_shape, names,
                                                                   num_stages):
    w = gpt(num_layers=2, batch=8, seq=4, d_model=16, heads=2, vocab=32)
    method = autoshard.PipeshardParallel(num_microbatches=2, num_stages=num_stages,
                                         num_layers=2,
                                         stage_method=autoshard.ShardParallel(time_limit_s=5))
    step = autoshard.parallelize(w.fn, mesh=autoshard.make_mesh(mesh_shape, names),
                                 method=method)
    pipe = step._compiled(step._bind(w.args, {}), need_program=True).program
    assert len(pipe.apply) >= 1
    assert _boundary_reshards(pipe) == []
    assert_trees_allclose(step(*w.args), jax.jit(w.fn)(*w.args))


def test_one_stage_pipeline_does_not_undercut_plain_intra_op():
    # One stage over the whole mesh runs the plain step's work in B pieces, its gradient
    # all-reduce once per piece: it cannot be cheaper than the plain step. Before the
    # apply program's layouts were tied to the stage's, the AdamW update sharded over the
    # mesh while the stage read replicated parameters, the reshards between them free.
    w = gpt(abstract=True)
    mesh = autoshard.abstract_mesh((8, 8), ("data", "model"))
    cluster = autoshard.cluster_preset("h100-80gb")
    pipe = autoshard.parallelize(
        w.fn, mesh=mesh, cluster=cluster, batch_argnums=w.batch_argnums,
        method=autoshard.PipeshardParallel(num_microbatches=2, num_stages=1, num_layers=4)
    ).plan(*w.args)
    plain = autoshard.parallelize(w.fn, mesh=mesh, cluster=cluster,
                                  batch_argnums=w.batch_argnums,
                                  method=autoshard.ShardParallel()).plan(*w.args)
    assert len(pipe.stages) == 1 and pipe.stages[0].num_microbatches == 2
    assert pipe.cost.total_s >= plain.cost.total_s * 0.99, (pipe.cost, plain.cost)
    # nor cost many times more: the stage lays each gradient out like its parameter (not
    # sliced, which the stage alone finds a hair cheaper, leaving the update to gather
    # every gradient over the slow data axis)
    assert pipe.cost.total_s <= 2 * plain.cost.total_s, (pipe.cost, plain.cost)


def test_plan_traced_reads_pinned_inputs_in_their_layout():
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from autoshard.intra.planner import plan_traced
    from autoshard.ir.specs import from_partition_spec, to_partition_spec
    from autoshard.ir.trace import trace

    assert from_partition_spec(P(None, ("d", "m")), 3, ("d", "m")) == ((), (0, 1), ())
    assert to_partition_spec(from_partition_spec(P("m", "d"), 2, ("d", "m")), ("d", "m")) == \
        P("m", "d")
    with pytest.raises(ValueError, match="names mesh axis 'x'"):
        from_partition_spec(P("x"), 1, ("d", "m"))
    x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    traced = trace(lambda a, b: (a @ b.T) * 2.0, (x, x))
    kw = dict(mesh_shape=(2, 4), axis_names=("d", "m"),
              cluster=autoshard.cluster_preset("host-cpu"), method=autoshard.ShardParallel(),
              batch_flat=[False, False])
    plan = plan_traced(traced, in_layouts={0: P(None, "m"), 1: P("d")}, **kw)
    assert plan.flat_in_specs == (P(None, "m"), P("d"))
    with pytest.raises(ValueError, match="cannot hold"):
        plan_traced(traced, in_layouts={0: P(None, ("d", "m"))}, **{**kw, "mesh_shape": (4, 16)})


def test_carried_pairs_are_priced_at_their_weight():
    # y = x.T is an output carried into input x's layout, x pinned to rows split over the 8
    # devices. The transpose makes y column-split for free; making it row-split again is an
    # all-to-all, paid either inside the program (full price) or on the carry. At weight
    # 1/4 (a stage run 4 times per step, the carry once) the carry is the cheaper place,
    # at a quarter of the cost model's price.
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from autoshard.cost_model import MeshCostModel
    from autoshard.intra.planner import plan_traced
    from autoshard.ir.trace import trace

    x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    traced = trace(lambda x: [[x.T]], (x,))   # nested: no key path mirrors the input
    cluster = autoshard.cluster_preset("host-cpu")
    plan = plan_traced(traced, mesh_shape=(8,), axis_names=("d",), cluster=cluster,
                       method=autoshard.ShardParallel(), batch_flat=[False],
                       in_layouts={0: P("d")}, carried=[(0, 0)], carried_weight=0.25)
    assert plan.flat_out_specs == (P(None, "d"),)
    price = MeshCostModel(cluster, (8,)).resharding((256, 256), 4, ((), (0,)), ((0,), ()))
    assert price > 0 and plan.cost.resharding_s == pytest.approx(price / 4)
