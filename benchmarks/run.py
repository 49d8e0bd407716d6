"""autoshard's ILP plans against the hand-written presets, in one table.

    python -m benchmarks.run [--quick] [--out DIR] [--workloads a,b] [--meshes 8,2x4,8x8]

Meshes (8,) and (2,4) are planned, compiled and executed on 8 virtual CPU devices
(host-cpu cluster model). The (8,8) rows run in a subprocess with 64 virtual devices
and the h100-80gb cluster model: planned and compiled only (nothing is executed).
Writes ``results.json`` and ``RESULTS.md`` to ``--out`` (default: benchmarks/).

Methods: the ILP (ShardParallel), the presets, and — on the workloads in
``PIPELINE_WORKLOADS`` — PipeshardParallel, whose HLO columns aggregate its per-stage
programs (see ``_pipeline_hlo_stats``).
"""
from __future__ import annotations

import os
import re
import sys


def _set_device_count(n: int) -> None:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()


# Must happen before jax is imported anywhere in this process.
if "jax" not in sys.modules:
    _set_device_count(64 if "--_child" in sys.argv else 8)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import autoshard  # noqa: E402
from autoshard.ir import hlo  # noqa: E402
from autoshard.runtime import PipelineLowered  # noqa: E402
from examples import models  # noqa: E402

from .report import write_markdown  # noqa: E402
from .timing import step_times  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# name -> (factory(abstract) -> Workload, description)
WORKLOAD_CONFIGS = {
    "mlp_small": (lambda a: models.mlp(abstract=a),
                  "MLP, 6 layers, batch 64, hidden 64, SGD"),
    "mlp_wide": (lambda a: models.mlp(num_layers=6, batch=32, hidden=1024, abstract=a),
                 "MLP, 6 layers, batch 32, hidden 1024, SGD"),
    "gpt_small": (lambda a: models.gpt(abstract=a),
                  "GPT, 2 layers, d_model 64, seq 16, batch 8, vocab 256, AdamW"),
    "gpt_large": (lambda a: models.gpt(num_layers=4, d_model=256, heads=8, seq=64, batch=8,
                                       vocab=256, abstract=a),
                  "GPT, 4 layers, d_model 256, 8 heads, seq 64, batch 8, vocab 256, AdamW"),
    "moe": (lambda a: models.moe(abstract=a),
            "MoE FFN, 8 experts, d_model 32, d_ff 64, 128 tokens, capacity 4, SGD"),
    "wide_resnet": (lambda a: models.wide_resnet_block(abstract=a),
                    "Wide-ResNet block, batch 8, 16x16, 32->64->32 channels, SGD"),
    "embedding": (lambda a: models.embedding_model(vocab=32768, abstract=a),
                  "Embedding model, vocab 32768, d_model 64, batch 32, SGD"),
}
FULL_WORKLOADS = ("mlp_wide", "gpt_small", "gpt_large", "moe", "wide_resnet", "embedding")
QUICK_WORKLOADS = ("mlp_small", "moe")

MESHES = {"8": ((8,), ("devices",)), "2x4": ((2, 4), ("data", "model")),
          "8x8": ((8, 8), ("data", "model"))}
EXECUTED_MESHES = ("8", "2x4")      # on the 8 virtual CPU devices
PLAN_ONLY_MESHES = ("8x8",)         # subprocess, 64 virtual devices, h100-80gb model
FULL_MESHES = ("8", "2x4", "8x8")
QUICK_MESHES = ("8", "2x4")

PIPELINE = "PipeshardParallel"


def _pipeline_method():
    """The pipeline row's method: 2 micro-batches, the loss cut into 4 layers, the stage DP
    free to choose 1 stage (pure intra-op) or several; each stage sharded by the ILP."""
    return autoshard.PipeshardParallel(num_microbatches=2, num_layers=4,
                                       stage_method=autoshard.ShardParallel(time_limit_s=10.0))


METHODS = {"ShardParallel": autoshard.ShardParallel, "DataParallel": autoshard.DataParallel,
           "ZeRO3": autoshard.ZeRO3, "Megatron": autoshard.Megatron, PIPELINE: _pipeline_method}
PRESETS = ("DataParallel", "ZeRO3", "Megatron")
# Workloads whose loss is a mean of per-sample terms, so a step over micro-batches computes
# the same gradient. moe (expert capacity is per batch of tokens) and wide_resnet (batch-norm
# statistics) change meaning when the batch is split: no pipeline row for them.
PIPELINE_WORKLOADS = ("mlp_small", "mlp_wide", "gpt_small", "gpt_large", "embedding")

