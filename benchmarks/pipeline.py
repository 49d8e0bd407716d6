"""Pipeline (PipeshardParallel) against pure intra-op (ShardParallel), in one run.

    python -m benchmarks.pipeline [--quick] [--modelled-only [--modelled NAMES]] [--repeats N]
                                  [--out FILE]

For a deep, narrow MLP and for the GPT example, on the 8 virtual CPU devices (meshes (8,)
and (2,4), host-cpu cluster model): the modelled cost per step of each plan and the
measured CPU step time (median over ``--repeats`` steps after a warm-up), both as ratios
against ShardParallel on the same mesh in the same run, plus plain ``jax.jit`` on one
device for scale. Then the gradient all-reduces per step of a 2-stage GPT at 1, 4 and 16
micro-batches, counted in its compiled programs, with and without the once-per-step
reduction; and, planned only, a deep MLP and two GPTs on a 4x8 mesh priced for H100 nodes.
Appends one dated markdown section to ``--out`` (default benchmarks/PIPELINE.md).

The host has few cores shared by 8 virtual devices, so measured times reward fewer, larger
programs; the modelled cost is what a real cluster would see.
"""
from __future__ import annotations

import os
import sys

from .host_devices import force_host_devices

force_host_devices(8)   # before jax is imported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import jax  # noqa: E402

import autoshard  # noqa: E402
from autoshard.ir.hlo import collective_stats  # noqa: E402
from autoshard.pipeline import build as pipeline_build  # noqa: E402
from autoshard.pipeline import planner as pipeline_planner  # noqa: E402
from examples import models  # noqa: E402

from .timing import step_times  # noqa: E402

WORKLOADS = {
    "deep_mlp": (lambda: models.mlp(num_layers=16, batch=256, hidden=128),
                 "MLP, 16 layers, hidden 128, batch 256, SGD (deep and narrow)"),
    "gpt": (lambda: models.gpt(num_layers=4, batch=16, seq=32, d_model=64, heads=4, vocab=256),
            "GPT, 4 blocks, d_model 64, seq 32, batch 16, vocab 256, AdamW"),
}
QUICK = {
    "deep_mlp": (lambda: models.mlp(num_layers=8, batch=64, hidden=32),
                 "MLP, 8 layers, hidden 32, batch 64, SGD"),
}
MESHES = {"8": ((8,), ("data",)), "2x4": ((2, 4), ("data", "model"))}
# gradient traffic per step against the number of micro-batches (compiled on the 8 CPU
# devices, planned for H100s, where the stages come out data-parallel)
TRAFFIC = ("gpt_b64", lambda: models.gpt(num_layers=4, batch=64, seq=32, d_model=64, heads=4,
                                         vocab=256),
           "GPT, 4 blocks, d_model 64, seq 32, batch 64, vocab 256, AdamW", (8,), "h100-80gb")
# planned only (no devices), on 4 nodes x 8 H100s, where stage boundaries can sit on the
# slow links between nodes: a deep MLP and a GPT two orders of magnitude larger than the
# CPU one
MODELLED = (
    ("deep_mlp_wide", lambda: models.mlp(num_layers=16, batch=512, hidden=2048, abstract=True),
     "MLP, 16 layers, hidden 2048, batch 512, SGD", (4, 8), "h100-80gb"),
    ("gpt_wide", lambda: models.gpt(num_layers=8, batch=64, seq=512, d_model=1024, heads=16,
                                    vocab=8192, abstract=True),
     "GPT, 8 blocks, d_model 1024, seq 512, batch 64, vocab 8192, AdamW", (4, 8), "h100-80gb"),
    # weight-heavy: 1.7 B parameters against 8 k tokens a step, so a single program's
    # gradient reduction (or weight gathering) crosses the slow links between nodes
    ("gpt_heavy", lambda: models.gpt(num_layers=8, batch=16, seq=512, d_model=4096, heads=32,
                                     vocab=32000, abstract=True),
     "GPT, 8 blocks, d_model 4096, seq 512, batch 16, vocab 32000, AdamW", (4, 8), "h100-80gb"),
)


