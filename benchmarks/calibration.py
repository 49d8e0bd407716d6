"""Does the cost model predict? Predicted against measured step time, default vs calibrated.

    python -m benchmarks.calibration [--meshes 2x4,8] [--workloads mlp,gpt] [--budget 20]
                                     [--time-limit 3] [--rounds 15] [--out benchmarks/]

On 8 virtual CPU devices: calibrates each mesh (``autoshard.calibrate``), then for every
workload, both clusters (the ``host-cpu`` default and the calibrated one) and every
method (the ILP and the presets), plans, runs and times the step. Distinct plans are
timed interleaved, round-robin (``--rounds`` rounds, median per plan), so load from
other processes on the machine hits every plan alike. Reports Spearman rank
correlation of predicted against measured time per cluster, pooled and within each
workload/mesh, and whether the ILP's plan is the fastest (within noise) when run.
Writes ``calibration.json`` and ``CALIBRATION.md`` to ``--out``.
"""
from __future__ import annotations

from .host_devices import force_host_devices

force_host_devices(8)   # before jax is imported

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import autoshard  # noqa: E402
from examples import models  # noqa: E402

from .calibration_report import write_markdown  # noqa: E402

WORKLOADS = {
    "mlp": lambda: models.mlp(),
    "mlp_wide": lambda: models.mlp(num_layers=4, batch=32, hidden=512),
    "transformer_block": lambda: models.transformer_block(),
    "conv_net": lambda: models.conv_net(),
    "moe": lambda: models.moe(),
    "gpt": lambda: models.gpt(),
    "embedding_model": lambda: models.embedding_model(),
    "wide_resnet_block": lambda: models.wide_resnet_block(),
}
MESHES = {"2x4": ((2, 4), ("data", "model")), "8": ((8,), ("devices",))}
PRESETS = {"DataParallel": autoshard.DataParallel, "ZeRO3": autoshard.ZeRO3,
           "Megatron": autoshard.Megatron}


def _log(msg: str) -> None:
    print(f"[calibration {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 3 points."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3:
        return float("nan")

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their mean rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _layout_key(plan) -> str:
    """Plans that lay everything out alike run alike, whatever cluster priced them."""
    return json.dumps([[str(s) for s in plan.flat_in_specs], [str(s) for s in plan.flat_out_specs],
                       [[v, str(s)] for v, s in plan.value_specs],
                       [[e, k, str(s)] for e, k, s in plan.operand_specs]])


def bench_mesh(mesh_name: str, workloads, clusters: dict, opts) -> list[dict]:
    shape, names = MESHES[mesh_name]
    mesh = autoshard.make_mesh(shape, names)
    rows, runnable = [], {}   # runnable: layout key -> (step fn, placed args)
    for wname in workloads:
        w = WORKLOADS[wname]()
        for cname, cluster in clusters.items():
            methods = {"ILP": autoshard.ShardParallel(time_limit_s=opts.time_limit)}
            methods.update({k: v() for k, v in PRESETS.items()})
            for mname, method in methods.items():
                row = {"workload": wname, "mesh": mesh_name, "cluster": cname,
                       "method": mname, "predicted_s": None, "layout": None, "error": None}
                rows.append(row)
                try:
                    f = autoshard.parallelize(w.fn, mesh=mesh, method=method, cluster=cluster,
                                              batch_argnums=w.batch_argnums)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        plan = f.plan(*w.args)
                    c = plan.cost
                    row.update(predicted_s=c.total_s, compute_s=c.compute_s,
                               communication_s=c.communication_s, resharding_s=c.resharding_s,
                               solver_status=plan.solver.status if plan.solver else None,
                               solver_gap=plan.solver.gap if plan.solver else None)
                    key = (wname, _layout_key(plan))
                    row["layout"] = key[1]
                    if key not in runnable:
                        shardings = jax.tree_util.tree_map(
                            lambda s: NamedSharding(mesh, s), plan.in_specs,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))
                        args = jax.device_put(w.args, shardings)
                        jax.block_until_ready(f(*args))   # compile
                        runnable[key] = (f, args)
                    _log(f"{wname} {mesh_name} {cname} {mname}: predicted "
                         f"{c.total_s * 1e3:.3f} ms")
                except Exception as err:  # noqa: BLE001 - a row, not a crash
                    row["error"] = f"{type(err).__name__}: {err}"
                    _log(f"{wname} {mesh_name} {cname} {mname}: ERROR {row['error']}")
        # Time this workload's distinct plans round-robin.
        mine = [k for k in runnable if k[0] == wname]
        times = {k: [] for k in mine}
        for k in mine:                              # warm-up
            f, args = runnable[k]
            jax.block_until_ready(f(*args))
        for _ in range(opts.rounds):
            for k in mine:
                f, args = runnable[k]
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                times[k].append(time.perf_counter() - t)
        for row in rows:
            key = (row["workload"], row["layout"])
            if row["workload"] == wname and key in times:
                ts = times[key]
                q1, med, q3 = np.percentile(ts, [25, 50, 75])
                row.update(measured_s=float(med), measured_iqr_s=float(q3 - q1),
                           measured_times_s=ts)
        for k in mine:
            del runnable[k]
        _log(f"{wname} {mesh_name}: timed {len(mine)} distinct plans")
    return rows


