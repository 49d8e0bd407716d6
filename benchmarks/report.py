"""RESULTS.md from the benchmark results (see run.py)."""
from __future__ import annotations

from pathlib import Path

from autoshard.cost_model import format_bytes, format_seconds
from autoshard.ir.hlo import COLLECTIVE_KINDS

ILP = "ShardParallel"
PRESETS = ("DataParallel", "ZeRO3", "Megatron")
PIPELINE = "PipeshardParallel"
NOTES_MARKER = "<!-- analysis-notes: everything below this line is kept when regenerating -->"
REL_TOL = 1e-9   # float noise only: anything above this counts as a loss
_SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
          "collective-permute": "CP"}


def fmt_s(s) -> str:
    return "—" if s is None else format_seconds(s)


def fmt_b(n) -> str:
    return "—" if n is None else format_bytes(n)


def fmt_flops(f) -> str:
    if f is None:
        return "—"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if f >= size:
            return f"{f / size:.2f} {unit}"
    return f"{f:.0f}"


def _ratio(a, b) -> str:
    if a is None or b is None:
        return "—"
    if b == 0:
        return "∞" if a > 0 else "1.00"
    return f"{a / b:.2f}"


def _groups(rows):
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["mesh"]), {})[r["method"]] = r
    return groups


def _ok(r) -> bool:
    return r is not None and r.get("error") is None and r.get("modelled") is not None


def carry_bytes(r):
    c = (r.get("hlo") or {}).get("carried")
    return None if c is None else c["collective_bytes"]


def two_step_bytes(r):
    """HLO collective bytes of one step plus the resharding of carried values to the next."""
    c = carry_bytes(r)
    return None if c is None else r["hlo"]["collective_bytes"] + c


def goal_check(rows) -> dict:
    """Per (workload, mesh): the ILP against the best preset on modelled cost and HLO bytes."""
    out = {"modelled": [], "bytes": [], "bytes_carry": [], "checked": 0, "incomplete": []}
    for (wl, mesh), g in _groups(rows).items():
        ilp = g.get(ILP)
        presets = [g[p] for p in PRESETS if _ok(g.get(p))]
        if not _ok(ilp) or not presets:
            out["incomplete"].append((wl, mesh, ilp.get("error") if ilp else "missing"))
            continue
        out["checked"] += 1
        best = min(presets, key=lambda r: r["modelled"]["total_s"])
        if ilp["modelled"]["total_s"] > best["modelled"]["total_s"] * (1 + REL_TOL):
            out["modelled"].append((wl, mesh, ilp, best))
        with_hlo = [r for r in presets if r.get("hlo")]
        if ilp.get("hlo") and with_hlo:
            bestb = min(with_hlo, key=lambda r: r["hlo"]["collective_bytes"])
            if ilp["hlo"]["collective_bytes"] > bestb["hlo"]["collective_bytes"]:
                out["bytes"].append((wl, mesh, ilp, bestb))
        with_carry = [r for r in with_hlo if two_step_bytes(r) is not None]
        if two_step_bytes(ilp) is not None and with_carry:
            bestc = min(with_carry, key=two_step_bytes)
            if two_step_bytes(ilp) > two_step_bytes(bestc):
                out["bytes_carry"].append((wl, mesh, ilp, bestc))
    return out


def _kinds(r) -> str:
    if not r.get("hlo"):
        return "—"
    parts = [f"{_SHORT[k]}×{v['count']} {fmt_b(v['bytes'])}"
             for k, v in r["hlo"]["collectives"].items() if v["count"]]
    return ", ".join(parts) or "none"


def _breakdown(r) -> str:
    m = r["modelled"]
    return (f"{fmt_s(m['compute_s'])} / {fmt_s(m['communication_s'])} / "
            f"{fmt_s(m['resharding_s'])}")