ROW_FIELDS = ("workload", "mesh", "mesh_shape", "axis_names", "method", "cluster", "executed",
              "modelled", "hlo", "step_time_s", "step_times_s", "step_time_ratio_to_best_preset",
              "planning_time_s", "compile_time_s", "solver", "plan_collectives", "top_ops",
              "in_specs", "out_specs", "stages", "warnings", "error")
MODELLED_FIELDS = ("total_s", "compute_s", "communication_s", "resharding_s",
                   "peak_memory_bytes")
HLO_FIELDS = ("collectives", "collective_bytes", "collective_count", "flops", "memory",
              "carried")
# pipeline rows' hlo also has these (memory is None there: see _pipeline_hlo_stats)
PIPELINE_HLO_FIELDS = ("aggregation", "busiest_device", "programs")
OVERHEAD_FIELDS = ("workload", "mesh", "method", "parallelized_s", "hand_jit_s", "ratio",
                   "parallelized_times_s", "hand_jit_times_s", "hand_jit_collective_bytes",
                   "error")


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def _shardings(mesh, specs):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)



def _hlo_stats(compiled) -> dict:
    cols = hlo.collective_stats(compiled.as_text())
    return {"collectives": cols,
            "collective_bytes": sum(c["bytes"] for c in cols.values()),
            "collective_count": sum(c["count"] for c in cols.values()),
            "flops": hlo.flops(compiled),
            "memory": hlo.memory(compiled)}


def _pipeline_hlo_stats(f, mesh, args) -> dict:
    """HLO of a pipelined step, which is several programs on sub-meshes.

    Every program a step runs (pre-gradient, each stage's forward and backward, apply) is
    compiled on its own (sub-)mesh. ``collectives``/``collective_bytes``/``flops`` are
    those of the busiest device, per step: Σ over the programs it runs of runs_per_step
    (micro-batches for stage programs) × the program's per-device value. ``memory`` is
    None: micro-batch residuals live between programs, so no one program's
    ``memory_analysis`` is a device's peak. Activations move between stages by
    ``jax.device_put``, outside every HLO. ``programs`` lists each program's own figures.
    """
    lowered = f.lower(*args)
    if not isinstance(lowered, PipelineLowered):  # the planner kept one whole-mesh program
        mesh_ids = tuple(int(d.id) for d in mesh.devices.flat)
        parts = [("whole mesh", 1, mesh_ids, lowered)]
    else:
        parts = [(name, lowered.runs_per_step[name], lowered.device_ids[name], lowered[name])
                 for name in lowered.names]
    programs = []
    for name, runs, devices, program in parts:
        programs.append({"name": name, "runs_per_step": runs, "device_ids": list(devices),
                         **_hlo_stats(program.compile())})
    devices = sorted({d for p in programs for d in p["device_ids"]})
    on = {d: [p for p in programs if d in p["device_ids"]] for d in devices}
    per_step = lambda d, get: sum(p["runs_per_step"] * (get(p) or 0) for p in on[d])  # noqa: E731
    busiest = max(devices, key=lambda d: (per_step(d, lambda p: p["collective_bytes"]),
                                          per_step(d, lambda p: p["flops"]), -d))
    cols = {k: {"count": sum(p["runs_per_step"] * p["collectives"][k]["count"] for p in on[busiest]),
                "bytes": sum(p["runs_per_step"] * p["collectives"][k]["bytes"] for p in on[busiest])}
            for k in hlo.COLLECTIVE_KINDS}
    flops = [per_step(d, lambda p: p["flops"]) for d in devices]
    return {"collectives": cols,
            "collective_bytes": sum(c["bytes"] for c in cols.values()),
            "collective_count": sum(c["count"] for c in cols.values()),
            "flops": max(flops) if any(p["flops"] is not None for p in programs) else None,
            "memory": None,
            "aggregation": "busiest device per step: sum of runs_per_step x per-program value; "
                           "memory n/a (residuals live between programs); stage-to-stage "
                           "transfers (device_put) not included",
            "busiest_device": busiest, "programs": programs}


def _carry_stats(mesh, plan, args) -> dict:
    """Collectives XLA needs to bring this step's outputs back to the next step's inputs.

    A plan may return a carried value (parameter, optimizer state) with a different
    sharding than it takes it in; one step's HLO then leaves that resharding out.
    Pairs outputs and inputs at the same key path (``[0]['w']`` ↔ ``args[0]['w']``)
    whose specs differ and compiles the identity from one sharding to the other.
    """
    leaves = jax.tree_util.tree_leaves(args)
    index = {p: i for i, p in enumerate(plan.in_paths)}
    avals, src, dst = [], [], []
    for path, out_spec in zip(plan.out_paths, plan.flat_out_specs):
        i = index.get("args" + path)
        if i is None or i >= len(leaves) or plan.flat_in_specs[i] == out_spec:
            continue
        avals.append(jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype))
        src.append(NamedSharding(mesh, out_spec))
        dst.append(NamedSharding(mesh, plan.flat_in_specs[i]))
    stats = {"resharded_values": len(avals), "collectives": hlo.collective_stats("")}
    if avals:
        reshard = jax.jit(lambda *xs: xs, in_shardings=tuple(src), out_shardings=tuple(dst))
        stats["collectives"] = hlo.collective_stats(reshard.lower(*avals).compile().as_text())
    stats["collective_bytes"] = sum(c["bytes"] for c in stats["collectives"].values())
    return stats


