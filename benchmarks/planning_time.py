"""Planning time against depth: a GPT train step (adamw) planned on an abstract (2, 4) mesh.

    python -m benchmarks.planning_time [--layers 6,12,24,48] [--d-model 1024] [--seq 1024]
                                       [--time-limit 10] [--out benchmarks/PLANNING_TIME.md]
    python -m benchmarks.planning_time --scale [--out benchmarks/PLANNING_SCALE.md]

``--scale``: LLaMA-7B-, 13B- and 70B-shaped GPTs (seq 2048, vocab 32000, batch 64) on
abstract 8×8 and 8×8×8 meshes of the h100-80gb cluster (its memory budget on), each row
with its phase times, problem size, the plan's modelled cost and peak per device, and the
presets' modelled costs beside it; then the 70B-shaped rows at 40 and 80 layers (with and
without the budget; written as a Python loop over the blocks, and "scanned": a ``lax.scan``
over their stacked weights) each planned ``DEPTH_ROUNDS`` times, and the ratio of their
medians.

Per depth: jaxpr equations, ILP nodes before and after tying repeated layers, CP-SAT
variables and constraints, seconds per phase (trace, strategies + costs, solve) and in
total, and the modelled cost of the plan. ShapeDtypeStruct arguments: nothing is
allocated, no device is touched. Timings are what this machine measured, not targets.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import subprocess
import sys
import time

import jax

import autoshard
from autoshard import api as _api
from autoshard import ilp
from autoshard.intra import planner as _planner
from autoshard.intra import problem as _problem
from examples import models


def measure(layers: int, d_model: int, seq: int, heads: int, vocab: int, time_limit: float,
            *, batch: int = 8, mesh_shape=(2, 4), cluster=None):
    """One GPT row: phase times, problem size, the plan's cost and the presets' costs."""
    workload = models.gpt(num_layers=layers, d_model=d_model, seq=seq, heads=heads, vocab=vocab,
                          batch=batch, abstract=True)
    return dict(measure_workload(workload, time_limit, mesh_shape=mesh_shape, cluster=cluster),
                layers=layers)


def measure_workload(workload, time_limit: float, *, mesh_shape=(2, 4), cluster=None) -> dict:
    """``measure`` for any (abstract) workload: what ``step.plan(*args)`` costs a user,
    split into its phases (the trace, building the graph, solving, and the rest: pricing,
    starting plans, the plan record)."""
    mesh = autoshard.abstract_mesh(mesh_shape, ("data", "fsdp", "model")[-len(mesh_shape):])
    solve_s, graph_s, trace_s, traced = [], [], [], []
    sizes = {}
    real_solve, real_build_graph, real_trace = \
        ilp.solve_intra_op, _problem.build_graph, _api.trace

    def timed(phase_s, fn, *args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        phase_s.append(time.perf_counter() - t)
        return result

    def timed_trace(*args, **kwargs):
        traced.append(timed(trace_s, real_trace, *args, **kwargs))
        return traced[-1]

    def timed_solve(request, **options):
        result = timed(solve_s, real_solve, request, **options)
        sizes.update(nodes=request.num_nodes, tied=result.stats.tied_classes or request.num_nodes,
                     variables=result.num_variables, constraints=result.num_constraints,
                     lp_s=result.stats.lp_time_s, how=result.stats.solver_status)
        return result

    _planner.ilp.solve_intra_op = timed_solve
    _problem.build_graph = functools.partial(timed, graph_s, real_build_graph)
    _api.trace = timed_trace
    try:
        step = autoshard.parallelize(workload.fn, mesh=mesh, cluster=cluster,
                                     method=autoshard.ShardParallel(time_limit_s=time_limit))
        start = time.perf_counter()
        plan = step.plan(*workload.args)
        total = time.perf_counter() - start
    finally:
        _planner.ilp.solve_intra_op = real_solve
        _problem.build_graph = real_build_graph
        _api.trace = real_trace
    return dict(equations=len(traced[0].program.eqns), **sizes,
                trace_s=sum(trace_s), strategies_s=sum(graph_s),
                costs_s=total - sum(trace_s) - sum(solve_s) - sum(graph_s),
                solve_s=sum(solve_s), total_s=total, cost_ms=plan.cost.total_s * 1e3,
                status=plan.solver.status, rounds=plan.solver.neighbourhood_rounds,
                peak_gib=plan.cost.peak_memory_bytes / 2**30,
                presets={a.method: a.total_s * 1e3 for a in plan.alternatives})


#: (name, layers, d_model, heads, mesh shape) of the ``--scale`` GPT rows; "no budget":
#: the cluster's device memory made unlimited, so that depth alone changes between the two
#: 70B-shaped rows (at 80 layers the h100-80gb budget binds, which is one more solve)
SCALE_ROWS = (
    ("LLaMA-7B-shaped", 32, 4096, 32, (8, 8)),
    ("LLaMA-7B-shaped", 32, 4096, 32, (8, 8, 8)),
    ("13B-shaped", 40, 5120, 40, (8, 8, 8)),
    ("70B-shaped, half depth", 40, 8192, 64, (8, 8, 8)),
    ("70B-shaped", 80, 8192, 64, (8, 8, 8)),
    ("70B-shaped", 80, 8192, 64, (4, 8, 16)),
    ("70B-shaped, half depth, no budget", 40, 8192, 64, (8, 8, 8)),
    ("70B-shaped, no budget", 80, 8192, 64, (8, 8, 8)),
    ("70B-shaped, scanned, half depth", 40, 8192, 64, (8, 8, 8)),
    ("70B-shaped, scanned", 80, 8192, 64, (8, 8, 8)),
    ("70B-shaped, scanned, half depth, no budget", 40, 8192, 64, (8, 8, 8)),
    ("70B-shaped, scanned, no budget", 80, 8192, 64, (8, 8, 8)),
)
#: (half depth, full depth) pairs of ``SCALE_ROWS`` indices whose planning times the
#: ``--scale`` table compares: 2x the layers, same width, mesh and budget; "scanned": the
#: blocks' weights stacked and run by a ``lax.scan`` (``models.gpt(scan_layers=True)``, as
#: MaxText writes a model), planned once as a loop (``intra.loop_plans``)
DEPTH_PAIRS = ((3, 4), (6, 7), (8, 9), (10, 11))
#: times each row of a depth pair is planned (in alternating fresh processes): one such
#: plan's time varies by ±20 % on a shared 2-core machine, so the ratio is of medians
DEPTH_ROUNDS = 3
#: issue 23's goal: twice the layers at most this many times the planning time
DEPTH_GOAL = 1.3
#: the ``--scale`` MoE row: one GShard-style layer, 8 experts, d_model 4096, on 8x8
MOE_ROW = dict(batch=64, seq=2048, d_model=4096, experts=8, d_ff=16384, capacity=320)


def scale_rows():
    """(name, layers, d_model, mesh shape, workload factory, cluster) of each ``--scale`` row."""
    cluster = autoshard.cluster_preset("h100-80gb")
    unlimited = dataclasses.replace(cluster, device_memory=10**15)
    rows = [(name, layers, d_model, mesh_shape,
             functools.partial(models.gpt, num_layers=layers, d_model=d_model, heads=heads,
                               seq=2048, vocab=32000, batch=64, abstract=True,
                               scan_layers="scanned" in name),
             unlimited if "no budget" in name else cluster)
            for name, layers, d_model, heads, mesh_shape in SCALE_ROWS]
    rows.append(("MoE, 8 experts (sgd, MSE)", 1, MOE_ROW["d_model"], (8, 8),
                 functools.partial(models.moe, **MOE_ROW, abstract=True), cluster))
    return rows


def scale_row(index: int, time_limit: float) -> dict:
    """Measure ``--scale`` row ``index`` (in this process); ``jax_trace_s``: seconds of
    ``jax.make_jaxpr`` of the same step alone (a fresh copy, after planning), the part of
    the trace that is jax's and grows with depth whatever a planner does."""
    _, _, _, mesh_shape, workload, cluster = scale_rows()[index]
    measured = measure_workload(workload(), time_limit, mesh_shape=mesh_shape, cluster=cluster)
    fresh = workload()
    start = time.perf_counter()
    jax.make_jaxpr(fresh.fn)(*fresh.args)
    return dict(measured, jax_trace_s=time.perf_counter() - start)