def _diagnose(wl, mesh, ilp, best) -> list[str]:
    """Facts from the JSON that point at the cause of one loss."""
    lines = [f"- **{wl} on {mesh}** — ILP vs {best['method']}:"]
    im, bm = ilp["modelled"], best["modelled"]
    deltas = [(k, im[k] - bm[k]) for k in ("compute_s", "communication_s", "resharding_s")]
    lines.append("  - modelled (ILP − preset): " + ", ".join(
        f"{k[:-2]} {'+' if d >= 0 else '−'}{fmt_s(abs(d))}" for k, d in deltas))
    if ilp.get("hlo") and best.get("hlo"):
        worse = []
        for k in COLLECTIVE_KINDS:
            a, b = ilp["hlo"]["collectives"][k], best["hlo"]["collectives"][k]
            if a["bytes"] != b["bytes"] or a["count"] != b["count"]:
                worse.append(f"{k} {a['count']}×/{fmt_b(a['bytes'])} vs "
                             f"{b['count']}×/{fmt_b(b['bytes'])}")
        if worse:
            lines.append("  - HLO collectives (ILP vs preset): " + "; ".join(worse))
    pc = ilp.get("plan_collectives") or {}
    if pc:
        lines.append("  - ILP's modelled collectives: " + ", ".join(
            f"{k} ×{v['count']} ({fmt_s(v['seconds'])})" for k, v in sorted(pc.items())))
    if ilp.get("top_ops"):
        lines.append("  - ILP's costliest ops: " + "; ".join(
            f"`{o['op']}` {o['strategy']} {fmt_s(o['seconds'])}" for o in ilp["top_ops"][:3]))
    if ilp.get("warnings"):
        lines.append("  - planner warnings: " + "; ".join(ilp["warnings"]))
    s = ilp.get("solver")
    if s:
        lines.append(f"  - solver: {s['status']}, gap {s['gap']:.2%}, "
                     f"{s['num_nodes']} nodes, solve {s['solve_time_s']:.1f} s")
    return lines


