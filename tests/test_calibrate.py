"""``autoshard.calibrate``: a short measurement on the 8 CPU devices, the α–β fit, the
cluster's per-collective links, their JSON round trip and the CLI."""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
import types

import numpy as np
import pytest

import autoshard
from autoshard.calibration import (
    _model_terms,
    fit_alpha_beta,
    fit_collectives,
    link_classes,
    pooled_fits,
)
from autoshard.cli import main as _cli
from autoshard.cost_model import COLLECTIVES, Cluster, Link, MeshCostModel


@pytest.fixture(scope="module")
def calibrated():
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    start = time.perf_counter()
    cluster = autoshard.calibrate(mesh, budget_s=3)
    return cluster, time.perf_counter() - start


def test_calibrate_is_quick_and_sane(calibrated):
    cluster, seconds = calibrated
    assert seconds < 30, f"calibrate(budget_s=3) took {seconds:.1f} s"
    assert cluster.name == "calibrated-cpu-2x4"
    for dtype in ("float32", "bfloat16"):
        rate = cluster.flops_rate(dtype)
        assert math.isfinite(rate) and 1e7 < rate < 1e13, (dtype, rate)
    assert 1e7 < cluster.memory_bandwidth < 1e12
    assert len(cluster.axis_links) == 2
    assert [kind for kind, _ in cluster.collective_links] == list(COLLECTIVES)
    for kind, links in cluster.collective_links:
        assert len(links) == 2
        for link in links:
            assert math.isfinite(link.bandwidth) and 1e6 < link.bandwidth < 1e12, (kind, link)
            assert 0 <= link.latency < 1e-2, (kind, link)
    assert cluster.axis_links == dict(cluster.collective_links)["all-gather"]
    # XLA's CPU collectives run a merged all-reduce array by array (64 arrays: 7-10x one)
    assert cluster.all_reduce_per_operand


def test_calibrated_cluster_round_trips_exactly(calibrated):
    cluster, _ = calibrated
    again = Cluster.from_json(cluster.to_json())
    assert again == cluster
    assert again.to_json() == cluster.to_json()
    hash(again)


def test_calibrated_cluster_prices_and_plans(calibrated):
    cluster, _ = calibrated
    from examples.models import mlp
    w = mlp(num_layers=2, hidden=16, batch=16)
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    plan = autoshard.parallelize(w.fn, mesh=mesh, cluster=cluster,
                                 method=autoshard.DataParallel()).plan(*w.args)
    assert plan.cluster == cluster and plan.cost.total_s > 0
    assert autoshard.Plan.from_json(plan.to_json()).cluster == cluster


def test_fit_recovers_alpha_beta():
    n = 4
    sizes = np.array([1e3, 1e4, 1e5, 1e6])
    a, b = np.full(4, 2 * (n - 1) + 1.0), 2 * (n - 1) / n * sizes
    fit = fit_alpha_beta(a, b, a * 7e-6 + b / 3e9)
    assert fit.latency == pytest.approx(7e-6, rel=1e-6)
    assert fit.bandwidth == pytest.approx(3e9, rel=1e-6)
    assert fit.max_rel_error < 1e-9
    # Noise that makes the unconstrained α negative: α is clipped to 0, β stays positive.
    fit = fit_alpha_beta(np.ones(3), np.array([1e3, 1e4, 1e5]), np.array([1e-7, 2e-6, 2.1e-5]))
    assert fit.latency == 0 and fit.bandwidth > 0
    # Times that do not grow with size: β falls back to the fastest observed rate.
    fit = fit_alpha_beta(np.ones(3), np.array([1e3, 1e4, 1e5]), np.array([3e-5, 2e-5, 1e-5]))
    assert fit.bandwidth > 0 and fit.latency >= 0
    with pytest.raises(ValueError, match="≥ 2 points"):
        fit_alpha_beta([1.0], [1.0], [1.0])