def scale_table(time_limit: float) -> str:
    """The ``--scale`` rows as a markdown table, each measured in a fresh process (as a user
    plans once; one process planning every row carries the earlier rows' heap along)."""
    lines = ["GPT train steps (adamw, seq 2048, vocab 32000, batch 64) and one MoE layer planned "
             "on abstract meshes of the h100-80gb cluster (memory budget on, except the \"no "
             f"budget\" rows), time_limit_s={time_limit}, each row in a fresh process; "
             "presets: the hand-written layouts priced by the same model. \"scanned\": the "
             "blocks' weights stacked and run by a `lax.scan`, as MaxText writes a model, "
             "planned once as a loop (its ILP nodes: one block's, however deep; its presets "
             "priced on that loop's view).", "",
             "| model | layers | d_model | mesh | ILP nodes | variables | neighbourhood rounds "
             "| trace s | strategies + costs s | solve s | total s | modelled ms/step | peak GiB "
             "| DataParallel ms | ZeRO3 ms | Megatron ms |",
             "|" + "---|" * 16]
    totals: dict[int, list[tuple[float, float]]] = {}
    for index, (name, layers, d_model, mesh_shape, _, _) in enumerate(scale_rows()):
        r = _scale_row_in_process(index, time_limit)
        totals[index] = [(r["total_s"], r["jax_trace_s"])]
        presets = " | ".join(f"{r['presets'].get(p, float('nan')):.1f}"
                             for p in ("DataParallel", "ZeRO3", "Megatron"))
        lines.append(f"| {name} | {layers} | {d_model} | {'x'.join(map(str, mesh_shape))} | "
                     f"{r['nodes']} | {r['variables']} | {r['rounds']} | {r['trace_s']:.1f} | "
                     f"{r['strategies_s'] + r['costs_s']:.1f} | {r['solve_s']:.1f} | "
                     f"{r['total_s']:.1f} | {r['cost_ms']:.1f} | {r['peak_gib']:.1f} | "
                     f"{presets} |")
        print(lines[-1], flush=True)
    for _ in range(DEPTH_ROUNDS - 1):
        for index in sorted({i for pair in DEPTH_PAIRS for i in pair}):
            r = _scale_row_in_process(index, time_limit)
            totals[index].append((r["total_s"], r["jax_trace_s"]))
    lines += depth_section(totals)
    print("\n".join(lines[-len(DEPTH_PAIRS):]), flush=True)
    return "\n".join(lines) + "\n"


