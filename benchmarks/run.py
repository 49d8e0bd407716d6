"""autoshard's plans against hand-written ``jax.jit`` baselines, judged on compiled programs.

    python -m benchmarks.run [--quick] [--out DIR] [--workloads a,b] [--meshes 8,2x4,2x2x2,8x8]
                             [--clusters host-cpu,h100-80gb] [--no-timing]

For every workload and mesh three kinds of program are compiled:

* **hand-written baselines** (``benchmarks/baselines.py``): ``jax.jit`` with hand-picked
  ``NamedSharding`` s (DP, FSDP, Megatron TP, their 2-D mixes, expert parallelism) and
  XLA's own propagation inside, no autoshard code;
* **autoshard's presets** (``DataParallel``, ``ZeRO3``, ``Megatron``): fixed layouts run by
  autoshard's runtime;
* **the ILP** (``ShardParallel``), planned for each cluster model, also with the parameters
  and optimizer state donated (``donate_argnums=(0, 1)``, as training loops do) for the
  memory comparison.

Each program is judged by the **yardstick** (``benchmarks/yardstick.py``): a roofline time
from its compiled HLO (``cost_analysis`` flops and bytes, the collectives in its text) and
a cluster's figures, computed without autoshard's cost model. The ILP's plans are also
audited (``plan.audit``: the collectives XLA emits against those priced) and their
modelled time set against their yardstick.

Meshes (8,), (2,4) and (2,2,2) (named ("data", "fsdp", "model"), MaxText's way) compile
and run on 8 virtual CPU devices; with timing on, the baselines, the presets and the ILP
planned for a cluster calibrated on this machine (``autoshard.calibrate``, then
``autoshard.calibrate_kernels`` per workload) are run in interleaved rounds and their
median step times compared. (8,8) compiles in a subprocess with 64 virtual devices;
nothing runs there.
Writes ``results.json`` and ``RESULTS.md`` to ``--out`` (default: benchmarks/).
"""
from __future__ import annotations

import os
import sys

from .host_devices import force_host_devices, with_host_devices

# Must happen before jax is imported anywhere in this process.
force_host_devices(64 if "--_child" in sys.argv else 8)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import autoshard  # noqa: E402
from autoshard.ir import hlo  # noqa: E402
from examples import models  # noqa: E402

from . import baselines  # noqa: E402
from .report import CALIBRATED, write_markdown  # noqa: E402
from .yardstick import yardstick  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# name -> (factory(abstract) -> Workload, description, runs on the CPU when timing)
WORKLOAD_CONFIGS = {
    "mlp_small": (lambda a: models.mlp(abstract=a),
                  "MLP, 6 layers, batch 64, hidden 64, SGD", True),
    "mlp_wide": (lambda a: models.mlp(num_layers=6, batch=32, hidden=1024, abstract=a),
                 "MLP, 6 layers, batch 32, hidden 1024, SGD", True),
    "gpt_small": (lambda a: models.gpt(abstract=a),
                  "GPT, 2 layers, d_model 64, seq 16, batch 8, vocab 256, AdamW", True),
    "gpt_large": (lambda a: models.gpt(num_layers=4, d_model=256, heads=8, seq=64, batch=8,
                                       vocab=256, abstract=a),
                  "GPT, 4 layers, d_model 256, 8 heads, seq 64, batch 8, vocab 256, AdamW", True),
    "gpt_1024": (lambda a: models.gpt(num_layers=2, d_model=1024, heads=16, seq=128, batch=16,
                                      vocab=4096, abstract=a),
                 "GPT, 2 layers, d_model 1024, 16 heads, seq 128, batch 16, vocab 4096, AdamW "
                 "(compiled only: too slow to time on 2 cores)", False),
    "moe": (lambda a: models.moe(abstract=a),
            "MoE FFN, 8 experts, d_model 32, d_ff 64, 128 tokens, capacity 4, SGD", True),
    "wide_resnet": (lambda a: models.wide_resnet_block(abstract=a),
                    "Wide-ResNet block, batch 8, 16x16, 32->64->32 channels, SGD", True),
    "embedding": (lambda a: models.embedding_model(vocab=32768, abstract=a),
                  "Embedding model, vocab 32768, d_model 64, batch 32, SGD", True),
}
FULL_WORKLOADS = ("mlp_wide", "gpt_small", "gpt_large", "gpt_1024", "moe", "wide_resnet",
                  "embedding")