def _points(n: int, latency: float, bandwidth: float, noise=(1.0, 1.0, 1.0, 1.0)):
    """Measured points of every collective on an ``n``-device axis of one α–β link, each
    time scaled by its ``noise`` factor (4 message sizes)."""
    sizes = (4 << 10, 64 << 10, 512 << 10, 4 << 20)
    points = {}
    for kind in COLLECTIVES:
        rows = [_model_terms(kind, n, size) for size in sizes]
        points[kind] = [(a, b, (a * latency + b / bandwidth) * f)
                        for (a, b), f in zip(rows, noise)]
    return points


def test_a_kind_fitted_without_latency_takes_the_latency_of_the_others():
    # One 10 µs, 2 GB/s link on a 4-device axis; the all-gather's smallest message
    # measured at a tenth of its time (noise: its chain less the chain without it). Alone
    # its points fit almost no latency, as if an all-gather were free but for its bytes;
    # it takes the latency the other kinds fit, its bandwidth fitted to that.
    points = _points(4, 10e-6, 2e9)
    a, b, t = points["all-gather"][0]
    points["all-gather"][0] = (a, b, t / 10)
    assert fit_alpha_beta(*zip(*points["all-gather"])).latency < 1e-7
    fits = fit_collectives(points, ["model"])
    assert fits["all-gather"].latency == pytest.approx(10e-6, rel=1e-6)
    assert fits["all-gather"].bandwidth == pytest.approx(2e9, rel=0.05)
    for kind in set(COLLECTIVES) - {"all-gather"}:
        assert fits[kind].latency == pytest.approx(10e-6, rel=1e-6), kind


def test_axes_of_one_link_share_one_fit_of_their_pooled_points():
    # Two 2-device axes of one 10 µs, 2 GB/s link, their smallest message measured 40 %
    # slow on one and 40 % fast on the other: alone, one axis's latency fits over twice the
    # other's (what made a plan prefer an axis for the noise); pooled, the noise cancels
    # and both get the same figures, between the two.
    points = {"fsdp": _points(2, 10e-6, 2e9, (1.4, 1.0, 1.0, 1.0)),
              "model": _points(2, 10e-6, 2e9, (0.6, 1.0, 1.0, 1.0))}
    own = {axis: fit_collectives(p, [axis]) for axis, p in points.items()}
    assert own["fsdp"]["all-reduce"].latency > 2 * own["model"]["all-reduce"].latency
    fits = pooled_fits(points, [("fsdp", "model")])
    assert fits["fsdp"] is fits["model"]
    for kind in COLLECTIVES:
        latencies = sorted(own[axis][kind].latency for axis in points)
        assert latencies[0] < fits["fsdp"][kind].latency < latencies[1], kind
        assert fits["fsdp"][kind].bandwidth == pytest.approx(2e9, rel=0.1), kind
    # Not of one class: each keeps its own fit.
    apart = pooled_fits(points, [("fsdp",), ("model",)])
    assert apart["fsdp"] == own["fsdp"] and apart["model"] == own["model"]


def test_axes_that_measure_apart_keep_their_own_fits():
    # One class by its boundaries, but one axis's link is 5x slower per byte (NVLink
    # against PCIe): beyond POOL_WITHIN, so pooling would misprice both.
    points = {"data": _points(4, 10e-6, 2e9), "model": _points(4, 10e-6, 10e9)}
    fits = pooled_fits(points, [("data", "model")])
    assert fits["data"]["all-gather"].bandwidth == pytest.approx(2e9, rel=1e-6)
    assert fits["model"]["all-gather"].bandwidth == pytest.approx(10e9, rel=1e-6)


def _fake_mesh(shape, names, processes):
    """A stand-in for a multi-process mesh: ``processes[i]`` is device i's process."""
    device = collections.namedtuple("Device", "id process_index")
    devices = np.empty(len(processes), object)
    devices[:] = [device(i, p) for i, p in enumerate(processes)]
    devices = devices.reshape(shape)
    return types.SimpleNamespace(devices=devices, axis_names=names, axis_sizes=shape)