def depth_section(totals: dict[int, list[tuple[float, float]]]) -> list[str]:
    """Markdown lines comparing each ``DEPTH_PAIRS`` pair's planning times (``totals``: row
    index -> (seconds planning, seconds of jax's ``make_jaxpr`` alone) of each plan of it):
    medians, ranges, the ratio of the medians, and what one added layer costs against what
    a ratio of ``DEPTH_GOAL`` would allow it."""
    rows = scale_rows()
    lines = ["", f"Depth: each row of a pair planned {DEPTH_ROUNDS} times (fresh processes, "
             "the pair's rows alternating); total seconds, median (range); per added layer: "
             "the difference of the medians over the layers added; jax's part: the same of "
             "`jax.make_jaxpr` of the step alone, timed in the same processes; allowed: the "
             f"most an added layer may cost for a ratio of {DEPTH_GOAL}, given the cost that "
             "does not grow with depth (2 x half - full; none left where the deeper row alone "
             "meets a binding memory budget, which is one more search).", "",
             "| rows | half depth s | full depth s | full / half (of medians) | "
             "s per added layer | of which jax's make_jaxpr | allowed for "
             f"{DEPTH_GOAL}x |",
             "|---|---|---|---|---|---|---|"]
    for half, full in DEPTH_PAIRS:
        a, b = sorted(t for t, _ in totals[half]), sorted(t for t, _ in totals[full])
        ma, mb = statistics.median(a), statistics.median(b)
        added = rows[full][1] - rows[half][1]
        jax_added = (statistics.median(j for _, j in totals[full])
                     - statistics.median(j for _, j in totals[half])) / added
        allowed = allowed_per_layer(ma, mb, added)
        lines.append(f"| {rows[half][0]} ({rows[half][1]} layers) / {rows[full][1]} layers | "
                     f"{ma:.1f} ({a[0]:.1f}-{a[-1]:.1f}) | {mb:.1f} ({b[0]:.1f}-{b[-1]:.1f}) | "
                     f"{mb / ma:.2f} | {(mb - ma) / added:.3f} | {jax_added:.3f} | "
                     f"{'none' if allowed is None else f'{allowed:.3f}'} |")
    return lines


