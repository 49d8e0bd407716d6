"""``autoshard.calibrate_kernels``: which kernels it times, that plans follow the times,
and its errors."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.cost_model import Cluster, MeshCostModel, cluster_preset
from autoshard.intra.graph import build_graph
from autoshard.ir.trace import trace

MESH = autoshard.make_mesh((8,), ("x",))


def _conv(w, x):
    return jnp.tanh(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))


def _grouped_conv(w, x):   # two groups of 8 input channels: a split changes its parameters
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _dot(w, x):
    return jnp.tanh(x @ w)


CONV_ARGS = (jnp.ones((3, 3, 16, 16)), jnp.ones((8, 8, 8, 16)))
#: host-cpu at 10 MFLOP/s: every kernel here has a roofline far above a call's overhead,
#: so all are timed (at 100 GFLOP/s they are shorter than it, and none is: see below)
SLOW = dataclasses.replace(cluster_preset("host-cpu"), flops={"float32": 1e7})


def _operands(key: str) -> tuple[str, ...]:
    """A kernel key's per-device operands: ``"float32[1,8,8,16]"`` and so on."""
    return tuple(key.split(" ")[-2:])


@pytest.fixture(scope="module")
def conv_cluster():
    return autoshard.calibrate_kernels(_conv, CONV_ARGS, mesh=MESH, cluster=SLOW, budget_s=30)


def test_every_split_of_a_convolution_is_timed_once(conv_cluster):
    # x [8, 8, 8, 16] * w [3, 3, 16, 16] over 8 devices: whole, the batch (8/8), the output
    # channels (16/8) or the input channels (16/8, summed after) split: four shapes
    assert sorted(_operands(k) for k, _ in conv_cluster.kernel_seconds) == sorted([
        ("float32[8,8,8,16]", "float32[3,3,16,16]"), ("float32[1,8,8,16]", "float32[3,3,16,16]"),
        ("float32[8,8,8,16]", "float32[3,3,16,2]"), ("float32[8,8,8,2]", "float32[3,3,2,16]")])
    assert all(k.startswith("conv_general_dilated(") for k, _ in conv_cluster.kernel_seconds)
    assert all(0 < s < 1 for _, s in conv_cluster.kernel_seconds)
    # the base cluster's other figures are kept; the times round-trip through JSON
    assert dataclasses.replace(conv_cluster, kernel_seconds=()) == SLOW
    assert Cluster.from_json(conv_cluster.to_json()) == conv_cluster
    assert "kernel_seconds=<4 kernels>" in repr(conv_cluster)


def test_grouped_convolutions_and_dots_are_not_timed():
    grouped = (jnp.ones((3, 3, 8, 16)), CONV_ARGS[1])
    assert autoshard.calibrate_kernels(_grouped_conv, grouped, mesh=MESH, cluster=SLOW,
                                       budget_s=30).kernel_seconds == ()
    dot = (jnp.ones((32, 48)), jnp.ones((64, 32)))
    assert autoshard.calibrate_kernels(_dot, dot, mesh=MESH, cluster=SLOW,
                                       budget_s=30).kernel_seconds == ()


def test_times_already_known_are_kept_and_a_spent_budget_times_nothing(conv_cluster):
    again = autoshard.calibrate_kernels(_conv, CONV_ARGS, mesh=MESH, cluster=conv_cluster,
                                        budget_s=30)
    assert again == conv_cluster   # nothing left to time: every kernel was known
    assert autoshard.calibrate_kernels(_conv, CONV_ARGS, mesh=MESH, cluster=SLOW,
                                       budget_s=1e-9).kernel_seconds == ()


def test_kernels_shorter_than_a_calls_overhead_keep_the_roofline():
    # at host-cpu's 100 GFLOP/s the convolution's roofline is 24 µs whole and 3 µs split,
    # below what dispatching a call to 8 devices costs: timing it would measure noise
    assert autoshard.calibrate_kernels(_conv, CONV_ARGS, mesh=MESH, budget_s=30,
                                       cluster=cluster_preset("host-cpu")).kernel_seconds == ()