def render(result: dict) -> str:
    rows = result["rows"]
    check = goal_check(rows)
    env = result.get("environment", {})
    L = ["# Benchmarks: autoshard's ILP plans against hand-written parallel plans", ""]
    L += ["**Goal.** On every workload and mesh, the ILP plan (`ShardParallel`) is **≤ the best "
          "preset** (`DataParallel`, `ZeRO3`, `Megatron`) on **modelled cost**, and **≤ the best "
          "preset on the collective bytes of the compiled HLO** (per device, summed over "
          "all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute results). "
          "Rows where it is not are listed below with their numbers; nothing is filtered.", ""]
    L += ["Regenerate (from the repository root):", "", "```",
          "python -m benchmarks.run            # full: writes benchmarks/results.json + RESULTS.md",
          "python -m benchmarks.run --quick    # small workloads, meshes 8 and 2x4 only",
          "```", ""]
    L += [f"This run: `{result.get('command', '')}`, started {result.get('started')}, "
          f"wall time {result.get('wall_time_s', 0):.0f} s; jax {env.get('jax')}, "
          f"{env.get('devices')} {env.get('backend')} devices on {env.get('cpu_count')} cores "
          f"({env.get('platform')}). Step times: median of {result.get('repeats')} runs after "
          f"{result.get('warmup')} warm-ups.", ""]
    L += ["Meshes: " + "; ".join(
        f"`{m}` = {tuple(v['shape'])} {tuple(v['axis_names'])} "
        + ("(executed on virtual CPU devices, host-cpu cluster model)" if v["executed"]
           else "(planned and compiled only, 64 virtual devices, h100-80gb cluster model)")
        for m, v in result.get("meshes", {}).items()), ""]
    L += ["Workloads: " + "; ".join(f"`{k}` = {v}" for k, v in result.get("workloads", {}).items()),
          ""]

    L += ["## Goal check", ""]
    L += [f"{check['checked']} workload × mesh combinations checked; ILP above the best preset "
          f"on modelled cost in **{len(check['modelled'])}**, on HLO collective bytes in "
          f"**{len(check['bytes'])}** (one step's HLO), in **{len(check['bytes_carry'])}** counting "
          f"also the resharding of carried values (parameters, optimizer state) from this step's "
          f"output sharding back to its input sharding (see below).", ""]
    if check["incomplete"]:
        L += ["Not checked (ILP or every preset failed): " + "; ".join(
            f"{w} on {m} ({e})" for w, m, e in check["incomplete"]), ""]
    L += ["### ILP above the best preset on modelled cost", ""]
    if check["modelled"]:
        L += ["| workload | mesh | ILP total | best preset | preset total | ILP / preset | "
              "ILP compute / comm / reshard | preset compute / comm / reshard |",
              "|---|---|---|---|---|---|---|---|"]
        for wl, mesh, ilp, best in check["modelled"]:
            L.append(f"| {wl} | {mesh} | {fmt_s(ilp['modelled']['total_s'])} | {best['method']} | "
                     f"{fmt_s(best['modelled']['total_s'])} | "
                     f"{_ratio(ilp['modelled']['total_s'], best['modelled']['total_s'])} | "
                     f"{_breakdown(ilp)} | {_breakdown(best)} |")
    else:
        L.append("None.")
    L += ["", "### ILP above the best preset on HLO collective bytes", ""]
    if check["bytes"]:
        L += ["| workload | mesh | ILP bytes | best preset | preset bytes | ILP / preset | "
              "ILP collectives | preset collectives |", "|---|---|---|---|---|---|---|---|"]
        for wl, mesh, ilp, best in check["bytes"]:
            L.append(f"| {wl} | {mesh} | {fmt_b(ilp['hlo']['collective_bytes'])} | "
                     f"{best['method']} | {fmt_b(best['hlo']['collective_bytes'])} | "
                     f"{_ratio(ilp['hlo']['collective_bytes'], best['hlo']['collective_bytes'])} "
                     f"| {_kinds(ilp)} | {_kinds(best)} |")
    else:
        L.append("None.")
    L += ["", "### ILP above the best preset on HLO collective bytes, step + carried resharding",
          "",
          "A plan may return a parameter or optimizer state with another sharding than it takes "
          "it in (the cost model charges that as resharding); one step's HLO then omits the "
          "collectives that bring it back for the next step. `carry` is the collective bytes of "
          "an XLA-compiled identity from each such output sharding to its input sharding.", ""]
    if check["bytes_carry"]:
        L += ["| workload | mesh | ILP step + carry | best preset | preset step + carry | "
              "ILP / preset |", "|---|---|---|---|---|---|"]
        for wl, mesh, ilp, best in check["bytes_carry"]:
            L.append(f"| {wl} | {mesh} | {fmt_b(ilp['hlo']['collective_bytes'])} + "
                     f"{fmt_b(carry_bytes(ilp))} | {best['method']} | "
                     f"{fmt_b(best['hlo']['collective_bytes'])} + {fmt_b(carry_bytes(best))} | "
                     f"{_ratio(two_step_bytes(ilp), two_step_bytes(best))} |")
    else:
        L.append("None.")
    if check["modelled"] or check["bytes"] or check["bytes_carry"]:
        L += ["", "### Facts about each loss (generated)", ""]
        seen = set()
        for wl, mesh, ilp, best in check["modelled"] + check["bytes"] + check["bytes_carry"]:
            if (wl, mesh, best["method"]) in seen:
                continue
            seen.add((wl, mesh, best["method"]))
            L += _diagnose(wl, mesh, ilp, best)

    L += ["", "## All rows", "",
          "Modelled: the plan's own cost (per device, per step). HLO: read from "
          "`compiled.as_text()`, `cost_analysis()` and `memory_analysis()` of the partitioned "
          "program (per device; memory = argument + output + temp − alias). Collectives: "
          "AR all-reduce, AG all-gather, RS reduce-scatter, A2A all-to-all, CP "
          "collective-permute — count × result bytes. Step ratio: step time / fastest preset's "
          "on the same workload and mesh (CPU virtual devices, so compute-bound and noisy).", ""]
    L += ["| workload | mesh | method | modelled total | compute / comm / reshard | "
          "modelled peak mem | HLO collectives | HLO coll. bytes | carry bytes | HLO flops/dev | "
          "HLO mem/dev | step | step / best preset | plan time |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            L.append(f"| {r['workload']} | {r['mesh']} | {r['method']} | error: "
                     f"{r['error'][:160].replace('|', '/')} ||||||||||")
            continue
        h = r.get("hlo") or {}
        mem = (h.get("memory") or {}).get("total")
        ratio = r.get("step_time_ratio_to_best_preset")
        pipe = r["method"] == PIPELINE
        mark = " †" if pipe and h else ""
        L.append(
            f"| {r['workload']} | {r['mesh']} | {'**ILP**' if r['method'] == ILP else r['method']}"
            f" | {fmt_s(r['modelled']['total_s'])} | {_breakdown(r)} | "
            f"{fmt_b(r['modelled']['peak_memory_bytes'])} | {_kinds(r)}{mark} | "
            f"{fmt_b(h.get('collective_bytes'))}{mark} | {fmt_b(carry_bytes(r))} | "
            f"{fmt_flops(h.get('flops'))}{mark} | {'n/a' if pipe and h else fmt_b(mem)} | "
            f"{fmt_s(r.get('step_time_s'))} | {'—' if ratio is None else f'{ratio:.2f}'} | "
            f"{r['planning_time_s']:.1f} s |")

    L += _pipeline_section(rows)
    L += _memory_section(rows)
    L += ["", "## Overhead: parallelized function vs hand-written `jax.jit`", "",
          "`jax.jit(fn, in_shardings=..., out_shardings=...)` with the ILP plan's own "
          "`in_specs`/`out_specs`, timed interleaved with the parallelized function "
          "(median). Ratio ≈ 1.0 means the runtime adds nothing. The hand-written jit pins only "
          "the inputs and outputs, so XLA may partition the intermediates differently; its HLO "
          "collective bytes are shown for comparison.", ""]
    L += ["| workload | mesh | parallelized | hand-written jit | ratio | ILP HLO coll. bytes | "
          "jit HLO coll. bytes |", "|---|---|---|---|---|---|---|"]
    ilp_bytes = {(r["workload"], r["mesh"]): (r.get("hlo") or {}).get("collective_bytes")
                 for r in rows if r["method"] == ILP}
    for o in result.get("overhead", []):
        if o.get("error"):
            L.append(f"| {o['workload']} | {o['mesh']} | error: {o['error'][:160]} ||||||")
            continue
        L.append(f"| {o['workload']} | {o['mesh']} | {fmt_s(o['parallelized_s'])} | "
                 f"{fmt_s(o['hand_jit_s'])} | {o['ratio']:.2f} | "
                 f"{fmt_b(ilp_bytes.get((o['workload'], o['mesh'])))} | "
                 f"{fmt_b(o['hand_jit_collective_bytes'])} |")
    if result.get("errors"):
        L += ["", "Errors: " + "; ".join(result["errors"])]
    L.append("")
    return "\n".join(L)