def _plan_fields(plan) -> dict:
    c = plan.cost
    by_kind: dict[str, dict] = {}
    for col in plan.collectives:
        d = by_kind.setdefault(col.kind, {"count": 0, "seconds": 0.0})
        d["count"] += 1
        d["seconds"] += col.seconds
    solver = None
    if plan.solver is not None:
        s = plan.solver
        solver = {"status": s.status, "gap": s.gap, "solve_time_s": s.solve_time_s,
                  "num_nodes": s.num_nodes, "num_variables": s.num_variables,
                  "num_constraints": s.num_constraints, "planning_time_s": s.planning_time_s}
    return {
        "cluster": plan.cluster.name,
        "modelled": {"total_s": c.total_s, "compute_s": c.compute_s,
                     "communication_s": c.communication_s, "resharding_s": c.resharding_s,
                     "peak_memory_bytes": int(c.peak_memory_bytes)},
        "solver": solver,
        "plan_collectives": by_kind,
        "top_ops": [{"op": o.op, "strategy": o.strategy, "seconds": o.seconds,
                     "source": o.source} for o in plan.top_ops[:6]],
        "in_specs": {p: str(s) for p, s in zip(plan.in_paths, plan.flat_in_specs)},
        "out_specs": {p: str(s) for p, s in zip(plan.out_paths, plan.flat_out_specs)},
        "stages": [{"layers": list(st.layers), "mesh_shape": list(st.mesh_shape),
                    "device_ids": list(st.device_ids), "num_microbatches": st.num_microbatches,
                    "schedule": st.schedule} for st in plan.stages] or None,
        "warnings": list(plan.warnings),
    }


def _empty_row(workload, mesh_name, method, executed) -> dict:
    shape, names = MESHES[mesh_name]
    row = {k: None for k in ROW_FIELDS}
    row.update(workload=workload, mesh=mesh_name, mesh_shape=list(shape),
               axis_names=list(names), method=method, executed=executed,
               step_times_s=[], plan_collectives={}, top_ops=[], in_specs={}, out_specs={},
               warnings=[])
    return row


def bench_workload_mesh(wname: str, w, mesh_name: str, execute: bool, cluster, opts) -> tuple:
    """Every method (the pipeline where it applies) on one workload and mesh; returns
    (rows, overhead row or None)."""
    shape, names = MESHES[mesh_name]
    mesh = autoshard.make_mesh(shape, names)
    rows, overhead = [], None
    for mname, mcls in METHODS.items():
        if mname == PIPELINE and wname not in PIPELINE_WORKLOADS:
            continue
        row = _empty_row(wname, mesh_name, mname, execute)
        rows.append(row)
        try:
            f = autoshard.parallelize(w.fn, mesh=mesh, method=mcls(), cluster=cluster,
                                      batch_argnums=w.batch_argnums)
            t = time.perf_counter()
            plan = f.plan(*w.args)
            row["planning_time_s"] = time.perf_counter() - t
            row.update(_plan_fields(plan))
            t = time.perf_counter()
            if mname == PIPELINE:
                row["hlo"] = _pipeline_hlo_stats(f, mesh, w.args)
            else:
                compiled = f.lower(*w.args).compile()
                row["hlo"] = _hlo_stats(compiled)
                del compiled
            row["compile_time_s"] = time.perf_counter() - t
            row["hlo"]["carried"] = _carry_stats(mesh, plan, w.args)
            if execute:
                args = jax.device_put(w.args, _shardings(mesh, plan.in_specs))
                times = step_times(f, args, opts.warmup, opts.repeats)
                row["step_times_s"] = times
                row["step_time_s"] = statistics.median(times)
                if mname == "ShardParallel":
                    overhead = _overhead(wname, mesh_name, mesh, w, f, plan, args, opts)
                del args
            _log(f"{wname} {mesh_name} {mname}: modelled {row['modelled']['total_s'] * 1e3:.3f} ms, "
                 f"HLO collectives {row['hlo']['collective_bytes']} B, plan "
                 f"{row['planning_time_s']:.1f} s"
                 + (f", step {row['step_time_s'] * 1e3:.2f} ms" if execute else ""))
        except Exception as err:  # noqa: BLE001 - record and go on with the next row
            row["error"] = f"{type(err).__name__}: {err}"
            _log(f"{wname} {mesh_name} {mname}: ERROR {row['error']}")
            if opts.verbose:
                traceback.print_exc()
    preset_times = [r["step_time_s"] for r in rows
                    if r["method"] in PRESETS and r["step_time_s"] is not None]
    if preset_times:
        best = min(preset_times)
        for r in rows:
            if r["step_time_s"] is not None:
                r["step_time_ratio_to_best_preset"] = r["step_time_s"] / best
    return rows, overhead