QUICK_WORKLOADS = ("mlp_small", "moe")

MESHES = {"8": ((8,), ("devices",)), "2x4": ((2, 4), ("data", "model")),
          "2x2x2": ((2, 2, 2), ("data", "fsdp", "model")),
          "8x8": ((8, 8), ("data", "model"))}
EXECUTED_MESHES = ("8", "2x4", "2x2x2")      # on the 8 virtual CPU devices
PLAN_ONLY_MESHES = ("8x8",)         # subprocess, 64 virtual devices
FULL_MESHES = ("8", "2x4", "2x2x2", "8x8")
QUICK_MESHES = ("8", "2x4")
CLUSTERS = ("host-cpu", "h100-80gb")
#: timed rounds at most per workload and mesh (--timing-s stops them sooner)
MAX_ROUNDS = 400

ILP = "ShardParallel"
ILP_DONATED = "ShardParallel, donated"   # params and optimizer state donated (memory rows)
PRESETS = ("DataParallel", "ZeRO3", "Megatron")
HAND = "hand:"                     # program names of the hand-written baselines

ROW_FIELDS = ("workload", "mesh", "mesh_shape", "axis_names", "cluster", "program", "kind",
              "modelled", "yardstick", "audit", "planning_time_s", "compile_time_s",
              "in_specs", "error")
MODELLED_FIELDS = ("total_s", "program_s", "compute_s", "communication_s", "resharding_s",
                   "input_s", "peak_memory_bytes", "flops", "bytes_accessed")
YARDSTICK_FIELDS = ("total_s", "compute_s", "memory_s", "collective_s", "flops",
                    "bytes_accessed", "collectives", "peak_memory_bytes")
TIMING_FIELDS = ("workload", "mesh", "programs", "rounds", "error")


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _shardings(mesh, specs):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def _yardstick_fields(y) -> dict:
    return {"total_s": y.total_s, "compute_s": y.compute_s, "memory_s": y.memory_s,
            "collective_s": y.collective_s, "flops": y.flops, "bytes_accessed": y.bytes_accessed,
            "peak_memory_bytes": y.peak_memory_bytes, "kernels": y.kernels,
            "collectives": [{"kind": c.kind, "axes": list(c.axes), "count": c.count,
                             "bytes": c.bytes, "seconds": c.seconds} for c in y.collectives]}


def _modelled_fields(plan) -> dict:
    c = plan.cost
    return {"total_s": c.total_s, "program_s": c.program_s, "compute_s": c.compute_s,
            "communication_s": c.communication_s, "resharding_s": c.resharding_s,
            "input_s": c.input_s, "peak_memory_bytes": int(c.peak_memory_bytes),
            "flops": c.flops, "bytes_accessed": c.bytes_accessed}


def _row(wname, mesh_name, cluster, program, kind) -> dict:
    shape, names = MESHES[mesh_name]
    row = {k: None for k in ROW_FIELDS}
    row.update(workload=wname, mesh=mesh_name, mesh_shape=list(shape), axis_names=list(names),
               cluster=cluster, program=program, kind=kind, in_specs={})
    return row


def _guarded(row, opts, work) -> None:
    """Run ``work(row)``; a failure becomes the row's error and the run goes on."""
    try:
        work(row)
    except Exception as err:  # noqa: BLE001 - record and go on with the next row
        row["error"] = f"{type(err).__name__}: {err}"
        _log(f"{row['workload']} {row['mesh']} {row['cluster']} {row['program']}: ERROR "
             f"{row['error']}")
        if opts.verbose:
            traceback.print_exc()


