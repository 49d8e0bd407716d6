"""Smoke test of the benchmark harness: one small workload on one mesh, every field present."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
         "--meshes", "8", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_json_has_every_field(quick_run):
    from autoshard.ir.hlo import COLLECTIVE_KINDS
    from benchmarks.run import (
        HLO_FIELDS,
        METHODS,
        MODELLED_FIELDS,
        OVERHEAD_FIELDS,
        PIPELINE,
        PIPELINE_HLO_FIELDS,
        ROW_FIELDS,
    )

    data = json.loads((quick_run / "results.json").read_text())
    rows = data["rows"]
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    for r in rows:
        assert set(ROW_FIELDS) <= set(r), set(ROW_FIELDS) - set(r)
        assert r["error"] is None, r["error"]
        assert (r["workload"], r["mesh"], r["mesh_shape"]) == ("mlp_small", "8", [8])
        assert r["executed"] is True
        assert set(MODELLED_FIELDS) <= set(r["modelled"])
        assert r["modelled"]["total_s"] > 0
        assert set(HLO_FIELDS) <= set(r["hlo"])
        assert set(r["hlo"]["collectives"]) == set(COLLECTIVE_KINDS)
        for v in r["hlo"]["collectives"].values():
            assert set(v) == {"count", "bytes"} and v["count"] >= 0 and v["bytes"] >= 0
        assert r["hlo"]["flops"] is not None and r["hlo"]["flops"] > 0
        assert r["hlo"]["collective_bytes"] == sum(
            v["bytes"] for v in r["hlo"]["collectives"].values())
        mem = r["hlo"]["memory"]
        if r["method"] == PIPELINE:   # several programs: busiest device, memory n/a
            assert mem is None and set(PIPELINE_HLO_FIELDS) <= set(r["hlo"])
            progs = r["hlo"]["programs"]
            names = {p["name"] for p in progs}
            if r["stages"][0]["num_microbatches"] == 1:   # the planner kept plain intra-op
                assert names == {"whole mesh"} and len(r["stages"]) == 1
            else:
                assert r["stages"][0]["num_microbatches"] == 2
                assert {"stage 0 forward", "stage 0 backward"} <= names
            for p in progs:
                m = p["memory"]
                assert p["runs_per_step"] >= 1 and p["device_ids"] and p["flops"] is not None
                assert m["total"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
            assert r["hlo"]["busiest_device"] in {d for p in progs for d in p["device_ids"]}
        else:
            assert r["stages"] is None
            assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
        assert len(r["step_times_s"]) >= 5 and r["step_time_s"] > 0
        assert r["step_time_ratio_to_best_preset"] > 0
        assert r["planning_time_s"] > 0
    assert len(data["overhead"]) == 1
    o = data["overhead"][0]
    assert set(OVERHEAD_FIELDS) <= set(o) and o["error"] is None and o["ratio"] > 0


def test_markdown_states_goal_and_lists_rows(quick_run):
    text = (quick_run / "RESULTS.md").read_text()
    assert "**Goal.**" in text and "python -m benchmarks.run" in text
    assert "ILP above the best preset on modelled cost" in text
    assert text.count("| mlp_small | 8 |") >= 6   # 4 methods + pipeline + the overhead row
    assert "## Pipeline: PipeshardParallel against the ILP" in text
    assert "| mlp_small | 8 | PipeshardParallel |" in text


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
