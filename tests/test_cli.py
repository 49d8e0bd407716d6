"""The ``autoshard`` command line, driven as a user would (``python -m autoshard``).

Planning subprocesses are few and small (each imports jax): a module-scoped fixture
plans three times, the other tests read those files. Errors that never get as far
as planning are also checked in-process through ``autoshard.cli.main.main``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import autoshard
from autoshard.cli import main as _cli
from autoshard.cli.tables import compare_text, show_text
from autoshard.cli.target import TargetError, load_target
from tests.compile_flags import FAST_COMPILE

REPO = Path(__file__).resolve().parents[1]

TARGETS = textwrap.dedent('''
    """Tiny CLI targets (a 2-layer MLP train step from examples.models)."""
    from examples.models import mlp

    def tiny():            # a Workload: .fn, .args, .batch_argnums
        return mlp(num_layers=2, hidden=16, batch=16)

    def pair():            # (fn, example_args)
        w = tiny()
        return w.fn, w.args

    def abstract():        # ShapeDtypeStruct arguments
        return mlp(num_layers=2, hidden=16, batch=16, abstract=True)

    def broken():
        raise RuntimeError("boom in the user's factory")

    def wrong():
        return 42

    def needs(size):
        return mlp(hidden=size)
''')


def run_cli(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(cwd)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "autoshard", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("autoshard: error: "), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "tiny_models.py").write_text(TARGETS)
    cluster = autoshard.cluster_preset("host-cpu")
    import dataclasses
    (d / "cluster.json").write_text(dataclasses.replace(cluster, name="my-cpu").to_json())
    procs = {
        # file target, 2x4 on the 8 real devices, ILP, with the presets' comparison
        "ilp": run_cli("plan", d / "tiny_models.py:tiny", "--mesh", "2x4", "--json",
                       "ilp.json", cwd=d),
        # module target, 8x8: more devices than exist → abstract mesh
        "big": run_cli("plan", "tiny_models:abstract", "--mesh", "8x8", "--method", "megatron",
                       "--no-compare", "--json", "big.json", cwd=d),
        # (fn, args) factory, a preset, a cluster file
        "dp": run_cli("plan", "tiny_models.py:pair", "--mesh", "2x4", "--method", "dp",
                      "--cluster", "cluster.json", "--memory-budget", "1GiB", "--no-compare",
                      "--json", "dp.json", cwd=d),
    }
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stdout, proc.stderr)
    return d, procs


def test_plan_prints_summary_and_preset_comparison(work):
    d, procs = work
    out = procs["ilp"].stdout
    assert "autoshard plan — method ShardParallel" in out
    assert "mesh data=2 × model=4" in out
    assert "args[0]['layers'][0]['w']" in out
    assert "this plan against the presets" in out
    for row in ("ShardParallel (this plan)", "DataParallel", "ZeRO3", "Megatron"):
        assert row in out
    for col in ("total", "compute", "communication", "resharding", "peak memory"):
        assert col in out
    plan = autoshard.Plan.from_json((d / "ilp.json").read_text())
    assert plan.mesh_shape == (2, 4) and plan.axis_names == ("data", "model")
    assert plan.cluster == autoshard.cluster_preset("host-cpu")
    assert plan.to_json() == (d / "ilp.json").read_text().strip()


def test_plan_on_a_mesh_larger_than_the_devices(work):
    d, procs = work
    assert "abstract mesh" in procs["big"].stdout
    assert "this plan against the presets" not in procs["big"].stdout
    plan = autoshard.Plan.from_json((d / "big.json").read_text())
    assert plan.mesh_shape == (8, 8) and plan.method == autoshard.Megatron()
    assert plan.cluster.name == "host-cpu"


def test_plan_with_cluster_file_and_pair_factory(work):
    d, procs = work
    assert "cluster my-cpu" in procs["dp"].stdout
    plan = autoshard.Plan.from_json((d / "dp.json").read_text())
    assert plan.method == autoshard.DataParallel() and plan.cluster.name == "my-cpu"
    assert plan.in_specs[2] == {"x": jax.sharding.PartitionSpec(("data", "model")),
                                "y": jax.sharding.PartitionSpec(("data", "model"))}


def test_show_and_compare(work):
    d, _ = work
    show = run_cli("show", "ilp.json", cwd=d)
    assert show.returncode == 0, show.stderr
    plan = autoshard.Plan.from_json((d / "ilp.json").read_text())
    assert show.stdout.strip() == show_text(plan)
    assert "presets" not in show.stdout

    cmp_ = run_cli("compare", "ilp.json", "dp.json", cwd=d)
    assert cmp_.returncode == 0, cmp_.stderr
    out = cmp_.stdout
    dp = autoshard.Plan.from_json((d / "dp.json").read_text())
    ilp_x = dict(zip(plan.in_paths, plan.flat_in_specs))["args[2]['x']"]
    assert f"args[2]['x']:  {ilp_x} → P(('data', 'model'),)" in out
    for field in ("total", "compute", "communication", "resharding", "peak memory"):
        assert field in out
    assert "cost (B − A)" in out
    # identical plans: nothing differs
    same = compare_text(plan, plan)
    assert "inputs: 0 of" in same and "outputs: 0 of" in same
    assert dp.fingerprint == plan.fingerprint


def test_help_has_examples(work, capsys):
    d, _ = work
    proc = run_cli("plan", "--help", cwd=d)
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and "autoshard plan examples.models:mlp" in proc.stdout
    for cmd in ("show", "compare"):
        assert _cli.main([cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"autoshard {cmd} " in out.split("example:")[1]
    assert _cli.main(["--help"]) == 0
    assert "argparse" in _cli.__doc__


def test_errors_in_a_subprocess(work):
    d, _ = work
    (d / "corrupt.json").write_text('{"format": "autoshard-plan", "format_version": 1}')
    assert_user_error(run_cli("plan", "tiny_models:tiny", "--mesh", "2x", cwd=d), "--mesh '2x'")
    assert_user_error(run_cli("plan", "tiny_models.py:broken", "--mesh", "2", cwd=d),
                      "RuntimeError", "boom in the user's factory")
    assert_user_error(run_cli("show", "corrupt.json", cwd=d), "corrupt.json", "'mesh'")


@pytest.mark.parametrize("argv,fragments", [
    (["plan", "tiny_models:tiny", "--mesh", "0x4"], ["--mesh '0x4'"]),
    (["plan", "tiny_models:tiny", "--mesh", "2x4", "--axis-names", "data"], ["--axis-names"]),
    (["plan", "no_such_module_xyz:f", "--mesh", "2"], ["no_such_module_xyz"]),
    (["plan", "missing_file.py:f", "--mesh", "2"], ["missing_file.py"]),
    (["plan", "tiny_models", "--mesh", "2"], ["MODULE:FACTORY"]),
    (["plan", "tiny_models.py:nope", "--mesh", "2"], ["'nope'"]),
    (["plan", "tiny_models.py:wrong", "--mesh", "2"], ["returned int 42", "(fn, example_args)"]),
    (["plan", "tiny_models.py:needs", "--mesh", "2"], ["without arguments", "size"]),
    (["plan", "tiny_models:tiny", "--mesh", "2", "--cluster", "tpu-v9"], ["'tpu-v9'", "host-cpu"]),
    (["plan", "tiny_models:tiny", "--mesh", "2", "--cluster", "nofile.json"], ["nofile.json"]),
    (["plan", "tiny_models:tiny", "--mesh", "2", "--cluster", "ilp.json"], ["bad cluster file"]),
    (["plan", "tiny_models:tiny", "--mesh", "2", "--memory-budget", "lots"], ["'lots'"]),
    (["plan", "tiny_models:tiny", "--mesh", "2", "--method", "magic"], ["magic"]),
    (["show", "nothing_here.json"], ["nothing_here.json", "No such file"]),
    (["show", "tiny_models.py"], ["not a valid plan file", "JSON"]),
    (["compare", "ilp.json", "corrupt.json"], ["corrupt.json"]),
    (["compare", "ilp.json"], ["required"]),
])
def test_errors_are_one_line(work, capsys, monkeypatch, argv, fragments):
    d, _ = work
    (d / "corrupt.json").write_text('{"format": "autoshard-plan", "format_version": 1}')
    monkeypatch.chdir(d)
    monkeypatch.syspath_prepend(str(d))
    assert _cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoshard: error: "), err
    for f in fragments:
        assert f in err[0]


def test_debug_reraises(work, monkeypatch):
    d, _ = work
    monkeypatch.chdir(d)
    with pytest.raises(TargetError) as info:
        _cli.main(["plan", "tiny_models.py:broken", "--mesh", "2", "--debug"])
    assert isinstance(info.value.__cause__, RuntimeError)


def test_module_factory_returning_a_workload():
    target = load_target("examples.models:mlp")
    assert target.batch_argnums == (2,) and len(target.args) == 3


def test_saved_plan_is_reused_without_solving(work, monkeypatch):
    d, _ = work
    target = load_target(f"{d / 'tiny_models.py'}:pair")
    plan = autoshard.Plan.from_json((d / "dp.json").read_text())
    import autoshard.api as api

    def no_solving(*a, **k):
        raise AssertionError("a saved plan must not be solved again")
    monkeypatch.setattr(api, "plan_traced", no_solving)
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    fn = autoshard.parallelize(target.fn, mesh=mesh, plan=plan)
    assert fn.plan(*target.args) is plan
    out = fn(*target.args)
    ref = jax.jit(target.fn)(*target.args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out, ref)
    assert out[2].sharding.spec == plan.flat_out_specs[-1]


def test_mismatched_plan_is_refused(work):
    d, _ = work
    target = load_target(f"{d / 'tiny_models.py'}:pair")
    plan = autoshard.Plan.from_json((d / "dp.json").read_text())
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    with pytest.raises(ValueError, match="mesh shape mismatch"):
        autoshard.parallelize(target.fn, mesh=autoshard.make_mesh((4, 2), ("data", "model")),
                              plan=plan)
    with pytest.raises(ValueError, match="axis names mismatch"):
        autoshard.parallelize(target.fn, mesh=autoshard.make_mesh((2, 4), ("x", "y")), plan=plan)
    with pytest.raises(ValueError, match="method mismatch"):
        autoshard.parallelize(target.fn, mesh=mesh, method=autoshard.ZeRO3(), plan=plan)
    fn = autoshard.parallelize(target.fn, mesh=mesh, method=autoshard.DataParallel(), plan=plan)
    params, opt_state, batch = target.args
    bigger = {k: np.concatenate([v, v]) for k, v in batch.items()}
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        fn.plan(params, opt_state, bigger)
    with pytest.raises(TypeError, match="autoshard.Plan"):
        autoshard.parallelize(target.fn, mesh=mesh, plan=json.loads(plan.to_json()))


_EXITING = textwrap.dedent('''
    """Targets that end the process themselves."""
    import sys

    import jax.numpy as jnp

    def exits():
        sys.exit(7)

    def exits_while_traced():
        def fn(x):
            sys.exit(7)
        return fn, (jnp.ones(8),)
''')


@pytest.mark.parametrize("target,fragments", [
    ("exiting.py:exits", ["factory", "sys.exit(7)"]),
    ("exiting.py:exits_while_traced", ["planning", "sys.exit(7)"]),
    ("exits_on_import.py:anything", ["importing", "sys.exit(7)"]),
    ("exits_on_import:anything", ["importing", "sys.exit(7)"]),
])
def test_a_target_calling_sys_exit_is_one_error_line(tmp_path, capsys, monkeypatch, target,
                                                     fragments):
    (tmp_path / "exiting.py").write_text(_EXITING)
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(7)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cli.main(["plan", target, "--mesh", "2", "--no-compare"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoshard: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


@pytest.mark.parametrize("argv,words", [
    (["calibrate", "--mesh", "2", "--out", "missing/cluster.json"], ["missing", "does not exist"]),
    (["calibrate", "--mesh", "2", "--out", "."], ["is a directory"]),
    (["plan", "examples.models:mlp", "--mesh", "2", "--json", "missing/plan.json"],
     ["missing", "does not exist"]),
])
def test_unwritable_outputs_fail_before_any_work(tmp_path, capsys, monkeypatch, argv, words):
    """calibrate measured for 17 s before finding out it could not write its file."""
    monkeypatch.chdir(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("measured or planned before checking the output file")

    monkeypatch.setattr(autoshard, "calibrate", no_work)
    monkeypatch.setattr("autoshard.cli.commands.load_target", no_work)
    assert _cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoshard: error: cannot write"), err
    for word in words:
        assert word in err[0]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_output_to_a_full_device_is_one_error_line(work):
    d, _ = work
    with open("/dev/full", "w") as full:
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, "-m", "autoshard", "show", "ilp.json"], cwd=d,
                              env=env, stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "autoshard: error: cannot write the output: No space left on device"], proc.stderr