def bench_workload_mesh(wname, w, mesh_name, clusters: dict, opts, timing: bool):
    """Every program on one workload and mesh, judged under every cluster of ``clusters``
    (name -> Cluster); returns (rows, timing row or None)."""
    shape, names = MESHES[mesh_name]
    mesh = autoshard.make_mesh(shape, names)
    rows, runnable = [], {}

    try:
        strategies = baselines.baseline_names(wname, shape)
    except ValueError as err:  # no rule table for this workload: no hand-written rows
        _log(f"{wname}: {err}")
        strategies = []
    for strategy in strategies:
        name = HAND + strategy
        start = time.perf_counter()
        try:
            fn, in_shardings = baselines.baseline_jit(w, wname, mesh, strategy, donate=False)
            compiled = fn.lower(*w.args).compile()
            error = None
        except Exception as err:  # noqa: BLE001
            compiled, error = None, f"{type(err).__name__}: {err}"
        seconds = time.perf_counter() - start
        for cname, cluster in clusters.items():
            row = _row(wname, mesh_name, cname, name, "hand")
            row.update(compile_time_s=seconds, error=error)
            if compiled is not None:
                _guarded(row, opts, lambda r: r.update(
                    yardstick=_yardstick_fields(yardstick(compiled, shape, cluster))))
            rows.append(row)
        if compiled is not None and timing:
            runnable[name] = (fn, in_shardings)

    compiled_presets: dict = {}
    for cname, cluster in clusters.items():
        for program in (ILP, ILP_DONATED) + PRESETS:
            mname = ILP if program == ILP_DONATED else program
            kind = {ILP: "ilp", ILP_DONATED: "ilp-donated"}.get(program, "preset")
            row = _row(wname, mesh_name, cname, program, kind)
            donate = (0, 1) if program == ILP_DONATED else ()

            def work(row, mname=mname, cluster=cluster, cname=cname, donate=donate,
                     program=program):
                f = autoshard.parallelize(w.fn, mesh=mesh, method=getattr(autoshard, mname)(),
                                          cluster=cluster, batch_argnums=w.batch_argnums,
                                          donate_argnums=donate)
                start = time.perf_counter()
                plan = f.plan(*w.args)
                row["planning_time_s"] = time.perf_counter() - start
                row["modelled"] = _modelled_fields(plan)
                row["in_specs"] = {p: str(s) for p, s in zip(plan.in_paths, plan.flat_in_specs)}
                start = time.perf_counter()
                # a preset's program does not depend on the cluster: compiled once
                compiled = compiled_presets.get(mname) if mname != ILP else None
                if compiled is None:
                    compiled, text = hlo.fresh_compile(f.lower(*w.args))
                    if mname != ILP:
                        compiled_presets[mname] = (compiled, text)
                else:
                    compiled, text = compiled
                row["compile_time_s"] = time.perf_counter() - start
                row["yardstick"] = _yardstick_fields(yardstick(compiled, shape, cluster))
                found = plan.audit(compiled, text)
                row["audit"] = {"ok": found.ok, "differences": list(found.differences)}
                if timing and program != ILP_DONATED and (mname != ILP or cname == CALIBRATED) \
                        and mname not in runnable:
                    runnable[mname] = (f, _shardings(mesh, plan.in_specs))
                _log(f"{wname} {mesh_name} {cname} {program}: modelled "
                     f"{plan.cost.program_s * 1e3:.3f} ms, yardstick "
                     f"{row['yardstick']['total_s'] * 1e3:.3f} ms, audit "
                     f"{'ok' if found.ok else len(found.differences)}")

            _guarded(row, opts, work)
            rows.append(row)
    timing_row = _time_programs(wname, mesh_name, w, runnable, opts) if timing else None
    return rows, timing_row


