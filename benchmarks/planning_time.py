"""Planning time against depth: a GPT train step (adamw) planned on an abstract (2, 4) mesh.

    python -m benchmarks.planning_time [--layers 6,12,24,48] [--d-model 1024] [--seq 1024]
                                       [--time-limit 10] [--out benchmarks/PLANNING_TIME.md]

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


def measure(layers: int, d_model: int, seq: int, heads: int, vocab: int, time_limit: float):
    workload = models.gpt(num_layers=layers, d_model=d_model, seq=seq, heads=heads, vocab=vocab,
                          batch=8, abstract=True)
    mesh = autoshard.abstract_mesh((2, 4), ("data", "model"))
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
        step = autoshard.parallelize(workload.fn, mesh=mesh,
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
                status=plan.solver.status)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="6,12,24,48")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = [measure(int(n), args.d_model, args.seq, args.heads, args.vocab, args.time_limit)
            for n in args.layers.split(",")]
    head = ("| layers | equations | ILP nodes | after tying | variables | constraints | trace s "
            "| strategies s | costs + plan s | solve s (LP s) | total s | modelled ms | status (how) |")
    lines = [f"GPT d_model={args.d_model} seq={args.seq} heads={args.heads} vocab={args.vocab}, "
             f"adamw, mesh (2, 4), time_limit_s={args.time_limit}", "", head,
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