def _stages(r) -> str:
    st = r.get("stages") or []
    if not st:
        return "—"
    B = st[0]["num_microbatches"]
    if len(st) == 1 and B == 1:
        return "1 stage, whole mesh"
    parts = []
    for s in st:
        first, last = s["layers"][0], s["layers"][-1]
        layers = f"L{first}" if first == last else f"L{first}-{last}"
        parts.append(f"{layers} on {'x'.join(map(str, s['mesh_shape']))}")
    return f"B={B}: " + "; ".join(parts)


def _pipeline_section(rows) -> list[str]:
    """PipeshardParallel rows against the ILP on the same workload and mesh."""
    groups = _groups(rows)
    pipes = [(g[PIPELINE], g.get(ILP)) for g in groups.values()
             if PIPELINE in g and _ok(g[PIPELINE])]
    if not pipes:
        return []
    L = ["", "## Pipeline: PipeshardParallel against the ILP", "",
         "PipeshardParallel rows (workloads whose loss is a mean over samples; moe and "
         "wide_resnet change meaning under micro-batching): 2 micro-batches, the loss cut "
         "into 4 layers, the stage DP free to pick one stage or several, each stage sharded "
         "by the ILP. A pipeline is several programs on sub-meshes, so its † HLO columns are "
         "the busiest device's per step: Σ over the programs it runs (pre-gradient, stage "
         "forward and backward × micro-batches, apply-gradient) of their per-device "
         "collective bytes and flops. Activations cross between stages by `device_put`, "
         "outside every HLO; HLO memory is n/a (micro-batch residuals live between "
         "programs).", "",
         "| workload | mesh | stages | modelled total | × ILP | HLO coll. bytes † | × ILP | "
         "HLO flops/dev † | step | × ILP step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p, ilp in pipes:
        ok = _ok(ilp)
        pb = (p.get("hlo") or {}).get("collective_bytes")
        ib = (ilp.get("hlo") or {}).get("collective_bytes") if ok else None
        L.append(f"| {p['workload']} | {p['mesh']} | {_stages(p)} | "
                 f"{fmt_s(p['modelled']['total_s'])} | "
                 f"{_ratio(p['modelled']['total_s'], ilp['modelled']['total_s']) if ok else '—'}"
                 f" | {fmt_b(pb)} | {_ratio(pb, ib)} | "
                 f"{fmt_flops((p.get('hlo') or {}).get('flops'))} | {fmt_s(p.get('step_time_s'))}"
                 f" | {_ratio(p.get('step_time_s'), ilp.get('step_time_s') if ok else None)} |")
    return L


def _memory_section(rows) -> list[str]:
    """Modelled peak memory against XLA's memory_analysis of the same compiled program."""
    L = ["", "## Memory: modelled peak vs compiled `memory_analysis()`", "",
         "Ratio = XLA's argument + output + temp − alias bytes per device / the plan's "
         "liveness estimate (`plan.cost.peak_memory_bytes`). Target: within ±25% (0.75–1.25). "
         "XLA's CPU backend schedules without a memory-aware scheduler and lowers "
         "reduce-scatter to all-reduce + slice, so it can hold more than the model expects.", "",
         "| workload | mesh | method | modelled peak | HLO memory | ratio | within ±25% |",
         "|---|---|---|---|---|---|---|"]
    inside = total = 0
    for r in rows:
        mem = ((r.get("hlo") or {}).get("memory") or {}).get("total")
        est = (r.get("modelled") or {}).get("peak_memory_bytes")
        if r.get("error") or not mem or not est:
            continue
        ratio = mem / est
        ok = 0.75 <= ratio <= 1.25
        inside, total = inside + ok, total + 1
        L.append(f"| {r['workload']} | {r['mesh']} | {r['method']} | {fmt_b(est)} | "
                 f"{fmt_b(mem)} | {ratio:.2f} | {'yes' if ok else 'no'} |")
    L += ["", f"{inside} of {total} rows within ±25%."]
    return L


def write_markdown(result: dict, path: Path) -> None:
    """Write RESULTS.md, keeping any hand-written notes below NOTES_MARKER."""
    path = Path(path)
    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1]
    text = render(result) + "\n" + NOTES_MARKER + (notes if notes else "\n")
    path.write_text(text)