def _time_programs(wname, mesh_name, w, runnable: dict, opts) -> dict:
    """Median step time of each program, measured in interleaved rounds (one step of each
    per round, so a change of load hits all alike; each round starts one program later,
    so none always runs first)."""
    row = {"workload": wname, "mesh": mesh_name, "programs": {}, "rounds": 0, "error": None}
    try:
        placed = {name: (fn, jax.device_put(w.args, shardings))
                  for name, (fn, shardings) in runnable.items()}
        for _ in range(opts.warmup):
            for fn, args in placed.values():
                jax.block_until_ready(fn(*args))
        times = {name: [] for name in placed}
        started, rounds = time.perf_counter(), 0
        # at least --repeats rounds, then more while --timing-s lasts: on 2 cores a median of
        # 7 rounds of a 15 ms step moved 10% between runs (200 rounds: within 1%)
        while rounds < opts.repeats or (time.perf_counter() - started < opts.timing_s
                                        and rounds < MAX_ROUNDS):
            order = list(placed.items())
            for name, (fn, args) in order[rounds % len(order):] + order[:rounds % len(order)]:
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name].append(time.perf_counter() - start)
            rounds += 1
        row["rounds"] = rounds
        row["programs"] = {name: {"step_time_s": statistics.median(t), "step_times_s": t}
                           for name, t in times.items()}
        _log(f"{wname} {mesh_name} step times ({rounds} rounds): " + ", ".join(
            f"{n} {v['step_time_s'] * 1e3:.2f} ms" for n, v in row["programs"].items()))
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {err}"
        _log(f"{wname} {mesh_name} timing: ERROR {row['error']}")
    return row


def run_local(workloads, meshes, opts, *, plan_only: bool, json_path: Path | None = None,
              with_kernels: dict | None = None):
    """(rows, timings) of ``workloads`` on ``meshes``. Each mesh that runs is calibrated
    once (``autoshard.calibrate``); ``with_kernels``: "workload mesh" -> that cluster with
    the workload's kernels timed (``autoshard.calibrate_kernels``), the cluster its
    calibrated rows are planned for, filled in as they are measured."""
    rows, timings, calibrated = [], [], {}
    with_kernels = {} if with_kernels is None else with_kernels
    for wname in workloads:
        factory, _, runs = WORKLOAD_CONFIGS[wname]
        timing = not plan_only and runs and not opts.no_timing
        try:
            w = factory(not timing)
        except Exception as err:  # noqa: BLE001
            _log(f"{wname}: cannot build workload: {err}")
            continue
        for m in meshes:
            clusters = {c: autoshard.cluster_preset(c) for c in opts.clusters}
            if timing:
                mesh = autoshard.make_mesh(*MESHES[m])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if m not in calibrated:
                        _log(f"calibrating the {m} mesh of this machine")
                        calibrated[m] = autoshard.calibrate(mesh, budget_s=opts.calibration_s)
                    clusters[CALIBRATED] = with_kernels[f"{wname} {m}"] = \
                        autoshard.calibrate_kernels(w.fn, w.args, mesh=mesh,
                                                    cluster=calibrated[m], budget_s=opts.kernel_s)
            r, t = bench_workload_mesh(wname, w, m, clusters, opts, timing)
            rows += r
            if t is not None:
                timings.append(t)
            if json_path is not None:   # partial results survive a crash
                json_path.write_text(json.dumps({"rows": rows, "timing": timings}))
        del w
    return rows, timings