def _overhead(wname, mesh_name, mesh, w, f, plan, args, opts) -> dict:
    """The parallelized function against jax.jit with the plan's own in/out shardings."""
    row = {k: None for k in OVERHEAD_FIELDS}
    row.update(workload=wname, mesh=mesh_name, method="ShardParallel",
               parallelized_times_s=[], hand_jit_times_s=[])
    try:
        hand = jax.jit(w.fn, in_shardings=tuple(_shardings(mesh, plan.in_specs)),
                       out_shardings=_shardings(mesh, plan.out_specs))
        row["hand_jit_collective_bytes"] = _hlo_stats(hand.lower(*args).compile())[
            "collective_bytes"]
        for fn in (f, hand):
            for _ in range(opts.warmup):
                jax.block_until_ready(fn(*args))
        pt, ht = [], []
        for _ in range(opts.repeats + 2):   # interleaved, so load changes hit both alike
            pt += step_times(f, args, 0, 1)
            ht += step_times(hand, args, 0, 1)
        row.update(parallelized_times_s=pt, hand_jit_times_s=ht,
                   parallelized_s=statistics.median(pt), hand_jit_s=statistics.median(ht))
        row["ratio"] = row["parallelized_s"] / row["hand_jit_s"]
        _log(f"{wname} {mesh_name} overhead: parallelized/jit = {row['ratio']:.3f}")
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {err}"
        _log(f"{wname} {mesh_name} overhead: ERROR {row['error']}")
    return row


def run_local(workloads, meshes, opts, *, plan_only: bool, json_path: Path | None = None):
    cluster = autoshard.cluster_preset("h100-80gb") if plan_only else None
    rows, overheads = [], []
    for wname in workloads:
        factory, _ = WORKLOAD_CONFIGS[wname]
        try:
            w = factory(plan_only)
        except Exception as err:  # noqa: BLE001
            _log(f"{wname}: cannot build workload: {err}")
            for m in meshes:
                for mname in METHODS:
                    if mname == PIPELINE and wname not in PIPELINE_WORKLOADS:
                        continue
                    r = _empty_row(wname, m, mname, not plan_only)
                    r["error"] = f"workload: {type(err).__name__}: {err}"
                    rows.append(r)
            continue
        for m in meshes:
            r, o = bench_workload_mesh(wname, w, m, not plan_only, cluster, opts)
            rows += r
            if o is not None:
                overheads.append(o)
            if json_path is not None:   # partial results survive a crash
                json_path.write_text(json.dumps({"rows": rows, "overhead": overheads}))
        del w
    return rows, overheads


def _run_child(workloads, meshes, opts) -> tuple[list, list, str | None]:
    """Plan-only meshes in a subprocess with 64 virtual devices."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, "-m", "benchmarks.run", "--_child", "--_json", str(out),
               "--workloads", ",".join(workloads), "--meshes", ",".join(meshes)]
        if opts.verbose:
            cmd.append("--verbose")
        env = dict(os.environ)
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=64").strip()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        error = None if proc.returncode == 0 else f"subprocess exited with {proc.returncode}"
        if out.exists():
            data = json.loads(out.read_text())
            return data["rows"], data["overhead"], error
        return [], [], error or "subprocess wrote no results"


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
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (median; ≥5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_json", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)

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
    rows, overheads, errors = [], [], []
    if executed:
        rows, overheads = run_local(workloads, executed, opts, plan_only=False,
                                    json_path=out_dir / "results.json")
    if plan_only:
        _log(f"planning {', '.join(plan_only)} in a subprocess with 64 virtual devices")
        r, o, err = _run_child(workloads, plan_only, opts)
        rows += r
        overheads += o
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
        "repeats": opts.repeats, "warmup": opts.warmup,
        "rows": rows, "overhead": overheads, "errors": errors,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out_dir / "RESULTS.md")
    _log(f"done in {result['wall_time_s']:.0f} s: {out_dir / 'results.json'}, "
         f"{out_dir / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