def allowed_per_layer(half_s: float, full_s: float, added: int,
                      goal: float = DEPTH_GOAL) -> float | None:
    """Seconds an added layer may cost for the deeper plan to take at most ``goal`` times
    the shallower one's (``DEPTH_GOAL``), the cost that does not grow with depth, ``2 *
    half_s - full_s``, held as it is: with F that cost and n the layers added (the
    shallower model's depth), (F + 2 n p) <= goal (F + n p) gives
    p <= (goal - 1) F / ((2 - goal) n). None when F <= 0: the deeper plan did more than
    its layers' share of work (a memory budget only it had to meet), no layer cost meets
    the goal."""
    fixed = 2 * half_s - full_s
    return None if fixed <= 0 else (goal - 1) * fixed / ((2 - goal) * added)


def _scale_row_in_process(index: int, time_limit: float) -> dict:
    """``scale_row(index, time_limit)`` measured in a fresh Python process."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.planning_time", "--scale-row",
                          str(index), "--time-limit", str(time_limit)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="6,12,24,48")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds (default 10; 60 with --scale, the method's default)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--scale", action="store_true",
                        help="7B/13B/70B-shaped models on 8x8 and 8x8x8 h100-80gb meshes")
    parser.add_argument("--scale-row", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale_row is not None:  # one --scale row, as JSON (scale_table runs each so)
        print(json.dumps(scale_row(args.scale_row, args.time_limit or 60.0)))
        return
    if args.scale:
        text = scale_table(60.0 if args.time_limit is None else args.time_limit)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return
    time_limit = 10.0 if args.time_limit is None else args.time_limit
    rows = [measure(int(n), args.d_model, args.seq, args.heads, args.vocab, time_limit)
            for n in args.layers.split(",")]
    head = ("| layers | equations | ILP nodes | after tying | variables | constraints | trace s "
            "| strategies s | costs + plan s | solve s (LP s) | total s | modelled ms | status (how) |")
    lines = [f"GPT d_model={args.d_model} seq={args.seq} heads={args.heads} vocab={args.vocab}, "
             f"adamw, mesh (2, 4), time_limit_s={time_limit}", "", head,
             "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['equations']} | {r['nodes']} | {r['tied']} | "
                     f"{r['variables']} | {r['constraints']} | {r['trace_s']:.2f} | "
                     f"{r['strategies_s']:.2f} | {r['costs_s']:.2f} | {r['solve_s']:.2f} "
                     f"({r['lp_s']:.2f}) | {r['total_s']:.2f} | {r['cost_ms']:.3f} | "
                     f"{r['status']} ({r['how']}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