def summarize(rows: list[dict], clusters) -> dict:
    """Rank correlations per cluster; the ILP against the fastest plan per workload/mesh."""
    ok = [r for r in rows if r.get("measured_s") is not None]
    out = {"spearman_pooled": {}, "spearman_within": {}, "ilp_check": []}
    groups = sorted({(r["workload"], r["mesh"]) for r in ok})
    for cname in clusters:
        mine = [r for r in ok if r["cluster"] == cname]
        out["spearman_pooled"][cname] = spearman([r["predicted_s"] for r in mine],
                                                 [r["measured_s"] for r in mine])
        within = {}
        for g in groups:
            rs = [r for r in mine if (r["workload"], r["mesh"]) == g]
            within[f"{g[0]} {g[1]}"] = spearman([r["predicted_s"] for r in rs],
                                                [r["measured_s"] for r in rs])
        out["spearman_within"][cname] = within
    for g in groups:
        rs = [r for r in ok if (r["workload"], r["mesh"]) == g]
        best = min(rs, key=lambda r: r["measured_s"])
        for cname in clusters:
            ilp = [r for r in rs if r["cluster"] == cname and r["method"] == "ILP"]
            if not ilp:
                continue
            ilp = ilp[0]
            noise = max(ilp["measured_iqr_s"], best["measured_iqr_s"])
            within = ilp["measured_s"] - best["measured_s"] <= noise
            # Same cluster: did the ILP price its own plan above a preset's (a search
            # failure: the solver stopped early), or below the faster plan (a cost error)?
            same = [r for r in rs if r["cluster"] == cname and r["method"] != "ILP"]
            cheaper = min(same, key=lambda r: r["predicted_s"]) if same else None
            if within:
                diagnosis = "ok"
            elif cheaper is not None and cheaper["predicted_s"] < ilp["predicted_s"] * (1 - 1e-9):
                diagnosis = (f"search: the ILP stopped at {ilp['predicted_s'] * 1e3:.3f} ms "
                             f"(status {ilp.get('solver_status')}, gap "
                             f"{(ilp.get('solver_gap') or 0):.0%}); {cheaper['method']} prices "
                             f"{cheaper['predicted_s'] * 1e3:.3f} ms")
            else:
                diagnosis = "cost model: priced the ILP's plan cheapest, yet it ran slower"
            out["ilp_check"].append({
                "workload": g[0], "mesh": g[1], "cluster": cname,
                "ilp_measured_s": ilp["measured_s"], "best_measured_s": best["measured_s"],
                "best": f"{best['method']} ({best['cluster']})",
                "ratio": ilp["measured_s"] / best["measured_s"],
                "within_noise": within, "diagnosis": diagnosis})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meshes", default="2x4,8")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--budget", type=float, default=20.0, help="calibration seconds per mesh")
    p.add_argument("--time-limit", type=float, default=3.0, help="ILP deterministic limit")
    p.add_argument("--rounds", type=int, default=15, help="timed calls per plan")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    opts = p.parse_args(argv)
    meshes = [m for m in opts.meshes.split(",") if m]
    workloads = [w for w in opts.workloads.split(",") if w]
    for name, known, what in ((meshes, MESHES, "mesh"), (workloads, WORKLOADS, "workload")):
        bad = [n for n in name if n not in known]
        if bad:
            p.error(f"unknown {what}(s) {bad}; choose from {list(known)}")
    rows, calibrations = [], {}
    for mesh_name in meshes:
        shape, names = MESHES[mesh_name]
        t = time.perf_counter()
        calibrated = autoshard.calibrate(autoshard.make_mesh(shape, names), budget_s=opts.budget)
        calibrations[mesh_name] = {"seconds": time.perf_counter() - t,
                                   "cluster": json.loads(calibrated.to_json())}
        _log(f"calibrated {mesh_name} in {calibrations[mesh_name]['seconds']:.1f} s")
        clusters = {"default": autoshard.cluster_preset("host-cpu"), "calibrated": calibrated}
        rows += bench_mesh(mesh_name, workloads, clusters, opts)
    result = {"rows": rows, "calibrations": calibrations,
              "default_cluster": json.loads(autoshard.cluster_preset("host-cpu").to_json()),
              "summary": summarize(rows, ("default", "calibrated")),
              "options": vars(opts), "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(opts.out)
    (out / "calibration.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out / "CALIBRATION.md")
    _log(f"wrote {out / 'CALIBRATION.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
