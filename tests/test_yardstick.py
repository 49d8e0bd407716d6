"""The independent yardstick (benchmarks/yardstick.py) and the HLO collective parser it reads."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.cost_model import Link, MeshCostModel
from autoshard.ir import hlo
from benchmarks.yardstick import kernel_count, yardstick
from tests.baseline_cases import compiled_baseline

# Device ids sit row-major on the (2, 4) mesh ("data", "model"):
#     data 0: 0 1 2 3
#     data 1: 4 5 6 7
# so a group whose ids differ by 4 runs along data (axis 0), by 1 along model (axis 1).
GROUPS = [
    # explicit: rows of the mesh -> only the model coordinate varies
    ("{{0,1,2,3},{4,5,6,7}}", [(0, 1, 2, 3), (4, 5, 6, 7)], (1,)),
    # explicit: columns -> only the data coordinate varies
    ("{{0,4},{1,5},{2,6},{3,7}}", [(0, 4), (1, 5), (2, 6), (3, 7)], (0,)),
    # iota [2,4]<=[8]: arange(8).reshape(2, 4): rows again -> model
    ("[2,4]<=[8]", [(0, 1, 2, 3), (4, 5, 6, 7)], (1,)),
    # iota [4,2]<=[2,4]T(1,0): arange(8).reshape(2, 4).T -> [[0,4],[1,5],[2,6],[3,7]] -> data
    ("[4,2]<=[2,4]T(1,0)", [(0, 4), (1, 5), (2, 6), (3, 7)], (0,)),
    # iota [1,8]<=[8]: one group of everything -> both axes
    ("[1,8]<=[8]", [tuple(range(8))], (0, 1)),
    # jax 0.10 mesh-axes form: XLA's mesh 2x1x4 = arange(8).reshape(2, 1, 4); grouping its
    # axis_0 pairs i with i + 4 -> data
    ("mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}", [(0, 4), (1, 5), (2, 6), (3, 7)], (0,)),
    # with a device order and a sub-axis: XLA's 4x2 mesh holds
    # arange(8).reshape(2,2,2).transpose(0,2,1).reshape(4,2) = [[0,2],[1,3],[4,6],[5,7]];
    # axis_0 (size 4) splits into a major and a minor half, 'axis_0':(2)2 is the minor one
    # (pre-size 2), so each group is rows 2h and 2h+1 of one column: (0,1),(2,3),(4,5),(6,7)
    # -> ids differ by 1 -> (part of) the model axis
    ("mesh['axis_0'=4,'axis_1'=2], device_ids=([2,2,2]T(0,2,1)) {'axis_0':(2)2}",
     [(0, 1), (2, 3), (4, 5), (6, 7)], (1,)),
]


@pytest.mark.parametrize("text,groups,axes", GROUPS, ids=[g[0] for g in GROUPS])
def test_replica_group_parser(text, groups, axes):
    got = hlo.parse_replica_groups(text + ", use_global_device_ids=true, to_apply=%add")
    assert sorted(tuple(sorted(g)) for g in got) == sorted(groups)
    assert hlo.group_axes(got, (2, 4)) == axes


def test_empty_replica_groups_mean_every_device():
    assert hlo.parse_replica_groups("{}, to_apply=%add") == ()
    assert hlo.group_axes((), (2, 4)) == (0, 1)


HLO = """
HloModule m, entry_computation_layout={(f32[16,64]{1,0})->f32[64,64]{1,0}}