@pytest.mark.parametrize("cheap, spec_of", [
    # only the batch split runs fast: the plan splits x's batch and leaves w whole
    (("float32[1,8,8,16]", "float32[3,3,16,16]"), {"x": P("x"), "w": P()}),
    # only the output channels split runs fast: w's output channels over the devices
    (("float32[8,8,8,16]", "float32[3,3,16,2]"), {"x": P(), "w": P(None, None, None, "x")}),
])
def test_plans_follow_the_measured_kernels(conv_cluster, cheap, spec_of):
    # every kernel of the convolution 1 s except one 1 µs: the roofline's choice is overruled
    times = {k: 1e-6 if _operands(k) == cheap else 1.0 for k, _ in conv_cluster.kernel_seconds}
    cluster = dataclasses.replace(conv_cluster, kernel_seconds=times)
    f = autoshard.parallelize(_conv, mesh=MESH, cluster=cluster)
    plan = f.plan(*CONV_ARGS)
    assert dict(zip(("w", "x"), plan.in_specs)) == spec_of
    assert plan.cost.compute_s < 0.5
    w = jax.random.normal(jax.random.key(0), CONV_ARGS[0].shape)
    x = jax.random.normal(jax.random.key(1), CONV_ARGS[1].shape)
    np.testing.assert_allclose(f(w, x), jax.jit(_conv)(w, x), rtol=1e-5, atol=1e-5)


def _conv_strategies(args, cluster):
    traced = trace(_conv, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args])
    (node,) = [n for n in build_graph(traced, MeshCostModel(cluster, (8,))).nodes
               if n.name.startswith("conv_general_dilated")]
    return {s.in_specs: s.compute_s for s in node.strategies}


def test_a_kernel_without_a_time_keeps_the_roofline(conv_cluster):
    measured = _conv_strategies(CONV_ARGS, conv_cluster)
    assert set(measured.values()) <= set(dict(conv_cluster.kernel_seconds).values())
    assert measured != _conv_strategies(CONV_ARGS, SLOW)
    # a convolution of another batch has no entry: priced by the roofline, as without times
    other = (CONV_ARGS[0], jnp.ones((16, 8, 8, 16)))
    assert _conv_strategies(other, conv_cluster) == _conv_strategies(other, SLOW)


def test_bad_calls_say_what_to_do():
    with pytest.raises(TypeError, match="mesh of real devices"):
        autoshard.calibrate_kernels(_conv, CONV_ARGS, mesh=autoshard.abstract_mesh((8,), ("x",)))
    with pytest.raises(ValueError, match="budget_s must be positive"):
        autoshard.calibrate_kernels(_conv, CONV_ARGS, mesh=MESH, budget_s=0)


def test_cluster_kernel_seconds_are_checked():
    base = cluster_preset("host-cpu")
    with pytest.raises(ValueError, match="kernel_seconds keys must be non-empty strings"):
        dataclasses.replace(base, kernel_seconds={"": 1.0})
    with pytest.raises(ValueError, match=r"kernel_seconds\['k'\] must be a finite positive"):
        dataclasses.replace(base, kernel_seconds={"k": -1.0})


def test_a_flax_cnn_training_step_with_timed_convolutions_matches_jit():
    # as users write it: a linen model, optax, a loss closing over the batch, a keyword
    # Python scalar, the parameters and optimizer state donated
    import flax.linen as nn
    import optax

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (3, 3))(x))
            x = nn.relu(nn.Conv(16, (3, 3))(x))   # the same kernel shapes as the first's
            return nn.Dense(4)(x.mean(axis=(1, 2)))

    model, opt = CNN(), optax.sgd(0.1)

    def step(params, opt_state, batch, *, scale):
        def loss_fn(p):
            return scale * optax.softmax_cross_entropy_with_integer_labels(
                model.apply(p, batch["x"]), batch["y"]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = {"x": jax.random.normal(jax.random.key(0), (8, 8, 8, 16)),
             "y": jnp.arange(8) % 4}
    params = model.init(jax.random.key(1), batch["x"])
    args = (params, opt.init(params), batch)
    cluster = autoshard.calibrate_kernels(step, args, {"scale": 2.0}, mesh=MESH, cluster=SLOW,
                                          budget_s=60)
    keys = [k for k, _ in cluster.kernel_seconds]
    assert keys and len(keys) == len(set(keys)) and all(
        k.startswith("conv_general_dilated(") for k in keys)
    expected = jax.jit(step, static_argnames="scale")(*args, scale=2.0)
    f = autoshard.parallelize(step, mesh=MESH, cluster=cluster, donate_argnums=(0, 1))
    got = f(*jax.tree.map(jnp.copy, args), scale=2.0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
