"""Smoke test of the benchmark harness: one small workload on one mesh, every field present."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)   # the harness sets its own device count before jax loads
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--workloads", "mlp_small",
         "--meshes", "8", "--repeats", "3", "--timing-s", "0", "--warmup", "1",
         "--calibration-s", "2", "--kernel-s", "2", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_json_has_every_field(quick_run):
    from benchmarks import baselines
    from benchmarks.run import (
        CALIBRATED,
        CLUSTERS,
        ILP,
        ILP_DONATED,
        MODELLED_FIELDS,
        PRESETS,
        ROW_FIELDS,
        TIMING_FIELDS,
        YARDSTICK_FIELDS,
    )

    data = json.loads((quick_run / "results.json").read_text())
    rows = data["rows"]
    hand = ["hand:" + s for s in baselines.baseline_names("mlp_small", (8,))]
    for cluster in CLUSTERS + (CALIBRATED,):
        programs = sorted(r["program"] for r in rows if r["cluster"] == cluster)
        assert programs == sorted(hand + [ILP, ILP_DONATED, *PRESETS]), (cluster, programs)
    for r in rows:
        assert set(ROW_FIELDS) <= set(r), set(ROW_FIELDS) - set(r)
        assert r["error"] is None, r["error"]
        assert (r["workload"], r["mesh"], r["mesh_shape"]) == ("mlp_small", "8", [8])
        y = r["yardstick"]
        assert set(YARDSTICK_FIELDS) <= set(y) and y["total_s"] > 0 and y["flops"] > 0
        assert y["total_s"] == pytest.approx(y["compute_s"] + y["memory_s"] + y["collective_s"])
        if r["kind"] == "hand":
            assert r["modelled"] is None and r["audit"] is None
        else:
            assert set(MODELLED_FIELDS) <= set(r["modelled"]) and r["modelled"]["total_s"] > 0
            assert isinstance(r["audit"]["ok"], bool) and r["planning_time_s"] > 0
    (timing,) = data["timing"]
    assert set(TIMING_FIELDS) <= set(timing) and timing["error"] is None
    assert set(timing["programs"]) == set(hand + [ILP, *PRESETS])
    for v in timing["programs"].values():
        assert len(v["step_times_s"]) == 3 and v["step_time_s"] > 0


def test_markdown_states_goal_and_lists_rows(quick_run):
    text = (quick_run / "RESULTS.md").read_text()
    assert "**Goal.**" in text and "python -m benchmarks.run" in text
    assert "## ILP against the best hand-written baseline (yardstick)" in text
    assert "## Measured step time on the CPU" in text
    # one headline row per cluster, and every program in the full table
    assert text.count("| mlp_small | 8 | host-cpu |") >= 2
    assert "| mlp_small | 8 | h100-80gb | hand:dp |" in text
    assert "## Memory: the modelled peak against the compiled program" in text
    assert "| mlp_small | 8 | host-cpu | ShardParallel, donated |" in text
    # the presets' model against their compiled programs, counted over every preset row
    # (3 presets x 3 clusters)
    assert re.search(r"presets' modelled time within ±10 % of their yardstick on \d of 9 rows",
                     text), text
    # the measured goal is counted with the others, over the one executed row
    assert re.search(r"measured step time at most 1.05× the fastest hand-written baseline's "
                     r"\(CPU, calibrated cluster\): \*\*[01] of 1\*\* executed rows", text), text


def test_collective_parser_handles_tuples_and_async():
    from autoshard.ir.hlo import collective_stats

    text = "\n".join([
        "  %all-reduce.1 = f32[32,256]{1,0} all-reduce(f32[32,256]{1,0} %x), to_apply=%add",
        "  %ar = (f32[8]{0}, bf16[4,4]{1,0}) all-reduce(%a, %b), to_apply=%add",
        "  ROOT %ag = f32[16,8]{1,0} all-gather(%y), dimensions={0}",
        "  %ags = (f32[2,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%y), dimensions={0}",
        "  %agd = f32[16,8]{1,0} all-gather-done(%ags)",
        "  %cp = s32[10]{0} collective-permute(%z), source_target_pairs={{0,1}}",
        "  %fusion = f32[4]{0} fusion(%all-reduce.1), kind=kLoop",
    ])
    s = collective_stats(text)
    assert s["all-reduce"] == {"count": 2, "bytes": 32 * 256 * 4 + 8 * 4 + 16 * 2}
    assert s["all-gather"] == {"count": 2, "bytes": 2 * 16 * 8 * 4}
    assert s["collective-permute"] == {"count": 1, "bytes": 40}
    assert s["reduce-scatter"] == s["all-to-all"] == {"count": 0, "bytes": 0}


def test_planning_time_measures_each_phase():
    # The --scale rows' measurement, on a model small enough for the suite: the phases are
    # timed (the planner's own functions wrapped and restored) and the presets priced beside.
    from autoshard.intra import problem
    from benchmarks import planning_time

    build_graph = problem.build_graph
    row = planning_time.measure(1, 64, 16, 4, 128, 10.0, batch=8, mesh_shape=(2, 4))
    assert problem.build_graph is build_graph
    assert row["strategies_s"] > 0 and row["solve_s"] > 0 and row["nodes"] > 0
    assert row["cost_ms"] > 0 and row["peak_gib"] > 0
    assert set(row["presets"]) == {"DataParallel", "ZeRO3", "Megatron"}


def test_depth_section_compares_medians_of_each_pair():
    # Per pair: medians 10 and 15 (the 19 s outlier leaves the full depth's median at 15),
    # so full / half = 1.50, and 5 s over the 40 layers added, 0.125 s each; ranges as
    # measured. jax's make_jaxpr alone: medians 1.0 and 2.0 s, 0.025 s per added layer. The
    # cost that does not grow with depth is 2 x 10 - 15 = 5 s, so a ratio of 1.3 allows
    # p with (5 + 80 p) <= 1.3 (5 + 40 p): p <= 1.5 / 28 = 0.0536 s per layer.
    from benchmarks import planning_time

    totals = {i: list(zip([10.0, 12.0, 9.0], [1.0, 1.2, 0.9])) if i == half
              else list(zip([15.0, 19.0, 14.0], [2.0, 2.5, 1.9]))
              for half, full in planning_time.DEPTH_PAIRS for i in (half, full)}
    lines = planning_time.depth_section(totals)
    rows = [line for line in lines if line.startswith("| 70B")]
    assert len(rows) == len(planning_time.DEPTH_PAIRS)
    for line in rows:
        assert line.endswith("| 10.0 (9.0-12.0) | 15.0 (14.0-19.0) | 1.50 | 0.125 | 0.025 "
                             "| 0.054 |"), line
    # the allowance is the bound: at it, twice the layers take exactly 1.3 times as long
    p = planning_time.allowed_per_layer(10.0, 15.0, 40)
    assert (5 + 80 * p) / (5 + 40 * p) == pytest.approx(planning_time.DEPTH_GOAL)
    # 3x the time for 2x the layers: no cost is left that depth does not grow
    assert planning_time.allowed_per_layer(10.0, 30.0, 40) is None
    # each pair: twice the layers, the same width, mesh and cluster (budget or none)
    scale = planning_time.scale_rows()
    for half, full in planning_time.DEPTH_PAIRS:
        assert scale[half][1] * 2 == scale[full][1]
        assert scale[half][2] == scale[full][2] and scale[half][3] == scale[full][3]
        assert scale[half][5] == scale[full][5]


def test_modelled_time_is_judged_without_host_copies_of_the_batch():
    # The compiled program copies no batch in from the host: a plan's (or a preset's)
    # modelled time is compared by its program_s (1 ms here), not its total_s (1.5 ms).
    from benchmarks.report import model_ratio

    row = {"modelled": {"total_s": 1.5e-3, "program_s": 1e-3}, "yardstick": {"total_s": 1e-3}}
    assert model_ratio(row) == pytest.approx(1.0)


def test_measured_step_is_judged_against_the_fastest_hand_written_program():
    # Two baselines timed: the ILP (12 ms) is judged against the faster (hand:tp, 10 ms),
    # 1.2x, with the kernels and collective instructions of both compiled programs.
    from benchmarks.report import step_ratios

    def yardstick(kernels, *counts):
        return {"kernels": kernels, "collectives": [{"count": c} for c in counts]}

    rows = [{"workload": "w", "mesh": "8", "cluster": "calibrated", "program": p, "yardstick": y}
            for p, y in (("ShardParallel", yardstick(30, 7, 4)), ("hand:tp", yardstick(25, 13)),
                         ("hand:dp", yardstick(26, 1)))]
    timing = [{"workload": "w", "mesh": "8", "programs": {
        "ShardParallel": {"step_time_s": 12e-3, "step_times_s": [12e-3] * 5},
        "hand:tp": {"step_time_s": 10e-3, "step_times_s": [10e-3] * 5},
        "hand:dp": {"step_time_s": 11e-3, "step_times_s": [11e-3] * 5},
        "DataParallel": {"step_time_s": 15e-3, "step_times_s": [15e-3] * 5}}}]
    (entry,) = step_ratios({"rows": rows, "timing": timing})
    assert entry["hand"] == "hand:tp" and entry["ratio"] == pytest.approx(1.2)
    assert entry["kernels"] == (30, 25) and entry["collectives"] == (11, 13)
    assert entry["presets"] == {"DataParallel": pytest.approx(1.5)} and entry["rounds"] == 5


def _scaled_sum(a, b):
    return (a + b) * 2.0


def _sine_loss(x):
    return jnp.sum(jnp.sin(x) * x)


def test_bytes_by_source_puts_both_figures_on_the_users_lines():
    from benchmarks.bytes_by_source import Source, compare, report
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    array = 64 * 64 * 4
    modelled, compiled, total = compare(_scaled_sum, (x, x))
    line = _scaled_sum.__code__.co_firstlineno + 1
    here = Source("test_benchmarks.py", "_scaled_sum", line, False)
    # one loop fusion reads a and b and writes the result; the model prices the same
    assert compiled == {here: 3 * array} and total == 3 * array
    assert modelled == {here: 3 * array}
    assert "test_benchmarks.py _scaled_sum" in report(modelled, compiled, total, lines=True)
    # a gradient's equations and fusions are the backward pass's, on the loss's line
    modelled, compiled, _ = compare(jax.grad(_sine_loss), (x,))
    line = _sine_loss.__code__.co_firstlineno + 1
    for found in (modelled, compiled):
        assert {s for s in found if s.backward} and all(s.line == line for s in found), found