def _methods(quick: bool):
    stage = autoshard.ShardParallel(time_limit_s=2.0)
    whole = autoshard.ShardParallel(time_limit_s=10.0 if quick else 30.0)
    yield "ShardParallel", whole
    for B in ((4,) if quick else (4, 8)):
        yield f"Pipeshard B={B} (DP)", autoshard.PipeshardParallel(
            num_microbatches=B, num_layers=4, stage_method=stage)
        yield f"Pipeshard B={B} 2 stages", autoshard.PipeshardParallel(
            num_microbatches=B, num_stages=2, num_layers=4, stage_method=stage)


def _audit_text(row) -> str:
    """A row's audit (``step.audit``: every program of a pipeline against its plan)."""
    return "clean" if not row["audit"] else f"{len(row['audit'])} difference(s)"


def _median_time(fn, args, repeats: int) -> float:
    return statistics.median(step_times(fn, args, warmup=1, repeats=repeats))


def _describe(plan) -> str:
    if not plan.stages:
        return "1 program on the whole mesh"
    if len(plan.stages) == 1 and plan.stages[0].num_microbatches == 1:
        return "pure intra-op chosen: 1 program on the whole mesh"
    return "; ".join(f"L{st.layers[0]}-{st.layers[-1]} on {'x'.join(map(str, st.mesh_shape))}"
                     for st in plan.stages)


def run(quick: bool, repeats: int) -> list[dict]:
    rows = []
    for name, (factory, description) in (QUICK if quick else WORKLOADS).items():
        w = factory()
        single = _median_time(jax.jit(w.fn), w.args, repeats)
        for mesh_name, (shape, names) in MESHES.items():
            mesh = autoshard.make_mesh(shape, names)
            base = None
            for label, method in _methods(quick):
                step = autoshard.parallelize(w.fn, mesh=mesh, method=method,
                                             batch_argnums=w.batch_argnums)
                t = time.perf_counter()
                plan = step.plan(*w.args)
                planning = time.perf_counter() - t
                measured = _median_time(step, w.args, repeats)
                report = step.audit(*w.args)
                row = dict(workload=name, description=description, mesh=mesh_name,
                           method=label, modelled_s=plan.cost.total_s, measured_s=measured,
                           planning_s=planning, stages=_describe(plan), jit_1dev_s=single,
                           audit=list(report.differences))
                if base is None:
                    base = row
                row["modelled_ratio"] = row["modelled_s"] / base["modelled_s"]
                row["measured_ratio"] = row["measured_s"] / base["measured_s"]
                rows.append(row)
                print(f"{name:9} {mesh_name:4} {label:24} modelled {row['modelled_s']*1e3:8.3f} ms "
                      f"(x{row['modelled_ratio']:.2f})  measured {measured*1e3:8.2f} ms "
                      f"(x{row['measured_ratio']:.2f})  plan {planning:5.1f} s  {row['stages']}"
                      f"  audit {_audit_text(row)}", flush=True)
    return rows


@contextlib.contextmanager
def per_microbatch_reduction():
    """Ablation: plan and build pipelines that all-reduce their gradients in every
    micro-batch's backward, as autoshard did before gradients were reduced once per step
    (autoshard/pipeline/partial_grads.py)."""
    with mock.patch.object(pipeline_planner, "stage_partial_gradients", lambda *a: ()), \
            mock.patch.object(pipeline_build, "stage_partial_gradients", lambda *a: ()):
        yield


def _gradient_all_reduces(compiled) -> tuple[int, int]:
    """(count, bytes) of the all-reduces one step runs outside the stages' forward programs
    (a forward's all-reduce is the loss's mean), from the compiled HLO."""
    count = nbytes = 0
    for name in compiled.names:
        if "forward" not in name:
            stats = collective_stats(compiled[name].as_text())["all-reduce"]
            count += compiled.runs_per_step[name] * stats["count"]
            nbytes += compiled.runs_per_step[name] * stats["bytes"]
    return count, nbytes


