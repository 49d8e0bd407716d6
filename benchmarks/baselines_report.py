"""Yardstick of every hand-written baseline, per workload and mesh, in one table.

    python -m benchmarks.baselines_report [--workloads a,b] [--meshes 8,2x4] [--out DIR] [--json PATH]

Compiles (never runs) each baseline of ``benchmarks/baselines.py`` for the workloads of
``benchmarks.run.WORKLOAD_CONFIGS`` on 8 virtual CPU devices and prices the compiled
program with ``benchmarks/yardstick.py`` on the host-cpu and h100-80gb cluster presets.
Also records XLA's "Involuntary full rematerialization" warnings printed while compiling.
Writes ``BASELINES.md`` to ``--out`` (default: benchmarks/), and every row's figures as JSON
to ``--json PATH`` when given.
"""
from __future__ import annotations

import os
import re
import sys

if "jax" not in sys.modules:   # before jax loads: 8 virtual devices
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

import autoshard  # noqa: E402

from . import baselines  # noqa: E402
from .run import MESHES, WORKLOAD_CONFIGS  # noqa: E402
from .yardstick import yardstick  # noqa: E402

CLUSTERS = ("host-cpu", "h100-80gb")
DEFAULT_MESHES = ("8", "2x4")


def _compile_capturing_stderr(fn, args):
    """Compile, returning (compiled, what XLA printed on file descriptor 2 meanwhile)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            compiled = fn.lower(*args).compile()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return compiled, tmp.read().decode(errors="replace")


def rows_for(wname: str, mesh_name: str) -> list[dict]:
    shape, names = MESHES[mesh_name]
    mesh = autoshard.make_mesh(shape, names)
    w = WORKLOAD_CONFIGS[wname][0](True)
    rows = []
    for strategy in baselines.baseline_names(wname, shape):
        t = time.perf_counter()
        fn, _ = baselines.baseline_jit(w, wname, mesh, strategy)
        compiled, log = _compile_capturing_stderr(fn, w.args)
        row = {"workload": wname, "mesh": mesh_name, "strategy": strategy,
               "compile_s": time.perf_counter() - t,
               "involuntary_remat": log.count("Involuntary full rematerialization")}
        for cname in CLUSTERS:
            y = yardstick(compiled, shape, autoshard.cluster_preset(cname), axis_names=names)
            row[cname] = {"total_s": y.total_s, "compute_s": y.compute_s,
                          "memory_s": y.memory_s, "collective_s": y.collective_s}
        row.update(flops=y.flops, bytes_accessed=y.bytes_accessed,
                   peak_memory_bytes=y.peak_memory_bytes,
                   collectives=[{"kind": c.kind, "axes": list(c.axes), "count": c.count,
                                 "bytes": c.bytes} for c in y.collectives])
        rows.append(row)
        print(f"{wname} {mesh_name} {strategy}: host-cpu {row['host-cpu']['total_s'] * 1e3:.3f} ms, "
              f"h100 {row['h100-80gb']['total_s'] * 1e6:.1f} µs"
              + (f", {row['involuntary_remat']} involuntary remat" if row["involuntary_remat"] else ""),
              file=sys.stderr, flush=True)
    return rows


def _ms(s):
    return f"{s * 1e3:.3f}"


def _us(s):
    return f"{s * 1e6:.1f}"


def markdown(rows: list[dict]) -> str:
    out = ["# Hand-written baselines: yardstick per step per device", "",
           "`python -m benchmarks.baselines_report` (jax " + jax.__version__ + "). Each baseline "
           "is `jax.jit` with the in/out shardings of `benchmarks/baselines.py`, compiled on "
           "8 virtual CPU devices; times are `benchmarks/yardstick.py`'s roofline (flops / peak "
           "+ bytes accessed / memory bandwidth + Σ collective α–β) of the compiled program, "
           "not measurements. Best per workload × mesh in bold (host-cpu).", "",
           "| workload | mesh | baseline | host-cpu ms | (compute / memory / collectives) "
           "| h100-80gb µs | (compute / memory / collectives) | peak MiB | collectives (count × kind[axes], bytes) "
           "| remat warnings |",
           "| --- | --- | --- | ---: | --- | ---: | --- | ---: | --- | ---: |"]
    best = {}
    for r in rows:
        key = (r["workload"], r["mesh"])
        best[key] = min(best.get(key, float("inf")), r["host-cpu"]["total_s"])
    for r in rows:
        c, h = r["host-cpu"], r["h100-80gb"]
        total = _ms(c["total_s"])
        if c["total_s"] == best[(r["workload"], r["mesh"])]:
            total = f"**{total}**"
        cols = "; ".join(f"{x['count']}× {x['kind']}[{','.join(x['axes'])}] {x['bytes']:,}"
                         for x in r["collectives"]) or "none"
        peak = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.2f}"
        out.append(f"| {r['workload']} | {r['mesh']} | {r['strategy']} | {total} | "
                   f"{_ms(c['compute_s'])} / {_ms(c['memory_s'])} / {_ms(c['collective_s'])} | "
                   f"{_us(h['total_s'])} | {_us(h['compute_s'])} / {_us(h['memory_s'])} / "
                   f"{_us(h['collective_s'])} | {peak} | {cols} | {r['involuntary_remat']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.baselines_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOAD_CONFIGS))
    p.add_argument("--meshes", default=",".join(DEFAULT_MESHES))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    p.add_argument("--json", help="also write the rows as JSON to this path")
    opts = p.parse_args(argv)
    rows = []
    for wname in filter(None, opts.workloads.split(",")):
        for m in filter(None, opts.meshes.split(",")):
            if m not in DEFAULT_MESHES:
                raise SystemExit(f"mesh {m}: only {', '.join(DEFAULT_MESHES)} (8 devices)")
            rows += rows_for(wname, m)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1))
    (out / "BASELINES.md").write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