ENTRY %main (p0: f32[16,64], p1: f32[8,64]) -> f32[64,64] {
  %p0 = f32[16,64]{1,0} parameter(0)
  %p1 = f32[8,64]{1,0} parameter(1)
  %ar = (f32[16,64]{1,0}, f32[8,64]{1,0}) all-reduce(%p0, %p1), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %ags = (f32[8,64]{1,0}, f32[32,64]{1,0}) all-gather-start(%p1), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %agd = f32[32,64]{1,0} all-gather-done(%ags)
  %ars = f32[8,64]{1,0} all-reduce-start(%p1), channel_id=3, replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true, to_apply=%add
  %ard = f32[8,64]{1,0} all-reduce-done(%ars)
  %rs = f32[4,64]{1,0} reduce-scatter(%p1), channel_id=4, replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}, to_apply=%add
  ROOT %cp = f32[8,64]{1,0} collective-permute(%p1), channel_id=5, source_target_pairs={{0,1},{1,0},{4,5},{5,4}}
}
"""


def test_parse_collectives_counts_async_pairs_once_and_sums_tuples():
    cols = hlo.parse_collectives(HLO)
    assert [c.kind for c in cols] == ["all-reduce", "all-gather", "all-reduce", "reduce-scatter",
                                      "collective-permute"]
    ar, ag, ar2, rs, cp = cols
    assert ar.result_bytes == ar.operand_bytes == (16 + 8) * 64 * 4       # tuple summed
    assert ag.result_bytes == 32 * 64 * 4 and ag.operand_bytes == 8 * 64 * 4  # outputs only
    assert ar2.result_bytes == 8 * 64 * 4
    assert rs.result_bytes == 4 * 64 * 4 and rs.operand_bytes == 8 * 64 * 4
    assert [c.axes((2, 4)) for c in cols] == [(1,), (1,), (0,), (0,), (1,)]
    assert [c.group_size(8) for c in cols] == [4, 4, 2, 2, 2]
    assert [c.operands for c in cols] == [2, 1, 1, 1, 1]   # the tuple all-reduce: 2 arrays
    # hlo.collective_stats agrees on counts and bytes
    st = hlo.collective_stats(HLO)
    for kind in hlo.COLLECTIVE_KINDS:
        assert st[kind]["count"] == sum(c.kind == kind for c in cols)
        assert st[kind]["bytes"] == sum(c.result_bytes for c in cols if c.kind == kind)


class _Stub:
    """Just enough of jax.stages.Compiled for the yardstick."""

    def __init__(self, text, cost, memory=None):
        self._text, self._cost, self._memory = text, cost, memory

    def as_text(self):
        return self._text

    def cost_analysis(self):
        return self._cost

    def memory_analysis(self):
        return self._memory


SLOW, FAST = Link(bandwidth=1e9, latency=1e-5), Link(bandwidth=1e11, latency=1e-6)
CLUSTER = autoshard.Cluster(
    name="two-links", flops={"float32": 1e12, "bfloat16": 4e12}, memory_bandwidth=1e11,
    device_memory=2**30, devices_per_node=8, intra_node=FAST, inter_node=SLOW,
    axis_links=(SLOW, FAST))   # data axis slow, model axis fast


def test_model_axis_collective_is_priced_with_the_model_link():
    line = ("  %ar = f32[1024]{0} all-reduce(%p), channel_id=1, "
            "replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add\n")
    y = yardstick(_Stub("%p = f32[1024]{0} parameter(0)\n" + line, {"flops": 0.0}), (2, 4),
                  CLUSTER, axis_names=("data", "model"))
    n, s = 4, 4096
    # the ring's 2(n-1) steps and one launch: the latencies a cluster's α is fitted with
    want = (2 * (n - 1) + 1) * FAST.latency + 2 * (n - 1) / n * s / FAST.bandwidth
    assert y.collective_s == pytest.approx(want)
    (c,) = y.collectives
    assert (c.kind, c.axes, c.count, c.bytes) == ("all-reduce", ("model",), 1, s)
    # the same collective along data (pairs i, i+4) pays the slow link
    y = yardstick(_Stub(line.replace("{{0,1,2,3},{4,5,6,7}}", "{{0,4},{1,5},{2,6},{3,7}}"),
                        {"flops": 0.0}), (2, 4), CLUSTER)
    assert y.collective_s == pytest.approx(3 * SLOW.latency + 2 * 1 / 2 * 4096 / SLOW.bandwidth)
    # over both axes: the slowest link's bandwidth and latency
    y = yardstick(_Stub(line.replace("{{0,1,2,3},{4,5,6,7}}", "{}"), {"flops": 0.0}), (2, 4),
                  CLUSTER)
    assert y.collective_s == pytest.approx(15 * SLOW.latency + 2 * 7 / 8 * 4096 / SLOW.bandwidth)


def test_a_combined_all_reduce_pays_each_arrays_latency_where_the_backend_runs_it_so():
    # all-reduce of 2 arrays over 4 devices (the model axis): XLA's CPU collectives run one
    # all-reduce per array (Cluster.all_reduce_per_operand), other backends one in all
    line = ("  %ar = (f32[512]{0}, f32[512]{0}) all-reduce(%p, %q), channel_id=1, "
            "replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add\n")
    text = "%p = f32[512]{0} parameter(0)\n%q = f32[512]{0} parameter(1)\n" + line
    n, s = 4, 4096
    for per_operand, latencies in ((False, 1), (True, 2)):
        cluster = dataclasses.replace(CLUSTER, all_reduce_per_operand=per_operand)
        y = yardstick(_Stub(text, {"flops": 0.0}), (2, 4), cluster)
        assert y.collective_s == pytest.approx(latencies * (2 * (n - 1) + 1) * FAST.latency +
                                               2 * (n - 1) / n * s / FAST.bandwidth)


@pytest.mark.parametrize("kind, result, operand", [
    ("all-reduce", "f32[1024]{0}", "f32[1024]{0}"),
    ("all-gather", "f32[4096]{0}", "f32[1024]{0}"),
    ("all-to-all", "f32[1024]{0}", "f32[1024]{0}"),
    ("reduce-scatter", "f32[256]{0}", "f32[1024]{0}"),
])
def test_one_collective_costs_what_the_cluster_figures_say(kind, result, operand):
    # α is defined by the cost model's latency counts (calibration fits it with them), so
    # the yardstick's price of one collective is the model's, on the same cluster
    line = (f"  %c = {result} {kind}(%p), channel_id=1, dimensions={{0}}, "
            "replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add\n")
    y = yardstick(_Stub(f"%p = {operand} parameter(0)\n" + line, {"flops": 0.0}), (2, 4),
                  CLUSTER)
    model = MeshCostModel(CLUSTER, (2, 4))
    price = {"all-reduce": model.all_reduce(4096, (1,)),
             "all-gather": model.all_gather(4 * 4096, (1,)),  # the gathered output
             "all-to-all": model.all_to_all(4096, (1,)),
             "reduce-scatter": model.reduce_scatter(4096, (1,))}[kind]  # the input
    assert y.collective_s == pytest.approx(price)


def test_volumes_per_kind_and_cost_analysis_as_list():
    y = yardstick(_Stub(HLO, [{"flops": 2e9, "bytes accessed": 3e8}], None), (2, 4), CLUSTER,
                  dtype="bfloat16")
    assert y.compute_s == pytest.approx(2e9 / 4e12)
    assert y.memory_s == pytest.approx(3e8 / 1e11)
    assert y.peak_memory_bytes is None
    by = {(c.kind, c.axes): c for c in y.collectives}
    kb = 64 * 4
    assert by[("all-reduce", ("1",))].moved_bytes == pytest.approx(2 * 3 / 4 * 24 * kb)
    assert by[("all-reduce", ("0",))].moved_bytes == pytest.approx(2 * 1 / 2 * 8 * kb)
    assert by[("all-gather", ("1",))].moved_bytes == pytest.approx(3 / 4 * 32 * kb)
    assert by[("reduce-scatter", ("0",))].moved_bytes == pytest.approx(1 / 2 * 8 * kb)  # S_in
    cp = by[("collective-permute", ("1",))]
    assert cp.moved_bytes == 8 * kb
    assert cp.seconds == pytest.approx(FAST.latency + 8 * kb / FAST.bandwidth)


def test_total_is_the_sum_of_its_parts_on_a_compiled_baseline():
    compiled, _ = compiled_baseline("mlp", (2, 4), "dp_tp")
    cluster = autoshard.cluster_preset("host-cpu")
    y = yardstick(compiled, (2, 4), cluster, axis_names=("data", "model"))
    assert y.total_s == pytest.approx(y.compute_s + y.memory_s + y.collective_s, rel=1e-12)
    assert y.collective_s == pytest.approx(sum(c.seconds for c in y.collectives))
    assert y.flops > 0 and y.bytes_accessed > 0
    assert y.compute_s == pytest.approx(y.flops / 1e11)
    assert y.peak_memory_bytes == hlo.memory(compiled)["total"] > 0
    kinds = {(c.kind, c.axes) for c in y.collectives}
    assert ("all-reduce", ("model",)) in kinds and ("all-reduce", ("data",)) in kinds
    assert "Yardstick(total" in repr(y)


def test_kernels_are_the_entry_instructions_that_run():
    # the parameters, constants, tuples, get-tuple-elements, bitcasts and the -done half of
    # an async pair launch nothing; a fusion, a dot, a collective (tuple-shaped too) and a
    # copy do: 4 kernels. A nested computation's instructions are its caller's
    text = """HloModule m