def run_traffic() -> list[dict]:
    """:data:`TRAFFIC`'s pipeline at B = 1, 4, 16 micro-batches, gradients reduced once per
    step and (ablation) in every micro-batch: compiled all-reduces per step and the
    modelled cost."""
    name, factory, description, shape, cluster_name = TRAFFIC
    w = factory()
    mesh = autoshard.make_mesh(shape, ("data",))
    rows = []
    for B in (1, 4, 16):
        for once in (True, False):
            method = autoshard.PipeshardParallel(num_microbatches=B, num_stages=2,
                                                 num_layers=4)
            with contextlib.nullcontext() if once else per_microbatch_reduction():
                step = autoshard.parallelize(w.fn, mesh=mesh, method=method,
                                             cluster=autoshard.cluster_preset(cluster_name),
                                             batch_argnums=w.batch_argnums)
                t = time.perf_counter()
                plan = step.plan(*w.args)
                planning = time.perf_counter() - t
                count, nbytes = _gradient_all_reduces(step.lower(*w.args).compile())
            row = dict(workload=name, description=description, cluster=cluster_name,
                       mesh="x".join(map(str, shape)), B=B,
                       reduction="once per step" if once else "every micro-batch",
                       all_reduces=count, all_reduce_bytes=nbytes,
                       modelled_s=plan.cost.total_s, planning_s=planning,
                       stages=_describe(plan))
            rows.append(row)
            print(f"{name} B={B:2} {row['reduction']:17} {count:3} all-reduces "
                  f"{nbytes / 2**20:8.2f} MiB  modelled {row['modelled_s'] * 1e6:8.1f} us  "
                  f"{row['stages']}", flush=True)
    return rows


def markdown_traffic(rows) -> str:
    first = rows[0]
    lines = [f"### {first['workload']}: gradient traffic per step against micro-batches", "",
             f"{first['description']}; mesh {first['mesh']}, 2 stages, planned for the "
             f"{first['cluster']} cluster model and compiled here. All-reduces per step outside "
             f"the stages' forward programs (those are the loss's mean), counted in the "
             f"compiled programs times the runs per step; \"every micro-batch\" is the "
             f"ablation without the once-per-step reduction.", "",
             "| B | gradients reduced | all-reduces / step | all-reduce bytes / step | "
             "modelled / step | planning | stages |",
             "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['B']} | {r['reduction']} | {r['all_reduces']} | "
                     f"{r['all_reduce_bytes'] / 2**20:.2f} MiB | {r['modelled_s'] * 1e6:.1f} µs | "
                     f"{r['planning_s']:.1f} s | {r['stages']} |")
    return "\n".join(lines) + "\n"


def run_modelled(names: Sequence[str] | None = None) -> list[list[dict]]:
    """Per :data:`MODELLED` workload (those named in ``names``; default all), its rows."""
    return [_run_modelled(*workload) for workload in MODELLED
            if names is None or workload[0] in names]


def _run_modelled(name, factory, description, shape, cluster_name) -> list[dict]:
    w = factory()
    mesh = autoshard.abstract_mesh(shape, ("data", "model"))
    cluster = autoshard.cluster_preset(cluster_name)
    methods = [("ShardParallel", autoshard.ShardParallel(time_limit_s=10.0)),
               ("Megatron", autoshard.Megatron()), ("DataParallel", autoshard.DataParallel())]
    for B in (4, 16):
        for once in (True, False):
            methods.append((f"Pipeshard B={B} (DP)" + ("" if once else ", gradients reduced "
                                                       "every micro-batch (ablation)"),
                            autoshard.PipeshardParallel(
                                num_microbatches=B, num_layers=4,
                                stage_method=autoshard.ShardParallel(time_limit_s=2.0))))
    rows, base = [], None
    for label, method in methods:
        t = time.perf_counter()
        with per_microbatch_reduction() if "ablation" in label else contextlib.nullcontext():
            plan = autoshard.parallelize(w.fn, mesh=mesh, method=method, cluster=cluster,
                                         batch_argnums=w.batch_argnums).plan(*w.args)
        row = dict(workload=name, description=description, cluster=cluster_name,
                   mesh="x".join(map(str, shape)), method=label, modelled_s=plan.cost.total_s,
                   planning_s=time.perf_counter() - t, stages=_describe(plan))
        base = base or row
        row["modelled_ratio"] = row["modelled_s"] / base["modelled_s"]
        rows.append(row)
        print(f"{name} {row['mesh']} {label:22} modelled {row['modelled_s'] * 1e3:.3f} ms "
              f"(x{row['modelled_ratio']:.2f})  {row['stages']}", flush=True)
    return rows


