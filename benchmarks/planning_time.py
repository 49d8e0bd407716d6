"""Planning time against depth: a GPT train step (adamw) planned on an abstract (2, 4) mesh.

    python -m benchmarks.planning_time [--layers 6,12,24,48] [--d-model 1024] [--seq 1024]
                                       [--time-limit 10] [--out benchmarks/PLANNING_TIME.md]
    python -m benchmarks.planning_time --scale [--out benchmarks/PLANNING_SCALE.md]

``--scale``: LLaMA-7B-, 13B- and 70B-shaped GPTs (seq 2048, vocab 32000, batch 64) on
abstract 8×8 and 8×8×8 meshes of the h100-80gb cluster (its memory budget on), each row
with its phase times, problem size, the plan's modelled cost and peak per device, and the
presets' modelled costs beside it.

Per depth: jaxpr equations, ILP nodes before and after tying repeated layers, CP-SAT
variables and constraints, seconds per phase (trace, strategies + costs, solve) and in
total, and the modelled cost of the plan. ShapeDtypeStruct arguments: nothing is
allocated, no device is touched. Timings are what this machine measured, not targets.
"""
from __future__ import annotations

import argparse
import time

import autoshard
from autoshard import ilp
from autoshard.intra import planner as _planner
from autoshard.ir.trace import trace
from examples import models


def measure(layers: int, d_model: int, seq: int, heads: int, vocab: int, time_limit: float,
            *, batch: int = 8, mesh_shape=(2, 4), cluster=None):
    workload = models.gpt(num_layers=layers, d_model=d_model, seq=seq, heads=heads, vocab=vocab,
                          batch=batch, abstract=True)
    mesh = autoshard.abstract_mesh(mesh_shape, ("data", "fsdp", "model")[-len(mesh_shape):])
    start = time.perf_counter()
    traced = trace(workload.fn, workload.args, ())
    traced_at = time.perf_counter()
    solve_s, graph_s = [], []
    sizes = {}
    real_solve, real_build_graph = ilp.solve_intra_op, _planner.build_graph

    def timed_build_graph(*args, **kwargs):
        t = time.perf_counter()
        graph = real_build_graph(*args, **kwargs)
        graph_s.append(time.perf_counter() - t)
        return graph

    def timed_solve(request):
        t = time.perf_counter()
        result = real_solve(request)
        solve_s.append(time.perf_counter() - t)
        sizes.update(nodes=request.num_nodes, tied=result.stats.tied_classes or request.num_nodes,
                     variables=result.num_variables, constraints=result.num_constraints,
                     lp_s=result.stats.lp_time_s, how=result.stats.solver_status)
        return result

    _planner.ilp.solve_intra_op = timed_solve
    _planner.build_graph = timed_build_graph
    try:
        step = autoshard.parallelize(workload.fn, mesh=mesh, cluster=cluster,
                                     method=autoshard.ShardParallel(time_limit_s=time_limit))
        plan = step.plan(*workload.args)
    finally:
        _planner.ilp.solve_intra_op = real_solve
        _planner.build_graph = real_build_graph
    total = time.perf_counter() - start
    planning = total - (traced_at - start)
    return dict(layers=layers, equations=len(traced.program.eqns), **sizes,
                trace_s=traced_at - start, strategies_s=sum(graph_s),
                costs_s=planning - sum(solve_s) - sum(graph_s),
                solve_s=sum(solve_s), total_s=total, cost_ms=plan.cost.total_s * 1e3,
                status=plan.solver.status, rounds=plan.solver.neighbourhood_rounds,
                peak_gib=plan.cost.peak_memory_bytes / 2**30,
                presets={a.name: a.total_s * 1e3 for a in plan.alternatives})


#: (name, layers, d_model, heads, mesh shape) of the ``--scale`` rows
SCALE_ROWS = (
    ("LLaMA-7B-shaped", 32, 4096, 32, (8, 8)),
    ("LLaMA-7B-shaped", 32, 4096, 32, (8, 8, 8)),
    ("13B-shaped", 40, 5120, 40, (8, 8, 8)),
    ("70B-shaped, half depth", 40, 8192, 64, (8, 8, 8)),
    ("70B-shaped", 80, 8192, 64, (8, 8, 8)),
)


def scale_table(time_limit: float) -> str:
    """The ``--scale`` rows as a markdown table."""
    cluster = autoshard.cluster_preset("h100-80gb")
    lines = ["GPT train steps (adamw, seq 2048, vocab 32000, batch 64) planned on abstract "
             f"meshes of the h100-80gb cluster (memory budget on), time_limit_s={time_limit}; "
             "presets: the hand-written layouts priced by the same model.", "",
             "| model | layers | d_model | mesh | ILP nodes | variables | neighbourhood rounds "
             "| trace s | strategies + costs s | solve s | total s | modelled ms/step | peak GiB "
             "| DataParallel ms | ZeRO3 ms | Megatron ms |",
             "|" + "---|" * 16]
    for name, layers, d_model, heads, mesh_shape in SCALE_ROWS:
        r = measure(layers, d_model, 2048, heads, 32000, time_limit, batch=64,
                    mesh_shape=mesh_shape, cluster=cluster)
        presets = " | ".join(f"{r['presets'].get(p, float('nan')):.1f}"
                             for p in ("DataParallel", "ZeRO3", "Megatron"))
        lines.append(f"| {name} | {layers} | {d_model} | {'x'.join(map(str, mesh_shape))} | "
                     f"{r['nodes']} | {r['variables']} | {r['rounds']} | {r['trace_s']:.1f} | "
                     f"{r['strategies_s'] + r['costs_s']:.1f} | {r['solve_s']:.1f} | "
                     f"{r['total_s']:.1f} | {r['cost_ms']:.1f} | {r['peak_gib']:.1f} | "
                     f"{presets} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


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
    args = parser.parse_args(argv)
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