@pytest.mark.parametrize("shape, names, processes, hosts, classes", [
    # one process: axes of a size are one link, axes of another size another
    ((2, 2, 2), ("data", "fsdp", "model"), [0] * 8, [0], [("data", "fsdp", "model")]),
    ((2, 4), ("data", "model"), [0] * 8, [0], [("data",), ("model",)]),
    ((1, 8), ("data", "model"), [0] * 8, [0], [("model",)]),
    # two processes, one per half: "data" crosses them, "fsdp" and "model" do not
    ((2, 2, 2), ("data", "fsdp", "model"), [0] * 4 + [1] * 4, [0, 0],
     [("data",), ("fsdp", "model")]),
    # a process per device, two per host: "model" stays on a host, "data" crosses hosts
    ((2, 2), ("data", "model"), [0, 1, 2, 3], [7, 7, 9, 9], [("data",), ("model",)]),
    # ... and with four per host both stay on it: one link
    ((2, 2), ("data", "model"), [0, 1, 2, 3], [7, 7, 7, 7], [("data", "model")]),
])
def test_link_classes_group_axes_crossing_the_same_boundaries(shape, names, processes, hosts,
                                                              classes):
    mesh = _fake_mesh(shape, names, processes)
    assert sorted(link_classes(mesh, hosts)) == sorted(classes)


def test_link_classes_of_a_real_mesh():
    mesh = autoshard.make_mesh((2, 2, 2), ("data", "fsdp", "model"))
    assert link_classes(mesh) == (("data", "fsdp", "model"),)


def test_collective_links_override_per_kind():
    fast, slow = Link(bandwidth=1e10, latency=1e-6), Link(bandwidth=1e8, latency=1e-4)
    base = autoshard.cluster_preset("host-cpu")
    cluster = dataclasses.replace(base, axis_links=(fast, fast),
                                  collective_links={"all-reduce": (slow, slow)})
    model = MeshCostModel(cluster, (2, 4))
    plain = MeshCostModel(dataclasses.replace(cluster, collective_links=None), (2, 4))
    assert model.all_reduce(1e6, (1,)) > 10 * plain.all_reduce(1e6, (1,))
    assert model.all_gather(1e6, (1,)) == plain.all_gather(1e6, (1,))  # falls back
    # A different mesh rank falls back to the node topology.
    assert cluster.links_for_mesh((8,), "all-reduce") == (base.intra_node,)
    with pytest.raises(ValueError, match="unknown collective 'broadcast'"):
        dataclasses.replace(base, collective_links={"broadcast": (fast,)})
    data = json.loads(cluster.to_json())
    data["collective_links"] = {"all-reduce": "fast"}
    with pytest.raises(ValueError, match="collective_links"):
        Cluster.from_json(json.dumps(data))
    plain_json = dataclasses.replace(base, collective_links=None).to_json()
    assert "collective_links" not in json.loads(plain_json)  # older files unchanged


@pytest.mark.parametrize("mesh_shape", [(8,), (2, 4), (2, 2, 2)])
def test_a_single_collective_link_serves_every_axis_of_a_preset(mesh_shape):
    # host-cpu prices XLA CPU's all-to-all at 0.35 of its nominal link on any mesh
    host = autoshard.cluster_preset("host-cpu")
    a2a = dict(host.collective_links)["all-to-all"][0]
    assert host.links_for_mesh(mesh_shape, "all-to-all") == (a2a,) * len(mesh_shape)
    assert host.links_for_mesh(mesh_shape, "all-reduce") == (host.intra_node,) * len(mesh_shape)
    model = MeshCostModel(host, mesh_shape)
    plain = MeshCostModel(dataclasses.replace(host, collective_links=None), mesh_shape)
    ratio = model.all_to_all(1e8, (0,)) / plain.all_to_all(1e8, (0,))
    assert 2.5 < ratio < 3.0   # bytes dominate: 1e10 / 3.5e9 = 2.86
    assert model.all_reduce(1e8, (0,)) == plain.all_reduce(1e8, (0,))
    assert Cluster.from_json(host.to_json()) == host


