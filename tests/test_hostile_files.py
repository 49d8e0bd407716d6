"""Hostile plan and cluster files: deep, huge, NaN, overflowing, inconsistent.

Every one must be refused on loading with a ``PlanFormatError`` / ``ValueError`` that
names the field, and the command line must keep its promise: one ``autoshard: error:``
line on stderr, exit status 2, no traceback. Files are generated here, from a real plan
and a real cluster, one defect each.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoshard
from autoshard.cli import main as cli
from autoshard.plan.parts import StageAssignment, StageCost
from autoshard.plan.record import Plan
from autoshard.plan.serialize import plan_to_dict

DEEP = 20_000          # far past json's and Python's recursion limits
SOMEWHAT_DEEP = 900    # within json's, past what a plan holds
HUGE = 10**400


def _fn(w, x):
    return jnp.tanh(x @ w).sum()


@pytest.fixture(scope="module")
def base_plan() -> Plan:
    mesh = autoshard.abstract_mesh((2, 4), ("data", "model"))
    step = autoshard.parallelize(_fn, mesh=mesh, method=autoshard.ShardParallel(time_limit_s=2))
    return step.plan(jax.ShapeDtypeStruct((16, 16), jnp.float32),
                     jax.ShapeDtypeStruct((8, 16), jnp.float32))


@pytest.fixture(scope="module")
def pipeline_plan(base_plan) -> Plan:
    cost = StageCost(1e-3, 2e-4, 0.0, 1024, 5e-4, 7e-4)
    stages = tuple(StageAssignment(layers=(i,), mesh_shape=(1, 4), device_ids=ids, cost=cost,
                                   num_microbatches=2, schedule="1f1b")
                   for i, ids in enumerate([(0, 1, 2, 3), (4, 5, 6, 7)]))
    return dataclasses.replace(base_plan, stages=stages)


def _edit(plan: Plan, *edits) -> str:
    """The plan's JSON with ``edits`` applied: ``(path, value)``; a value ``"@RAW@"``
    string is replaced by raw text after dumping (for JSON no Python dict can nest)."""
    data = plan_to_dict(plan)
    raw = {}
    for n, (path, value) in enumerate(edits):
        target = data
        for key in path[:-1]:
            target = target[key]
        if isinstance(value, RawJson):
            raw[f"@RAW{n}@"] = value.text
            value = f"@RAW{n}@"
        target[path[-1]] = value
    text = json.dumps(data)
    for marker, replacement in raw.items():
        text = text.replace(json.dumps(marker), replacement)
    return text


@dataclasses.dataclass
class RawJson:
    text: str


def _nested(kind: str, depth: int, leaf: str = "null") -> RawJson:
    if kind == "list":
        return RawJson("[" * depth + leaf + "]" * depth)
    return RawJson('{"list": [' * depth + leaf + "]}" * depth)


PLAN_CASES = {
    "deep spec tree": ([(["in_specs"], _nested("tree", DEEP))], "plan.in_specs"),
    "somewhat deep spec tree": ([(["in_specs"], _nested("tree", SOMEWHAT_DEEP))],
                                "plan.in_specs"),
    "deep stages": ([(["stages"], _nested("list", SOMEWHAT_DEEP))], "plan.stages"),
    "very deep stages": ([(["stages"], _nested("list", DEEP))], "plan.stages"),
    "huge peak memory": ([(["cost", "peak_memory_bytes"], HUGE)],
                         "plan.cost.peak_memory_bytes"),
    "huge mesh": ([(["mesh", "shape"], [HUGE, 4])], "plan.mesh.shape"),
    "many devices": ([(["mesh", "shape"], [2**40, 4])], "plan.mesh.shape"),
    "overflowing float": ([(["cost", "compute_s"], RawJson("1e400"))], "plan.cost.compute_s"),
    "NaN cost": ([(["cost", "compute_s"], RawJson("NaN"))], "plan.cost.compute_s"),
    "infinite cost": ([(["cost", "resharding_s"], RawJson("-Infinity"))],
                      "plan.cost.resharding_s"),
    "negative cost": ([(["cost", "communication_s"], -1.0)], "plan.cost.communication_s"),
    "negative bytes": ([(["cost", "peak_memory_bytes"], -5)], "plan.cost.peak_memory_bytes"),
    "NaN collective": ([(["collectives"], [{"op": "x", "kind": "all-reduce",
                                             "seconds": float("nan")}])],
                       "plan.collectives[0].seconds"),
    "negative op seconds": ([(["top_ops"], [{"op": "x", "source": "", "strategy": "",
                                              "seconds": -2.0}])], "plan.top_ops[0].seconds"),
    "NaN solver": ([(["solver"], {"status": "OPTIMAL", "objective_s": 1.0,
                                  "lower_bound_s": 1.0, "gap": float("nan"),
                                  "solve_time_s": 0.1, "num_nodes": 1, "num_variables": 1,
                                  "num_constraints": 1, "planning_time_s": 0.1})],
                   "plan.solver.gap"),
    "negative value id": ([(["value_specs"], [[-1, ["data"]]])], "plan.value_specs[0]"),
    "negative operand": ([(["operand_specs"], [[0, -3, ["data"]]])], "plan.operand_specs[0]"),
    "method with an int for a bool": ([(["method"], {"kind": "ShardParallel",
                                                      "tie_repeats": 1})], "plan.method"),
    "method with a bool for a count": ([(["method"], {"kind": "PipeshardParallel",
                                                       "num_microbatches": True})],
                                       "plan.method"),
    "method with a huge time limit": ([(["method"], {"kind": "ShardParallel",
                                                      "time_limit_s": 1e300})], "plan.method"),
    "method of an unknown kind": ([(["method"], {"kind": "FastParallel"})], "plan.method"),
    "version-1 method nested deeply": ([(["format_version"], 1),
                                        (["method"], "ShardParallel(time_limit_s=" + "(" * 5000
                                         + "1" + ")" * 5000 + ")")], "plan.method"),
    "huge cluster memory": ([(["cluster", "device_memory"], HUGE)],
                            "plan.cluster.device_memory"),
    "cluster reserve over memory": ([(["cluster", "memory_reserve"], 2**50)], "memory_reserve"),
    "negative dim": ([(["shapes", "inputs"], [[-4], [8, 16]])], "plan.shapes.inputs[0]"),
    "huge dim": ([(["shapes", "inputs"], [[16, 16], [HUGE]])], "plan.shapes.inputs[1]"),
    "shapes of another plan": ([(["shapes", "inputs"], [[1], [2], [3], [4], [5], [6], [7],
                                                         [8], [9], [10], [11], [12], [13]])],
                               "plan.shapes.inputs"),
    "NaN alternative": ([(["alternatives"], [{"method": "DataParallel", "compute_s": 1.0,
                                              "communication_s": float("nan"),
                                              "resharding_s": 0.0}])],
                        "plan.alternatives[0].communication_s"),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_hostile_plan_files_are_plan_format_errors(base_plan, case):
    edits, field = PLAN_CASES[case]
    text = _edit(base_plan, *edits)
    with pytest.raises(autoshard.PlanFormatError) as info:
        Plan.from_json(text)
    assert field in str(info.value), str(info.value)
    assert len(str(info.value)) < 600   # a message, not a dump of the file


def test_pipeline_stages_on_shared_devices_are_refused(pipeline_plan):
    text = pipeline_plan.to_json()
    assert Plan.from_json(text).stages == pipeline_plan.stages   # the sound file loads
    for edit, field, words in [
            ((["stages", 1, "stage", "device_ids"], [3, 4, 5, 6]), "plan.stages[1].stage",
             "device 3 is also in stage 0"),
            ((["stages", 0, "stage", "device_ids"], [0, 1, 1, 2]), "plan.stages[0].stage",
             "device 1 is also in itself"),
            ((["stages", 0, "stage", "device_ids"], [0, 1]), "plan.stages[0].stage.device_ids",
             "2 devices for a sub-mesh of shape [1, 4]"),
            ((["stages", 1, "stage", "num_microbatches"], 4), "plan.stages[1].stage",
             "4 micro-batches")]:
        with pytest.raises(autoshard.PlanFormatError) as info:
            Plan.from_json(_edit(pipeline_plan, edit))
        assert field in str(info.value) and words in str(info.value), str(info.value)


def test_stale_operand_indices_are_refused_when_the_plan_is_used(base_plan):
    """A file whose operand or value numbers point past the program it is used with: a
    ValueError before anything runs, naming the equation and operand."""
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    w, x = jnp.ones((16, 16)), jnp.ones((8, 16))
    sound = Plan.from_json(base_plan.to_json())
    assert np.allclose(autoshard.parallelize(_fn, mesh=mesh, plan=sound)(w, x), _fn(w, x))
    deep_spec = [None, None, "data"]
    for edits, words in [
            ([(["operand_specs"], [[0, 7, ["data"]]])], "operand 7 of equation 0"),
            ([(["operand_specs"], [[0, 0, [None, None, None, "data"]]])], "operand 0 of "
                                                                           "equation 0 to"),
            ([(["operand_specs"], [[10**6, 0, ["data"]]])], "equation 1000000"),
            ([(["value_specs"], [[10**6, ["data"]]])], "pins value 1000000"),
            ([(["inputs", 0, 1], deep_spec), (["in_specs", "tuple", 0, "spec"], deep_spec)],
             "input 0")]:
        stale = Plan.from_json(_edit(base_plan, *edits))
        with pytest.raises(ValueError, match="plan=") as info:
            autoshard.parallelize(_fn, mesh=mesh, plan=stale)(w, x)
        assert words in str(info.value), str(info.value)


# ------------------------------------------------------------------ cluster files
def _cluster_text(**changes) -> str:
    data = json.loads(autoshard.cluster_preset("a100-80gb").to_json())
    raw = {}
    for key, value in changes.items():
        if isinstance(value, RawJson):
            raw[key] = value.text
            value = f"@{key}@"
        data[key] = value
    text = json.dumps(data)
    for key, replacement in raw.items():
        text = text.replace(json.dumps(f"@{key}@"), replacement)
    return text


CLUSTER_CASES = {
    "reserve over memory": (dict(memory_reserve=2**37, device_memory=2**36), "memory_reserve"),
    "reserve equal to memory": (dict(memory_reserve=2**36, device_memory=2**36),
                                "memory_reserve"),
    "huge memory": (dict(device_memory=HUGE), "device_memory"),
    "huge bandwidth": (dict(memory_bandwidth=HUGE), "memory_bandwidth"),
    "overflowing bandwidth": (dict(memory_bandwidth=RawJson("1e400")), "memory_bandwidth"),
    "NaN bandwidth": (dict(memory_bandwidth=RawJson("NaN")), "memory_bandwidth"),
    "NaN latency": (dict(intra_node=RawJson('{"bandwidth": 1e9, "latency": NaN}')),
                    "intra_node.latency"),
    "huge flops": (dict(flops={"float32": HUGE}), "flops.float32"),
    "NaN kernel time": (dict(kernel_seconds=RawJson('{"conv() float32[8]": NaN}')),
                        "kernel_seconds['conv() float32[8]']"),
    "negative kernel time": (dict(kernel_seconds={"k" * 10_000: -1.0}), "kernel_seconds['kkk"),
    "kernel times as a list": (dict(kernel_seconds=[1.0]), "kernel_seconds"),
    "deep axis links": (dict(axis_links=_nested("list", SOMEWHAT_DEEP)), "axis_links"),
    "very deep axis links": (dict(axis_links=_nested("list", DEEP)), "deep"),
}


@pytest.mark.parametrize("case", sorted(CLUSTER_CASES))
def test_hostile_cluster_files_are_refused_at_load(case):
    changes, field = CLUSTER_CASES[case]
    with pytest.raises(ValueError) as info:
        autoshard.Cluster.from_json(_cluster_text(**changes))
    assert field in str(info.value), str(info.value)
    assert len(str(info.value)) < 600


def test_a_cluster_whose_reserve_exceeds_its_memory_cannot_be_made():
    h100 = autoshard.cluster_preset("h100-80gb")
    with pytest.raises(ValueError, match=r"memory_reserve .* must be less than .*device_memory"):
        dataclasses.replace(h100, memory_reserve=h100.device_memory + 1)


# ------------------------------------------------------------------ the command line
def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoshard: error: "), captured.err[-2000:]
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("case", ["deep spec tree", "very deep stages", "huge peak memory",
                                  "NaN cost", "negative cost", "overflowing float",
                                  "version-1 method nested deeply"])
def test_cli_show_and_compare_keep_their_one_line_promise(base_plan, tmp_path, capsys, case):
    edits, field = PLAN_CASES[case]
    bad = tmp_path / "bad.json"
    bad.write_text(_edit(base_plan, *edits))
    good = tmp_path / "good.json"
    good.write_text(base_plan.to_json())
    assert field in _one_line_error(capsys, ["show", str(bad)])
    assert field in _one_line_error(capsys, ["compare", str(good), str(bad)])


@pytest.mark.parametrize("case", ["reserve over memory", "huge memory", "very deep axis links",
                                  "NaN bandwidth"])
def test_cli_refuses_hostile_cluster_files_in_one_line(tmp_path, capsys, case):
    changes, field = CLUSTER_CASES[case]
    path = tmp_path / "cluster.json"
    path.write_text(_cluster_text(**changes))
    line = _one_line_error(capsys, ["plan", "examples.models:mlp", "--mesh", "2",
                                    "--cluster", str(path)])
    assert "bad cluster file" in line and field in line


# ------------------------------------------------------------------ files written whole
def _race(write, path, texts, rounds: int = 40) -> set:
    """Two writer threads write their text to ``path`` ``rounds`` times while the main
    thread reads it; what the reader saw (and the last content) is returned."""
    import threading
    seen = set()
    writers = [threading.Thread(target=lambda t=t: [write(path, t) for _ in range(rounds)])
               for t in texts]
    for w in writers:
        w.start()
    while any(w.is_alive() for w in writers):
        try:
            seen.add(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            pass
    seen.add(path.read_text(encoding="utf-8"))
    return seen


@pytest.mark.parametrize("writer", ["cli", "cluster", "plan", "html"])
def test_files_are_written_whole(base_plan, tmp_path, writer):
    """Readers and a second writer never see half a file (nor an empty one)."""
    from autoshard.cli.arguments import write_text
    path = tmp_path / "out.json"
    if writer == "cli":
        texts = ["A" * 3_000_000, "B" * 2_000_000]
        write = lambda p, t: write_text(str(p), t, "plan file")  # noqa: E731
        expected = {t + "\n" for t in texts}
    elif writer == "cluster":
        clusters = [dataclasses.replace(autoshard.cluster_preset("a100-80gb"), name="c" * n)
                    for n in (2_000_000, 1_000_000)]
        texts, write = clusters, (lambda p, c: c.save(p))
        expected = {c.to_json() + "\n" for c in clusters}
    else:
        plans = [base_plan, dataclasses.replace(base_plan, warnings=("w" * 2_000_000,))]
        texts = plans
        write = (lambda p, plan: plan.save(p)) if writer == "plan" else \
            (lambda p, plan: plan.save_html(p))
        expected = None
    seen = _race(write, path, texts)
    if expected is None:   # plan files load, HTML pages end as pages end
        if writer == "plan":
            for text in seen:
                Plan.from_json(text)
        else:
            assert all(text.rstrip().endswith("</html>") for text in seen)
        assert len(seen) <= 2
    else:
        assert seen <= expected, sorted(len(t) for t in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]   # no temporary left


def test_saved_files_keep_ordinary_permissions(tmp_path):
    import os
    import stat
    path = tmp_path / "cluster.json"
    autoshard.cluster_preset("h100-80gb").save(path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
    assert autoshard.Cluster.from_json(path.read_text()) == autoshard.cluster_preset("h100-80gb")


def test_pipeline_programs_keep_their_sub_mesh_and_work(pipeline_plan):
    """A pipeline program's sub-mesh and modelled work (what the audit compares) survive a
    round trip; files written before they were kept load with none; wrong ones name the
    field."""
    from autoshard.plan.parts import ProgramSpecs
    program = ProgramSpecs("stage 0", pipeline_plan.flat_in_specs, pipeline_plan.flat_out_specs,
                           mesh_shape=(1, 4), flops=3.5e6, bytes_accessed=1.25e6)
    plan = dataclasses.replace(pipeline_plan, programs=(program,))
    assert Plan.from_json(plan.to_json()).programs == (program,)
    data = plan_to_dict(plan)
    for key in ("mesh_shape", "flops", "bytes_accessed"):
        del data["programs"][0][key]
    old = Plan.from_json(json.dumps(data)).programs[0]
    assert (old.mesh_shape, old.flops, old.bytes_accessed) == ((), 0.0, 0.0)
    for edit, field in [((["programs", 0, "mesh_shape"], [1, -4]), "plan.programs[0].mesh_shape"),
                        ((["programs", 0, "flops"], "many"), "plan.programs[0].flops"),
                        ((["programs", 0, "extra"], 1), "plan.programs[0]")]:
        with pytest.raises(autoshard.PlanFormatError) as info:
            Plan.from_json(_edit(plan, edit))
        assert field in str(info.value), str(info.value)