def merge(results: list[dict]) -> dict:
    """One result from several runs (later runs win for the same workload × mesh)."""
    merged = dict(results[0])
    keys = lambda r: (r["workload"], r["mesh"])  # noqa: E731
    rows, overhead = {}, {}
    for res in results:
        done = {keys(r) for r in res["rows"]}
        rows = {k: v for k, v in rows.items() if k[:2] not in done}
        overhead = {k: v for k, v in overhead.items() if k not in done}
        for r in res["rows"]:
            rows[keys(r) + (r["method"],)] = r
        for o in res.get("overhead", []):
            overhead[keys(o)] = o
    merged["rows"] = list(rows.values())
    merged["overhead"] = list(overhead.values())
    merged["command"] = " + ".join(r["command"] for r in results if r.get("command"))
    merged["wall_time_s"] = sum(r.get("wall_time_s", 0) for r in results)
    for k in ("workloads", "meshes"):
        merged[k] = {}
        for res in results:
            merged[k].update(res.get(k, {}))
    merged["errors"] = [e for res in results for e in res.get("errors", [])]
    return merged


def main(argv=None) -> int:
    """Re-render without re-running, merging runs if several are given:

    ``python -m benchmarks.report [results.json ...] [--out DIR]`` (default: benchmarks/).
    """
    import argparse
    import json
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    p.add_argument("inputs", nargs="*", default=[str(here / "results.json")])
    p.add_argument("--out", default=None, help="directory for results.json and RESULTS.md")
    opts = p.parse_args(argv)
    results = [json.loads(Path(f).read_text()) for f in opts.inputs]
    result = merge(results) if len(results) > 1 else results[0]
    out = Path(opts.out) if opts.out else Path(opts.inputs[0]).parent
    out.mkdir(parents=True, exist_ok=True)
    if len(results) > 1:
        (out / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out / "RESULTS.md")
    print(out / "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
