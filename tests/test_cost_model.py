"""Tests for autoshard.cost_model (numpy only, no devices)."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from autoshard.cost_model import (
    CLUSTER_PRESETS,
    Cluster,
    Link,
    MeshCostModel,
    cluster_preset,
    default_cluster_for_platform,
    format_bytes,
    parse_bytes,
)
from autoshard.ir import hlo
from autoshard.ir.specs import enumerate_specs

GiB = 1024**3


def _uniform_cluster(bandwidth: float = 1e9, latency: float = 1e-6) -> Cluster:
    link = Link(bandwidth=bandwidth, latency=latency)
    return Cluster(
        name="test",
        flops=(("float32", 1e12), ("bfloat16", 4e12)),
        memory_bandwidth=1e11,
        device_memory=GiB,
        devices_per_node=1024,
        intra_node=link,
        inter_node=link,
    )


@pytest.fixture
def model24() -> MeshCostModel:
    return MeshCostModel(_uniform_cluster(), (2, 4))


# ---------------------------------------------------------------- collectives

@pytest.mark.parametrize(
    "method, nbytes, axes, expected",
    [
        # n = 4, α = 1e-6, β = 1e9; one extra α per collective is its launch overhead
        ("all_reduce", 4e6, (1,), (2 * 3 + 1) * 1e-6 + 2 * 3 / 4 * 4e6 / 1e9),
        ("all_gather", 4e6, (1,), 4 * 1e-6 + 3 / 4 * 4e6 / 1e9),
        ("reduce_scatter", 4e6, (1,), 4 * 1e-6 + 3 / 4 * 4e6 / 1e9),
        ("all_to_all", 4e6, (1,), 4 * 1e-6 + 3 / 4 * 4e6 / 1e9),
        # n = 2
        ("all_reduce", 1e6, (0,), 3 * 1e-6 + 1e6 / 1e9),
        # n = 8 over both axes
        ("all_gather", 8e6, (0, 1), 8 * 1e-6 + 7 / 8 * 8e6 / 1e9),
    ],
)
def test_collective_formulas(model24, method, nbytes, expected, axes):
    assert getattr(model24, method)(nbytes, axes) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"])
def test_collective_group_size_one_is_free(method):
    model = MeshCostModel(_uniform_cluster(), (1, 4))
    assert getattr(model, method)(1e9, ()) == 0.0
    assert getattr(model, method)(1e9, (0,)) == 0.0
    assert getattr(model, method)(1e9, (1,)) > 0.0


def test_reduce_scatter_then_all_gather_costs_more_than_all_reduce(model24):
    # Same bytes moved; the pair pays one more launch than the single all-reduce.
    pair = model24.reduce_scatter(4e6, (1,)) + model24.all_gather(4e6, (1,))
    assert pair > model24.all_reduce(4e6, (1,))


def test_reduce_scatter_lowered_to_all_reduce_prices_as_all_reduce(model24):
    lowered = MeshCostModel(dataclasses.replace(model24.cluster, reduce_scatter_as_all_reduce=True),
                            (2, 4))
    assert lowered.reduce_scatter(4e6, (1,)) == model24.all_reduce(4e6, (1,))
    assert lowered.reduce_scatter(4e6, ()) == 0.0
    # host-cpu: XLA's CPU compiler keeps the partitioner's all-reduce + dynamic-slice
    host = MeshCostModel(cluster_preset("host-cpu"), (8,))
    assert cluster_preset("host-cpu").reduce_scatter_as_all_reduce
    assert host.reduce_scatter(1e6, (0,)) == host.all_reduce(1e6, (0,))
    assert not cluster_preset("h100-80gb").reduce_scatter_as_all_reduce


def test_multi_axis_collective_uses_bottleneck_link():
    model = MeshCostModel(cluster_preset("a100-80gb"), (2, 8))
    inter, intra = model.links
    assert inter.bandwidth < intra.bandwidth
    expected = 16 * max(inter.latency, intra.latency) + 15 / 16 * 1e9 / inter.bandwidth
    assert model.all_gather(1e9, (0, 1)) == pytest.approx(expected)
    assert model.all_gather(1e9, (1,)) < model.all_gather(1e9, (0, 1))


@pytest.mark.parametrize("axes", [(2,), (-1,), (0, 0)])
def test_collective_rejects_bad_axes(model24, axes):
    with pytest.raises(ValueError):
        model24.all_reduce(1.0, axes)


def test_compute_is_arithmetic_plus_traffic(model24):
    assert model24.compute(2e12, 0, "float32") == pytest.approx(2.0)
    assert model24.compute(2e12, 0, "bfloat16") == pytest.approx(0.5)
    assert model24.compute(0, 1e11, "float32") == pytest.approx(1.0)
    assert model24.compute(2e12, 1e11, "bfloat16") == pytest.approx(1.5)


# ---------------------------------------------------------------- cluster

@pytest.mark.parametrize(
    "mesh_shape, expected",
    [
        ((2, 8), ("inter", "intra")),
        ((4, 2), ("intra", "intra")),
        ((8,), ("intra",)),
        ((16,), ("inter",)),
        ((2, 2, 4), ("inter", "intra", "intra")),
    ],
)
def test_links_for_mesh_a100(mesh_shape, expected):
    cluster = cluster_preset("a100-80gb")
    names = {cluster.intra_node: "intra", cluster.inter_node: "inter"}
    assert tuple(names[link] for link in cluster.links_for_mesh(mesh_shape)) == expected


def test_axis_links_override_only_matching_rank():
    measured = (Link(1e9, 1e-6), Link(2e9, 2e-6))
    cluster = dataclasses.replace(cluster_preset("a100-80gb"), axis_links=measured)
    assert cluster.links_for_mesh((2, 8)) == measured
    assert cluster.links_for_mesh((16,)) == (cluster.inter_node,)


@pytest.mark.parametrize(
    "dtype, expected",
    [("bfloat16", 312e12), ("float16", 312e12), ("float32", 156e12), ("int32", 156e12),
     ("bool", 156e12), ("float8_e4m3fn", 156e12), (np.dtype("float32"), 156e12)],
)
def test_flops_rate_fallback(dtype, expected):
    assert cluster_preset("a100-80gb").flops_rate(dtype) == expected


@pytest.mark.parametrize("name", CLUSTER_PRESETS)
def test_cluster_json_round_trip(name):
    cluster = cluster_preset(name)
    assert Cluster.from_json(cluster.to_json()) == cluster
    calibrated = dataclasses.replace(cluster, axis_links=(Link(1.5e9, 3e-6), Link(2.5e10, 1e-5)))
    assert Cluster.from_json(calibrated.to_json()) == calibrated
    assert hash(Cluster.from_json(calibrated.to_json())) == hash(calibrated)
    for flag in ("reduce_scatter_as_all_reduce", "all_to_all_as_slices", "threefry_in_loops",
                 "select_and_scatter_expanded", "batch_groups_dense",
                 "low_precision_dots_in_f32"):
        flipped = dataclasses.replace(cluster, **{flag: not getattr(cluster, flag)})
        assert Cluster.from_json(flipped.to_json()) == flipped
        # only written when set, so files for GPU clusters read by older versions are unchanged
        assert (flag in json.loads(cluster.to_json())) == getattr(cluster, flag)


def _mutated_json(**changes) -> str:
    data = json.loads(cluster_preset("h100-80gb").to_json())
    for key, value in changes.items():
        if value is _DELETE:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


_DELETE = object()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be an object"),
        (_mutated_json(name=_DELETE), "'name'"),
        (_mutated_json(intra_node=_DELETE), "'intra_node'"),
        (_mutated_json(flops={"bfloat16": 1e12}), "float32"),
        (_mutated_json(flops="fast"), "'flops'"),
        (_mutated_json(memory_bandwidth="3TB/s"), "'memory_bandwidth'"),
        (_mutated_json(device_memory=1.5), "'device_memory'"),
        (_mutated_json(inter_node={"bandwidth": 1e9}), "'inter_node'"),
        (_mutated_json(inter_node={"bandwidth": -1.0, "latency": 0.0}), "bandwidth"),
        (_mutated_json(axis_links=5), "'axis_links'"),
        (_mutated_json(reduce_scatter_as_all_reduce="yes"), "reduce_scatter_as_all_reduce"),
        (_mutated_json(all_to_all_as_slices=1), "all_to_all_as_slices"),
        (_mutated_json(colour="blue"), "colour"),
    ],
)
def test_cluster_from_json_errors(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        Cluster.from_json(text)


def test_cluster_preset_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="a100-80gb"):
        cluster_preset("tpu-v9")


@pytest.mark.parametrize(
    "platform, kind, expected",
    [
        ("cpu", "cpu", "host-cpu"),
        ("gpu", "NVIDIA H100 80GB HBM3", "h100-80gb"),
        ("cuda", "NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("tpu", "TPU v4", "host-cpu"),
    ],
)
def test_default_cluster_for_platform(platform, kind, expected):
    assert default_cluster_for_platform(platform, kind).name == expected


def test_default_cluster_for_unknown_gpu_is_informative():
    cluster = default_cluster_for_platform("gpu", "NVIDIA L4")
    assert "NVIDIA L4" in cluster.name and "h100" in cluster.name
    assert cluster.flops == cluster_preset("h100-80gb").flops


# ---------------------------------------------------------------- memory / specs

@pytest.mark.parametrize(
    "shape, spec, expected_shape",
    [
        ((16, 8), ((), ()), (16, 8)),
        ((16, 8), ((0,), ()), (8, 8)),
        ((16, 8), ((0, 1), ()), (2, 8)),
        ((16, 8), ((), (1,)), (16, 2)),
        ((16, 8), ((1,), (0,)), (4, 4)),
        ((10, 3), ((1,), (0,)), (3, 2)),  # ceil division
        ((), (), ()),
    ],
)
def test_shard_shape_and_bytes(model24, shape, spec, expected_shape):
    assert model24.shard_shape(shape, spec) == expected_shape
    assert model24.bytes_per_device(shape, 2, spec) == 2 * math.prod(expected_shape)


@pytest.mark.parametrize(
    "shape, spec, valid",
    [
        ((16, 8), ((), ()), True),
        ((16, 8), ((0, 1), ()), True),
        ((16, 8), ((0,), (1,)), True),
        ((16, 8), ((0,),), False),  # wrong rank
        ((16, 8), ((0,), (0,)), False),  # axis twice
        ((16, 8), ((0, 0), ()), False),
        ((16, 8), ((2,), ()), False),  # no such mesh axis
        ((6, 8), ((1,), ()), False),  # 6 not divisible by 4
        ((6, 8), ((0,), ()), True),
    ],
)
def test_is_valid_spec(model24, shape, spec, valid):
    assert model24.is_valid_spec(shape, spec) is valid


# ---------------------------------------------------------------- resharding

SHAPE = (64, 32)
ITEMSIZE = 4
FULL = 64 * 32 * 4
SPECS_24 = [
    ((), ()), ((0,), ()), ((1,), ()), ((0, 1), ()), ((1, 0), ()),
    ((), (0,)), ((), (1,)), ((0,), (1,)), ((1,), (0,)), ((), (0, 1)),
]


def _traffic_s(model, nbytes):
    return nbytes / model.cluster.memory_bandwidth


@pytest.mark.parametrize("spec", SPECS_24)
def test_resharding_identity_is_free_and_from_replicated_only_slices(model24, spec):
    assert model24.resharding(SHAPE, ITEMSIZE, spec, spec) == 0.0
    assert model24.resharding_steps(SHAPE, ITEMSIZE, ((), ()), spec) == ()
    # a local slice reads and writes the part each device keeps
    kept = model24.bytes_per_device(SHAPE, ITEMSIZE, spec)
    traffic = 0 if spec == ((), ()) else 2 * kept
    assert model24.resharding_traffic(SHAPE, ITEMSIZE, ((), ()), spec) == traffic
    assert model24.resharding(SHAPE, ITEMSIZE, ((), ()), spec) == \
        pytest.approx(_traffic_s(model24, traffic))


@pytest.mark.parametrize(
    "src, dst",
    [(((0,), ()), ((0, 1), ())), (((0,), ()), ((0,), (1,))), (((), (1,)), ((0,), (1,)))],
)
def test_resharding_refinement_communicates_nothing(model24, src, dst):
    assert model24.resharding_steps(SHAPE, ITEMSIZE, src, dst) == ()
    assert model24.resharding_steps(SHAPE, ITEMSIZE, dst, src) != ()
    assert model24.resharding(SHAPE, ITEMSIZE, dst, src) > model24.resharding(SHAPE, ITEMSIZE,
                                                                              src, dst) > 0


@pytest.mark.parametrize("spec, axis, inner", [(((0,), ()), 0, False), (((), (1,)), 1, True)])
def test_resharding_to_replicated_is_all_gather(model24, spec, axis, inner):
    (step,) = model24.resharding_steps(SHAPE, ITEMSIZE, spec, ((), ()))
    assert (step.kind, step.axes, step.nbytes) == ("all-gather", (axis,), FULL)
    # operand and result; an inner dim gathered is relayouted (read and written again)
    n = model24.mesh_shape[axis]
    traffic = FULL // n + FULL + (2 * FULL if inner else 0)
    assert model24.resharding_traffic(SHAPE, ITEMSIZE, spec, ((), ())) == traffic
    assert model24.resharding(SHAPE, ITEMSIZE, spec, ((), ())) == pytest.approx(
        model24.all_gather(FULL, (axis,)) + _traffic_s(model24, traffic))


def test_resharding_dim_swap_is_all_to_all(model24):
    (step,) = model24.resharding_steps(SHAPE, ITEMSIZE, ((1,), ()), ((), (1,)))
    assert (step.kind, step.axes, step.nbytes) == ("all-to-all", (1,), FULL // 4)
    cost = model24.resharding(SHAPE, ITEMSIZE, ((1,), ()), ((), (1,)))
    # operand, result, and a local transpose on each side
    assert cost == pytest.approx(model24.all_to_all(FULL / 4, (1,))
                                 + _traffic_s(model24, 4 * FULL / 4))
    assert 0 < cost < model24.resharding(SHAPE, ITEMSIZE, ((1,), ()), ((), ()))


@pytest.mark.parametrize("mesh_shape, axis", [((8,), 0), ((2, 4), 0), ((2, 4), 1)])
def test_all_to_all_sent_as_slices_reads_the_shard_once_per_peer(mesh_shape, axis):
    # host-cpu: XLA's CPU pipeline slices the operand once per peer, each slice counted
    # as reading the whole shard: n - 1 reads more than the 4 shards of a GPU all-to-all
    src = tuple((axis,) if d == 0 else () for d in range(4))
    dst = tuple((axis,) if d == 3 else () for d in range(4))
    shape, shard = (8, 16, 16, 64), 8 * 16 * 16 * 64 * 4 // mesh_shape[axis]
    host = MeshCostModel(cluster_preset("host-cpu"), mesh_shape)
    gpu = MeshCostModel(cluster_preset("h100-80gb"), mesh_shape)
    assert not gpu.cluster.all_to_all_as_slices
    assert [s.kind for s in host.resharding_steps(shape, 4, src, dst)] == ["all-to-all"]
    assert gpu.resharding_traffic(shape, 4, src, dst) == 4 * shard
    assert host.resharding_traffic(shape, 4, src, dst) == (4 + mesh_shape[axis] - 1) * shard


def test_resharding_matrix_matches_elementwise(model24):
    matrix = model24.resharding_matrix(SHAPE, ITEMSIZE, SPECS_24, SPECS_24)
    assert matrix.dtype == np.float64 and matrix.shape == (len(SPECS_24), len(SPECS_24))
    expected = [[model24.resharding(SHAPE, ITEMSIZE, s, d) for d in SPECS_24] for s in SPECS_24]
    np.testing.assert_array_equal(matrix, expected)
    np.testing.assert_array_equal(np.diag(matrix), 0.0)
    assert (matrix[~np.eye(len(SPECS_24), dtype=bool)] > 0).all()  # any change copies
    # Communication only where dst does not refine src.
    for src in SPECS_24:
        for dst in SPECS_24:
            refines = all(dst[d][: len(src[d])] == src[d] for d in range(2))
            steps = model24.resharding_steps(SHAPE, ITEMSIZE, src, dst)
            assert (steps == ()) == refines, (src, dst)


@pytest.mark.parametrize("mesh_shape", [(2, 4), (2, 2, 2)])
def test_collective_matrix_is_where_resharding_runs_a_collective(mesh_shape):
    model = MeshCostModel(cluster_preset("host-cpu"), mesh_shape)
    specs = enumerate_specs(SHAPE, mesh_shape)
    matrix = model.collective_matrix(SHAPE, specs, specs)
    assert matrix.dtype == bool and matrix.shape == (len(specs), len(specs))
    expected = [[bool(model.resharding_steps(SHAPE, ITEMSIZE, s, d)) for d in specs]
                for s in specs]
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.any() and not matrix.all()  # slices and collectives both occur
    matrix[:] = True  # a copy: the memoised matrix stays as it was
    np.testing.assert_array_equal(model.collective_matrix(SHAPE, specs, specs), expected)


def test_resharding_matrix_returns_independent_copies(model24):
    first = model24.resharding_matrix(SHAPE, ITEMSIZE, SPECS_24[:3], SPECS_24[:2])
    first[:] = -1.0
    second = model24.resharding_matrix(SHAPE, ITEMSIZE, SPECS_24[:3], SPECS_24[:2])
    assert (second >= 0).all() and second.shape == (3, 2)
    assert model24.resharding_matrix(SHAPE, ITEMSIZE, [], SPECS_24).shape == (0, len(SPECS_24))


def test_resharding_rejects_bad_spec(model24):
    with pytest.raises(ValueError):
        model24.resharding(SHAPE, ITEMSIZE, ((0,),), ((), ()))


# ---------------------------------------------------------------- units

@pytest.mark.parametrize(
    "given, expected",
    [
        (123, 123), ("123", 123), ("16GiB", 16 * GiB), ("16gib", 16 * GiB), ("500MB", 500_000_000),
        ("1.5 GB", 1_500_000_000), ("64KiB", 65536), ("2 kb", 2000), ("0", 0), ("7B", 7),
        ("1TiB", 1024**4), (np.int64(5), 5),
    ],
)
def test_parse_bytes_good(given, expected):
    assert parse_bytes(given) == expected


@pytest.mark.parametrize("given", [-1, "", "   ", "-5GB", "12 parsecs", "GB", True, None, "1.2.3MB"])
def test_parse_bytes_bad(given):
    with pytest.raises(ValueError, match="e.g."):
        parse_bytes(given)


@pytest.mark.parametrize(
    "n, text", [(512, "512 B"), (0, "0 B"), (1536 * 1024**2, "1.50 GiB"), (2048, "2.00 KiB"), (3 * 1024**4, "3.00 TiB")]
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("src, dst, kinds", [
    # XLA moves every axis of one dim to one other dim in one all-to-all over them...
    (((), (), (0, 1)), ((0, 1), (), ()), [("all-to-all", (0, 1))]),
    (((), (), (1,)), ((1,), (), ()), [("all-to-all", (1,))]),
    # ...but when one dim's axes go to two dims, it gathers them and slices ("involuntary
    # full rematerialization"; seen in jax 0.10.2 on a 2x4 mesh); two dims' axes into one
    # are gathered one dim at a time, the last dim first
    (((), (), (0, 1)), ((1,), (0,), ()), [("all-gather", (0, 1))]),
    (((), (), (0, 1)), ((0,), (1,), ()), [("all-gather", (0, 1))]),
    (((0,), (1,), ()), ((), (), (0, 1)), [("all-gather", (1,)), ("all-gather", (0,))]),
    (((1,), (0,), ()), ((), (), (0, 1)), [("all-gather", (0,)), ("all-gather", (1,))]),
])
def test_resharding_moves_axes_as_xla_can(src, dst, kinds):
    model = MeshCostModel(_uniform_cluster(), (2, 4))
    shape = (16, 128, 128)
    steps = model.resharding_steps(shape, 4, src, dst)
    assert [(s.kind, s.axes) for s in steps] == kinds
    gathered = [s for s in steps if s.kind == "all-gather"]
    assert not gathered or gathered[-1].nbytes == 16 * 128 * 128 * 4   # the whole tensor
    waypoints = model.resharding_waypoints(shape, src, dst)
    assert [(s.kind, s.axes, s.nbytes) for s in steps] == \
        _compiled_collectives((2, 4), shape, [src, *waypoints, dst])


_EXCHANGES = [
    (((0,), (1,), ()), ((1,), (0,), ())),     # a swap of unequal axes
    (((0,), (1,), ()), ((1, 0), (), ())),     # two split dims' axes into one of them
    (((0,), (1,), ()), ((), (0, 1), ())),
    (((0, 1), (), ()), ((1,), (0,), ())),     # one dim's axes into it and another
    (((), (0, 1), ()), ((1, 0), (), ())),     # one dim's axes to another, reversed
]


@pytest.mark.parametrize("mesh_shape, src, dst, kinds", [
    *[(m, s, d, ["all-to-all", "collective-permute"]) for m in ((2, 4), (4, 2)) for s, d in _EXCHANGES],
    # dst splits every dim into a multiple of src's parts, not behind src's axes: each
    # device's block is part of one other device's, sliced and sent in one permute
    ((2, 4), ((), (0,), ()), ((0,), (1,), ()), ["collective-permute"]),
    ((2, 4), ((0,), (), ()), ((1, 0), (), ()), ["collective-permute"]),
    ((4, 2), ((1,), (), ()), ((0, 1), (), ()), ["collective-permute"]),
    ((2, 4), ((), (), (0,)), ((0,), (), (1,)), ["collective-permute"]),
    # an axis leaves its dim from in front of one that stays: an all-to-all, then the
    # blocks reordered
    ((4, 2), ((), (0,), ()), ((0,), (1,), ()), ["all-to-all", "collective-permute"]),
])
def test_reshardings_priced_as_xla_compiles_them(mesh_shape, src, dst, kinds):
    # every axis stays in use, only the dims they split change: XLA runs one all-to-all
    # and one collective-permute of the shard (not a gather of the whole tensor, nor an
    # all-to-all per axis); the model prices those, with their bytes
    names = ("a", "b")
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(AxisType.Auto,) * 2)
    spec = lambda s: PartitionSpec(*(tuple(names[a] for a in axes) or None for axes in s))  # noqa: E731
    shape = (16, 128, 128)
    f = jax.jit(lambda x: x * 2, in_shardings=NamedSharding(mesh, spec(src)),
                out_shardings=NamedSharding(mesh, spec(dst)))
    text = f.lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile().as_text()
    compiled = [(c.kind, c.result_bytes) for c in hlo.parse_collectives(text)]
    model = MeshCostModel(_uniform_cluster(), mesh_shape)
    steps = model.resharding_steps(shape, 4, src, dst)
    assert [(s.kind, s.nbytes) for s in steps] == compiled
    assert [s.kind for s in steps] == kinds
    # (which axes XLA's all-to-all runs over depends on the axes' sizes; the model names
    # the axes that change dim)
    assert steps[-1].axes == (0, 1)
    whole = model.resharding(shape, 4, src, ((),) * 3)
    assert model.resharding(shape, 4, src, dst) < whole


@pytest.mark.parametrize("src, dst, kinds", [
    # one dim's axes into it and another: the all-to-all runs over the axis that stays
    (((), (0, 1), ()), ((0,), (1,), ()), [("all-to-all", (1,)), ("collective-permute", (0, 1))]),
    (((1, 0), (), ()), ((0,), (1,), ()), [("all-to-all", (0,)), ("collective-permute", (0, 1))]),
    # two dims' axes into one: over the axis that leaves its dim
    (((0,), (1,), ()), ((), (0, 1), ()), [("all-to-all", (0,)), ("collective-permute", (0, 1))]),
    # a rotation over three dims: one all-to-all, then the (equal) axes swapped
    (((0,), (1,), ()), ((), (0,), (1,)), [("all-to-all", (0,)), ("collective-permute", (0, 1))]),
    (((0,), (1,), ()), ((1,), (), (0,)), [("all-to-all", (1,)), ("collective-permute", (0, 1))]),
    # axes reversed into another dim: one all-to-all over both, named in mesh order
    (((1, 0), (), ()), ((), (1, 0), ()), [("all-to-all", (0, 1))]),
])
def test_exchanges_on_equal_axes_run_the_all_to_all_priced(src, dst, kinds):
    # which devices XLA's all-to-all groups (and so its mesh axes, which price it over
    # their links) follows from the parts each dim is split into (2x2: whole axes)
    shape = (16, 32, 32)
    compiled = _compiled_collectives((2, 2), shape, [src, dst])
    steps = MeshCostModel(_uniform_cluster(), (2, 2)).resharding_steps(shape, 4, src, dst)
    assert [(s.kind, s.axes, s.nbytes) for s in steps] == compiled
    assert [(s.kind, s.axes) for s in steps] == kinds


@pytest.mark.parametrize("mesh_shape, src, dst", [
    ((2, 4), ((0, 1), (), ()), ((1, 0), (), ())),          # two axes reordered in one dim
    ((2, 2, 2), ((0,), (1,), ()), ((1,), (0,), ())),       # a swap of equal axes
    ((2, 2, 2), ((0,), (1,), (2,)), ((2,), (0,), (1,))),   # a rotation of all three
    ((4, 2), ((0, 1), (), ()), ((1, 0), (), ())),
])
def test_resharding_that_moves_whole_blocks_is_one_collective_permute(mesh_shape, src, dst):
    # every device's block goes whole to another device: XLA compiles one
    # collective-permute over the moved axes, and the model prices exactly that
    names = ("a", "b", "c")[:len(mesh_shape)]
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(AxisType.Auto,) * len(mesh_shape))
    spec = lambda s: PartitionSpec(*(tuple(names[a] for a in axes) or None for axes in s))  # noqa: E731
    shape = (64, 64, 8)
    f = jax.jit(lambda x: x * 2, in_shardings=NamedSharding(mesh, spec(src)),
                out_shardings=NamedSharding(mesh, spec(dst)))
    text = f.lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile().as_text()
    compiled = [(c.kind, c.axes(mesh_shape), c.result_bytes) for c in hlo.parse_collectives(text)]
    model = MeshCostModel(_uniform_cluster(), mesh_shape)
    steps = model.resharding_steps(shape, 4, src, dst)
    assert [(s.kind, s.axes, s.nbytes) for s in steps] == compiled
    assert model.resharding_traffic(shape, 4, src, dst) == 2 * steps[0].nbytes
    assert model.resharding(shape, 4, src, dst) < model.resharding(shape, 4, src, ((),) * 3)


def _compiled_collectives(mesh_shape, shape, layouts) -> list:
    """(kind, mesh axes, result bytes) of the collectives XLA compiles for a value placed
    in ``layouts[0]`` and pinned to each later layout in turn."""
    names = ("a", "b", "c")[:len(mesh_shape)]
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(AxisType.Auto,) * len(mesh_shape))
    spec = lambda s: PartitionSpec(*(tuple(names[a] for a in axes) or None for axes in s))  # noqa: E731

    def pinned(x):
        for layout in layouts[1:]:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(layout)))
        return x * 2
    f = jax.jit(pinned, in_shardings=NamedSharding(mesh, spec(layouts[0])),
                out_shardings=NamedSharding(mesh, spec(layouts[-1])))
    text = f.lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile().as_text()
    return [(c.kind, c.axes(mesh_shape), c.result_bytes) for c in hlo.parse_collectives(text)]


def test_dropping_an_axis_in_front_of_a_kept_split_permutes_first():
    # [256, 256] split over ("b", "a") in dim 0, to split over "a" alone: gathering "b"
    # directly would collect blocks that are not contiguous; XLA permutes the [32, 256]
    # shard so "b" is the minor split, then all-gathers over "b" (measured on jax 0.10)
    src, dst, shape = ((1, 0), ()), ((0,), ()), (256, 256)
    model = MeshCostModel(_uniform_cluster(), (2, 4))
    steps = model.resharding_steps(shape, 4, src, dst)
    assert [(s.kind, s.axes, s.nbytes) for s in steps] == \
        _compiled_collectives((2, 4), shape, [src, dst])
    assert [s.kind for s in steps] == ["collective-permute", "all-gather"]
    assert steps[0].nbytes == 32 * 256 * 4


@pytest.mark.parametrize("mesh_shape, src, dst, kinds", [
    # every axis a dim drops is gathered in one all-gather over them all, in either order
    # (not one all-gather per axis, nor a permute between them)
    ((2, 4), ((0, 1), ()), ((), ()), [("all-gather", (0, 1))]),
    ((2, 4), ((1, 0), ()), ((), ()), [("all-gather", (0, 1))]),
    ((2, 2, 2), ((0, 1, 2), ()), ((0,), ()), [("all-gather", (1, 2))]),
    # dropped from in front of an axis that stays: one permute puts both behind it
    ((2, 2, 2), ((0, 1, 2), ()), ((2,), ()), [("collective-permute", (0, 1, 2)),
                                            ("all-gather", (0, 1))]),
    # one all-gather per dim, the dim of the last mesh axis first
    ((2, 4), ((0,), (1,)), ((), ()), [("all-gather", (1,)), ("all-gather", (0,))]),
], ids=["both axes", "both axes reversed", "two of three", "in front of one that stays",
        "two dims"])
def test_the_axes_a_dim_drops_are_gathered_at_once(mesh_shape, src, dst, kinds):
    # (measured on jax 0.10.2: XLA alone, and pinned to the route's waypoints, runs the
    # collectives priced, with their axes and bytes)
    shape = (256, 256)
    model = MeshCostModel(_uniform_cluster(), mesh_shape)
    steps = model.resharding_steps(shape, 4, src, dst)
    assert [(s.kind, s.axes) for s in steps] == kinds
    waypoints = model.resharding_waypoints(shape, src, dst)
    priced = [(s.kind, s.axes, s.nbytes) for s in steps]
    assert priced == _compiled_collectives(mesh_shape, shape, [src, *waypoints, dst])
    assert priced == _compiled_collectives(mesh_shape, shape, [src, dst])


@pytest.mark.parametrize("mesh_shape, src, dst", [
    # an all-to-all over "a" (dim 1 to 2), then an all-gather over "b" (XLA alone gathers
    # first, then moves four times the bytes)
    ((2, 4), ((1,), (0,), ()), ((), (), (0,))),
    # an all-to-all, then a permute that puts "b" behind "a", then an all-gather over "b"
    # (XLA alone: a permute and two all-gathers)
    ((2, 4), ((1,), (0,)), ((0,), ())),
    # a local slice over "c", then an all-to-all of the smaller shard
    ((2, 2, 2), ((0,), (), ()), ((), (0,), (2,))),
])
def test_waypoints_make_xla_run_the_priced_route(mesh_shape, src, dst):
    # pinning the value to each waypoint in turn compiles to exactly the collectives the
    # model prices for the resharding, in order and bytes
    shape = (16, 128, 256)[:len(src)] if len(src) == 3 else (256, 256)
    model = MeshCostModel(_uniform_cluster(), mesh_shape)
    waypoints = model.resharding_waypoints(shape, src, dst)
    assert waypoints and src not in waypoints and dst not in waypoints
    steps = model.resharding_steps(shape, 4, src, dst)
    assert [(s.kind, s.axes, s.nbytes) for s in steps] == \
        _compiled_collectives(mesh_shape, shape, [src, *waypoints, dst])


@pytest.mark.parametrize("src, dst, kinds", [
    # "data" leaves dim 2 by an all-to-all behind "fsdp" and "model", sliced into dim 0
    # first: a collective-permute over all three puts the batch blocks in dst's order
    (((), (), (0,)), ((0, 1, 2), (), ()), [("all-to-all", (0,)), ("collective-permute", (0, 1, 2))]),
    # "c" arrives behind "a" in front of "b": only "b" and "c" change stride, and the
    # permute runs over them
    (((0,), (), (2,)), ((0, 2, 1), (), ()), [("all-to-all", (2,)), ("collective-permute", (1, 2))]),
    (((), (), (2,)), ((), (2, 1, 0), ()), [("all-to-all", (2,)), ("collective-permute", (0, 1, 2))]),
])
def test_an_axis_that_arrives_behind_sliced_axes_is_put_in_order(src, dst, kinds):
    # pinned to the route's waypoints, XLA runs the priced collectives (kinds, axes, bytes)
    shape = (16, 32, 64)
    model = MeshCostModel(_uniform_cluster(), (2, 2, 2))
    steps = model.resharding_steps(shape, 4, src, dst)
    waypoints = model.resharding_waypoints(shape, src, dst)
    assert [(s.kind, s.axes, s.nbytes) for s in steps] == \
        _compiled_collectives((2, 2, 2), shape, [src, *waypoints, dst])
    assert [(s.kind, s.axes) for s in steps] == kinds


@pytest.mark.parametrize("src, dst, kinds", [
    # one collective-permute: each device takes its block from the holder of the src block
    # whose replica index is the block's position in it (over the axes src leaves unsplit),
    # so the permute runs over the axes where sender and receiver differ, not over every
    # axis of either layout
    (((), (), (0, 1)), ((), (), (0, 2, 1)), [("collective-permute", (1, 2))]),
    (((), (), (1,)), ((), (0,), (2, 1)), [("collective-permute", (1, 2))]),
    (((), (1,), (2,)), ((), (1,), (0,)), [("collective-permute", (0, 2))]),
    (((), (), (1, 0)), ((), (), (0, 1, 2)), [("collective-permute", (0, 1))]),
    # an exchange: the all-to-all over "c" leaves "c" behind dim 0's axes, and the permute
    # from there to dst runs over "a" and "c"
    (((), (), (0, 1, 2)), ((0,), (), (2, 1)), [("all-to-all", (2,)), ("collective-permute", (0, 2))]),
    # "b" leaves dim 2 from in front of "a": the all-to-all runs over "a" (the dim's minor
    # axis), then a permute over "a" and "b" orders the blocks
    (((2,), (), (1, 0)), ((2,), (1,), (0,)), [("all-to-all", (0,)), ("collective-permute", (0, 1))]),
    # two dims' axes into one: gathered one dim at a time, the last dim first
    (((), (0,), (1,)), ((1, 0), (), ()), [("all-gather", (1,)), ("all-gather", (0,))]),
    # three dims' axes into one, or one dim's into three: XLA alone replicates the tensor
    # (three all-gathers); pinned halfway, each half is an all-to-all of one falling and one
    # rising dim
    (((0,), (1,), (2,)), ((), (2, 1, 0), ()),
     [("all-to-all", (0,)), ("all-to-all", (2,)), ("collective-permute", (0, 1, 2))]),
    (((), (), (0, 2, 1)), ((1,), (0,), (2,)),
     [("all-to-all", (1,)), ("all-to-all", (2,)), ("collective-permute", (0, 2))]),
    # "c" gathered from between "b" and "a": the blocks put in dst's order after it
    (((1, 0), (), (2,)), ((0, 1), (), ()), [("all-gather", (2,)), ("collective-permute", (0, 1))]),
    # "b" and "a" gathered from in front of "c": first moved behind it by a permute
    (((), (), (1, 2, 0)), ((0,), (1,), ()),
     [("collective-permute", (1, 2)), ("all-gather", (0, 1)), ("all-gather", (2,))]),
])
def test_3_axis_reshardings_run_the_priced_collectives(src, dst, kinds):
    # pinned to the route's waypoints, XLA runs the priced collectives (kinds, axes, bytes);
    # of 1,200 random reshardings of a rank-3 tensor on 2x2x2, 542 compiled otherwise
    # before these rules, none after (another 1,200: none)
    shape = (16, 32, 64)
    model = MeshCostModel(_uniform_cluster(), (2, 2, 2))
    steps = model.resharding_steps(shape, 4, src, dst)
    assert [(s.kind, s.axes) for s in steps] == kinds
    waypoints = model.resharding_waypoints(shape, src, dst)
    assert [(s.kind, s.axes, s.nbytes) for s in steps] == \
        _compiled_collectives((2, 2, 2), shape, [src, *waypoints, dst])


@pytest.mark.parametrize("src, dst, kinds", [
    # three dims' rotation, both falling dims staying split: XLA runs two all-to-alls
    (((0,), (), (2, 1)), ((1,), (0,), (2,)), ["all-to-all", "all-to-all"]),
    # (4, 2, 2) parts to (1, 4, 4): XLA replicates; halfway, two exchanges and a permute
    (((0,), (1,), (2,)), ((), (2, 1), (0,)), ["all-to-all", "all-to-all", "collective-permute"]),
])
def test_an_exchange_xla_cannot_run_at_once_is_two_pinned_halfway(src, dst, kinds):
    # on 4x2x2 (16 devices, more than the tests have): compiled with 16 virtual devices and
    # pinned to this waypoint, both run these collectives with these bytes (of 400 random
    # rank-3 reshardings on 4x2x2, 2x4x2 and 2x2x4 each, the ones that still differ differ
    # only in naming an all-to-all group that lies within the 4-wide axis)
    model = MeshCostModel(_uniform_cluster(), (4, 2, 2))
    shape = (16, 32, 64)
    assert [s.kind for s in model.resharding_steps(shape, 4, src, dst)] == kinds
    (halfway,) = model.resharding_waypoints(shape, src, dst)
    for leg in ((src, halfway), (halfway, dst)):  # each half: one dim's parts fall, one's rise
        parts = [[math.prod((4, 2, 2)[a] for a in axes) for axes in spec] for spec in leg]
        assert sum(a > b for a, b in zip(*parts)) == sum(a < b for a, b in zip(*parts)) == 1


def test_a_one_move_resharding_has_no_waypoints(model24):
    assert model24.resharding_waypoints((16, 128), ((0,), ()), ((), ())) == ()
    assert model24.resharding_waypoints((16, 128), ((0,), ()), ((), (0,))) == ()
