"""The tables the command line prints: a plan, presets' costs side by side, two plans'
differences."""
from __future__ import annotations

import math
from typing import Sequence

from autoshard.cost_model import format_bytes, format_seconds

_COST_FIELDS = (("total", "total_s", format_seconds), ("compute", "compute_s", format_seconds),
                ("communication", "communication_s", format_seconds),
                ("resharding", "resharding_s", format_seconds),
                ("peak memory", "peak_memory_bytes", format_bytes))


def cost_table(rows: Sequence[tuple[str, object]], reference=None) -> str:
    """rows: (label, PlanCost or an error string). ``reference``: cost the last column divides by."""
    header = ["method"] + [name for name, _, _ in _COST_FIELDS] + (["vs plan"] if reference else [])
    table = [header]
    for label, cost in rows:
        if isinstance(cost, str):
            table.append([label, cost])
            continue
        row = [label] + [fmt(getattr(cost, attr)) for _, attr, fmt in _COST_FIELDS]
        if reference is not None:
            ratio = cost.total_s / reference.total_s if reference.total_s > 0 else math.nan
            row.append(f"{ratio:.2f}×")
        table.append(row)
    full = [r for r in table if len(r) == len(header)]
    widths = [max(len(r[i]) for r in full) for i in range(len(header))]
    lines = []
    for r in table:
        if len(r) != len(header):
            lines.append(f"  {r[0]:<{widths[0]}}  {r[1]}")
            continue
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def show_text(plan) -> str:
    return plan.summary() + f"\nsignature fingerprint: {plan.fingerprint}"


def _spec_diff(title, a_paths, a_specs, b_paths, b_specs) -> list[str]:
    a, b = dict(zip(a_paths, a_specs)), dict(zip(b_paths, b_specs))
    order = list(a_paths) + [p for p in b_paths if p not in a]
    diffs = [(p, a.get(p), b.get(p)) for p in order if a.get(p) != b.get(p)]
    lines = [f"{title}: {len(diffs)} of {len(order)} differ" + (":" if diffs else "")]
    width = max((len(p) for p, _, _ in diffs), default=0)
    for p, sa, sb in diffs:
        lines.append(f"  {p + ':':<{width + 1}}  {'(absent)' if sa is None else sa} → "
                     f"{'(absent)' if sb is None else sb}")
    return lines


def compare_text(a, b, name_a: str = "A", name_b: str = "B") -> str:
    def head(tag, name, p):
        mesh = " × ".join(f"{n}={s}" for n, s in zip(p.axis_names, p.mesh_shape))
        return f"{tag}: {name} — method {p.method!r}, mesh {mesh}, cluster {p.cluster.name}"

    lines = [head("A", name_a, a), head("B", name_b, b)]
    if a.fingerprint != b.fingerprint:
        lines.append(f"note: the plans are for different input signatures "
                     f"(fingerprints {a.fingerprint} and {b.fingerprint})")
    lines += _spec_diff("inputs", a.in_paths, a.flat_in_specs, b.in_paths, b.flat_in_specs)
    lines += _spec_diff("outputs", a.out_paths, a.flat_out_specs, b.out_paths, b.flat_out_specs)
    lines.append("cost (B − A):")
    table = [("", "A", "B", "B − A", "B / A")]
    for name, attr, fmt in _COST_FIELDS:
        va, vb = getattr(a.cost, attr), getattr(b.cost, attr)
        delta = vb - va
        sign = "+" if delta > 0 else ""
        ratio = f"{vb / va:.2f}×" if va else ("—" if not vb else "∞")
        table.append((name, fmt(va), fmt(vb), sign + fmt(delta), ratio))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for r in table:
        lines.append("  " + "  ".join([r[0].ljust(widths[0])] +
                                      [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip())
    return "\n".join(lines)