def _run_child(workloads, meshes, opts) -> tuple[list, str | None]:
    """Plan-only meshes in a subprocess with 64 virtual devices."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, "-m", "benchmarks.run", "--_child", "--_json", str(out),
               "--workloads", ",".join(workloads), "--meshes", ",".join(meshes),
               "--clusters", ",".join(opts.clusters)]
        if opts.verbose:
            cmd.append("--verbose")
        env = dict(os.environ)
        env["XLA_FLAGS"] = with_host_devices(env.get("XLA_FLAGS", ""), 64)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        error = None if proc.returncode == 0 else f"subprocess exited with {proc.returncode}"
        if out.exists():
            return json.loads(out.read_text())["rows"], error
        return [], error or "subprocess wrote no results"


def _parse_list(text, allowed, what):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small workloads ({', '.join(QUICK_WORKLOADS)}) on meshes "
                        f"{', '.join(QUICK_MESHES)} only")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent),
                   help="directory for results.json and RESULTS.md (default: benchmarks/)")
    p.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(WORKLOAD_CONFIGS))
    p.add_argument("--meshes", help="comma-separated subset of: " + ", ".join(MESHES))
    p.add_argument("--clusters", default=",".join(CLUSTERS),
                   help="cluster models to plan and judge with (default: all of "
                        f"{', '.join(CLUSTERS)})")
    p.add_argument("--no-timing", action="store_true",
                   help="compile and judge only: no calibration, no step times")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds at least (median)")
    p.add_argument("--timing-s", type=float, default=20.0,
                   help="seconds of timed rounds per workload and mesh, after --repeats "
                        f"rounds (at most {MAX_ROUNDS} rounds; default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--calibration-s", type=float, default=10.0,
                   help="seconds autoshard.calibrate may take per mesh (default 10)")
    p.add_argument("--kernel-s", type=float, default=20.0,
                   help="seconds autoshard.calibrate_kernels may take per workload and mesh "
                        "(default 20)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_json", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.clusters = _parse_list(opts.clusters, CLUSTERS, "cluster")

    workloads = _parse_list(opts.workloads, WORKLOAD_CONFIGS, "workload") if opts.workloads \
        else list(QUICK_WORKLOADS if opts.quick else FULL_WORKLOADS)
    meshes = _parse_list(opts.meshes, MESHES, "mesh") if opts.meshes \
        else list(QUICK_MESHES if opts.quick else FULL_MESHES)

    if opts._child:
        run_local(workloads, meshes, opts, plan_only=True, json_path=Path(opts._json))
        return 0

    if jax.device_count() < 8 and any(m in EXECUTED_MESHES for m in meshes):
        raise SystemExit(f"need 8 devices, have {jax.device_count()}: run as "
                         f"`python -m benchmarks.run` so XLA_FLAGS is set before jax loads")
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    executed = [m for m in meshes if m in EXECUTED_MESHES]
    plan_only = [m for m in meshes if m in PLAN_ONLY_MESHES]
    rows, timings, errors, with_kernels = [], [], [], {}
    if executed:
        rows, timings = run_local(workloads, executed, opts, plan_only=False,
                                  json_path=out_dir / "results.json", with_kernels=with_kernels)
    if plan_only:
        _log(f"compiling {', '.join(plan_only)} in a subprocess with 64 virtual devices")
        r, err = _run_child(workloads, plan_only, opts)
        rows += r
        if err:
            errors.append(f"plan-only subprocess: {err}")
    result = {
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        "quick": opts.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_time_s": time.time() - started,
        "environment": {"jax": jax.__version__, "python": platform.python_version(),
                        "platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "devices": jax.device_count(), "backend": jax.default_backend()},
        "workloads": {w: WORKLOAD_CONFIGS[w][1] for w in workloads},
        "meshes": {m: {"shape": list(MESHES[m][0]), "axis_names": list(MESHES[m][1]),
                       "executed": m in EXECUTED_MESHES} for m in meshes},
        "clusters": list(opts.clusters),
        # the calibrated rows' cluster per workload and mesh, its kernels timed, to plan
        # them again: autoshard.Cluster.from_json
        "calibrated_clusters": {k: json.loads(c.to_json()) for k, c in with_kernels.items()},
        "repeats": opts.repeats, "warmup": opts.warmup, "timing_s": opts.timing_s,
        "rows": rows, "timing": timings, "errors": errors,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out_dir / "RESULTS.md")
    _log(f"done in {result['wall_time_s']:.0f} s: {out_dir / 'results.json'}, "
         f"{out_dir / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