def test_a_one_axis_calibration_is_not_taken_for_axes_it_never_measured():
    measured = Link(bandwidth=1e8, latency=1e-4)
    base = autoshard.cluster_preset("host-cpu")
    calibrated = dataclasses.replace(base, axis_links=(measured,),
                                     collective_links={"all-to-all": (measured,)})
    assert calibrated.links_for_mesh((8,), "all-to-all") == (measured,)
    assert calibrated.links_for_mesh((2, 4), "all-to-all") == (base.intra_node,) * 2


def test_cli_calibrate_then_plan_with_it(tmp_path, capsys):
    out = tmp_path / "cluster.json"
    assert _cli.main(["calibrate", "--mesh", "8", "--out", str(out), "--budget", "2",
                      "--dtypes", "float32", "--name", "my-box"]) == 0
    text = capsys.readouterr().out
    assert "matmul float32" in text and "all-to-all" in text and str(out) in text
    cluster = Cluster.from_json(out.read_text())
    assert cluster.name == "my-box" and len(cluster.axis_links) == 1
    assert _cli.main(["plan", "examples.models:mlp", "--mesh", "8", "--method", "dp",
                      "--no-compare", "--cluster", str(out)]) == 0
    assert "cluster my-box" in capsys.readouterr().out


def test_cli_calibrate_times_a_targets_kernels(tmp_path, capsys):
    out = tmp_path / "cluster.json"
    # the block's 3x3 convolutions take milliseconds on the CPU: far above a call's overhead
    target = "examples.models:wide_resnet_block"
    assert _cli.main(["calibrate", "--mesh", "8", "--out", str(out), "--budget", "2",
                      "--dtypes", "float32", "--kernels", target]) == 0
    text = capsys.readouterr().out
    cluster = Cluster.from_json(out.read_text())
    assert cluster.kernel_seconds and all(k.startswith("conv_general_dilated(")
                                          for k, _ in cluster.kernel_seconds)
    assert f"{len(cluster.kernel_seconds)} kernels of {target} timed" in text
    assert _cli.main(["calibrate", "--mesh", "8", "--out", str(out), "--kernels",
                      "examples.models:mlp", "--kernel-budget", "0"]) == 2
    assert "bad --kernel-budget 0.0" in capsys.readouterr().err


def test_cli_calibrate_errors(tmp_path, capsys):
    assert _cli.main(["calibrate", "--mesh", "4x4", "--out", str(tmp_path / "c.json")]) == 2
    assert "needs 16 devices but 8" in capsys.readouterr().err
    assert _cli.main(["calibrate", "--mesh", "8", "--out", str(tmp_path / "c.json"),
                      "--dtypes", "bfloat16"]) == 2
    assert "must include float32" in capsys.readouterr().err


def test_benchmark_spearman_and_report(tmp_path):
    from benchmarks.calibration import spearman, summarize
    from benchmarks.calibration_report import render
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(spearman([1, 2], [1, 2]))
    rows = [{"workload": "mlp", "mesh": "8", "cluster": c, "method": m, "predicted_s": p,
             "compute_s": p, "communication_s": 0.0, "resharding_s": 0.0, "error": None,
             "measured_s": t, "measured_iqr_s": 1e-4}
            for c in ("default", "calibrated")
            for m, p, t in (("ILP", 1e-3, 2e-3), ("DataParallel", 2e-3, 3e-3),
                            ("ZeRO3", 3e-3, 5e-3))]
    summary = summarize(rows, ("default", "calibrated"))
    assert summary["spearman_pooled"]["calibrated"] == pytest.approx(1.0)
    assert all(c["within_noise"] for c in summary["ilp_check"])
    cluster = json.loads(autoshard.cluster_preset("host-cpu").to_json())
    text = render({"rows": rows, "summary": summary, "jax": "0", "date": "today",
                   "options": {"time_limit": 1, "rounds": 3, "budget": 3},
                   "default_cluster": cluster,
                   "calibrations": {"8": {"seconds": 3.0, "cluster": cluster}}})
    assert "| default | +1.00 |" in text and "| mlp | 8 | calibrated | ILP |" in text