def markdown_modelled(tables) -> str:
    return "\n".join(_markdown_modelled(rows) for rows in tables)


def _markdown_modelled(rows) -> str:
    first = rows[0]
    lines = [f"### {first['workload']}: {first['description']} — planned only, "
             f"{first['cluster']} cluster model, mesh {first['mesh']} (4 nodes × 8 GPUs)", "",
             "| method | modelled / step | × intra-op | planning | stages |",
             "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['modelled_s'] * 1e3:.3f} ms | "
                     f"{r['modelled_ratio']:.2f} | {r['planning_s']:.1f} s | {r['stages']} |")
    return "\n".join(lines) + "\n"


def markdown(rows, quick: bool, repeats: int) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Pipeline vs intra-op — {now}{' (quick)' if quick else ''}", "",
             f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} CPU cores shared by "
             f"8 virtual devices; host-cpu cluster model; median of {repeats} steps. Ratios are "
             f"against ShardParallel (pure intra-op, one program, full batch) on the same mesh "
             f"in this run; below 1 is better. Audit: `step.audit` (a pipeline's programs each "
             f"against the part of the plan that prices it), clean or the differences it "
             f"lists below the table.", ""]
    for name in dict.fromkeys(r["workload"] for r in rows):
        first = next(r for r in rows if r["workload"] == name)
        lines += [f"### {name}: {first['description']}", "",
                  f"plain jax.jit on one device: {first['jit_1dev_s'] * 1e3:.2f} ms per step", "",
                  "| mesh | method | modelled / step | × intra-op | measured CPU / step | "
                  "× intra-op | planning | stages | audit |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        found = []
        for r in rows:
            if r["workload"] != name:
                continue
            lines.append(f"| {r['mesh']} | {r['method']} | {r['modelled_s'] * 1e3:.3f} ms | "
                         f"{r['modelled_ratio']:.2f} | {r['measured_s'] * 1e3:.2f} ms | "
                         f"{r['measured_ratio']:.2f} | {r['planning_s']:.1f} s | {r['stages']} | "
                         f"{_audit_text(r)} |")
            found += [f"- {r['mesh']}, {r['method']}: {d}" for d in r["audit"]]
        lines += ["", *found] if found else []
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small MLP, fewer methods")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).with_name("PIPELINE.md")))
    parser.add_argument("--modelled-only", action="store_true",
                        help="only the planned-only section (4x8 mesh, h100-80gb model)")
    parser.add_argument("--modelled", default=None,
                        help="comma-separated planned-only workloads to run (default all: "
                             + ", ".join(w[0] for w in MODELLED) + ")")
    parser.add_argument("--traffic-only", action="store_true",
                        help="only the gradient traffic section (B = 1, 4, 16)")
    args = parser.parse_args(argv)
    if args.traffic_only:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = f"## Pipeline gradient traffic — {now}\n\n" + markdown_traffic(run_traffic()) \
            + "\n"
    elif args.modelled_only:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = f"## Pipeline vs intra-op, modelled only — {now}\n\n" + \
            markdown_modelled(run_modelled(args.modelled and args.modelled.split(","))) + "\n"
    else:
        rows = run(args.quick, args.repeats)
        text = markdown(rows, args.quick, args.repeats)
        if not args.quick:
            text += markdown_traffic(run_traffic()) + "\n" + \
                markdown_modelled(run_modelled()) + "\n"
    path = Path(args.out)
    header = "" if path.exists() else (
        "# Pipeline benchmark results\n\nAppended by `python -m benchmarks.pipeline`; newest "
        "last.\n\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write(header + text)
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