%fused (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%p)
}

ENTRY %main (a: f32[8], b: f32[8,8]) -> (f32[8], f32[8]) {
  %a = f32[8]{0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  %c = f32[] constant(1)
  %f = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused
  %d = f32[8]{0} dot(%b, %f), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar = (f32[8]{0}, f32[8]{0}) all-reduce(%d, %f), replica_groups={}, to_apply=%fused
  %g = f32[8]{0} get-tuple-element(%ar), index=0
  %s = f32[8]{0} all-gather-start(%g), dimensions={0}
  %e = f32[8]{0} all-gather-done(%s)
  %bc = f32[8]{0} bitcast(%e)
  ROOT %t = (f32[8]{0}, f32[8]{0}) tuple(%bc, %g)
}
"""
    assert kernel_count(text) == 4


def test_a_compiled_programs_kernels_are_counted():
    compiled, _ = compiled_baseline("mlp", (2, 4), "dp_tp")
    y = yardstick(compiled, (2, 4), autoshard.cluster_preset("host-cpu"))
    text = compiled.as_text()
    entry = text[text.index("\nENTRY"):]
    fusions = entry.count(" fusion(")
    collectives = sum(c.count for c in y.collectives)
    # every fusion and collective is a kernel, and the parameters are not
    assert fusions + collectives <= y.kernels < entry.count(" = ") - entry.count(" parameter(")


def test_axes_of_collectives_xla_really_emits():
    """Whatever replica-group form XLA prints, the parser finds the mesh axis reduced over."""
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    x = jax.ShapeDtypeStruct((8, 64), jnp.float32)

    def axes_of(spec_in, reduce_dims):
        f = jax.jit(lambda a: a.sum(reduce_dims), in_shardings=NamedSharding(mesh, spec_in),
                    out_shardings=NamedSharding(mesh, P()))
        cols = hlo.parse_collectives(f.lower(x).compile().as_text())
        return {c.axes((2, 4)) for c in cols if c.kind == "all-reduce"}

    assert axes_of(P(None, "model"), 1) == {(1,)}
    assert axes_of(P("data", None), 0) == {(0,)}
    assert axes_of(P(("data", "model"), None), 0) == {(0, 1)}


@pytest.mark.parametrize("out_spec, scattered", [(P(None, "model"), True), (P(), False)],
                         ids=["sliced", "kept whole"])
def test_an_all_reduce_whose_readers_keep_a_slice_is_a_gpu_reduce_scatter(out_spec, scattered):
    # the partitioner's reduce-scatter: all-reduce, then each device dynamic-slices its part
    # (fused into its readers here). The GPU pipeline makes it one reduce-scatter; the CPU
    # keeps the all-reduce, which host-cpu prices as the all-reduce it runs
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    step = jax.jit(lambda a, b: jnp.tanh(jax.lax.with_sharding_constraint(
        a @ b, NamedSharding(mesh, out_spec))) * 2,
        in_shardings=(NamedSharding(mesh, P(None, "model")), NamedSharding(mesh, P("model", None))))
    arg = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    compiled = step.lower(arg, arg).compile()
    gpu = yardstick(compiled, (2, 4), autoshard.cluster_preset("h100-80gb"))
    cpu = yardstick(compiled, (2, 4), autoshard.cluster_preset("host-cpu"))
    assert [c.kind for c in cpu.collectives] == ["all-reduce"]
    expected = "reduce-scatter" if scattered else "all-reduce"
    assert [(c.kind, c.axes, c.bytes) for c in gpu.collectives] == \
        [(expected, ("1",), 64 * 64 * 4 // (4 if scattered else 1))]
