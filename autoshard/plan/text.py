"""The plan as text: ``Plan.summary()``."""
from __future__ import annotations

import math

from autoshard.cost_model import format_bytes, format_seconds

from .parts import StageAssignment


def plan_summary(plan, max_rows: int = 40) -> str:
    """Specs of inputs and outputs, modelled cost, costliest ops, collectives, stages,
    solver statistics and warnings, one table per part."""
    mesh = " × ".join(f"{n}={s}" for n, s in zip(plan.axis_names, plan.mesh_shape))
    lines = [f"autoshard plan — method {plan.method!r}, mesh {mesh}, cluster {plan.cluster.name}"]
    c = plan.cost
    lines.append(f"modelled cost per step: total {format_seconds(c.total_s)} = compute "
                 f"{format_seconds(c.compute_s)} + communication "
                 f"{format_seconds(c.communication_s)} + resharding "
                 f"{format_seconds(c.resharding_s)}; peak memory per device "
                 f"{format_bytes(c.peak_memory_bytes)}")
    lines.append(_batch_line(plan))
    if plan.remat is not None:
        lines.append(plan.remat.describe())
    lines += _alternatives(plan)
    in_shapes = _shapes(plan.in_shapes, len(plan.in_paths))
    out_shapes = _shapes(plan.out_shapes, len(plan.out_paths))
    order = sorted(range(len(plan.in_paths)), key=lambda k: (
        not _in_batch(plan.in_paths[k], plan.batch), -_size(in_shapes[k])))
    largest = ", then the largest" if plan.in_shapes else ""
    lines += _spec_table(f"inputs (the batch first{largest})" if plan.batch else
                         "inputs" + (" (the largest first)" if largest else ""),
                         [plan.in_paths[k] for k in order],
                         [plan.flat_in_specs[k] for k in order], max_rows,
                         [in_shapes[k] for k in order])
    order = sorted(range(len(plan.out_paths)), key=lambda k: -_size(out_shapes[k]))
    lines += _spec_table("outputs" + (" (the largest first)" if plan.out_shapes else ""),
                         [plan.out_paths[k] for k in order],
                         [plan.flat_out_specs[k] for k in order], max_rows,
                         [out_shapes[k] for k in order])
    if plan.top_ops:
        lines.append("costliest ops:")
        for op in plan.top_ops[:10]:
            where = f"{op.scope}  ({op.source})" if op.scope else op.source
            lines.append(f"  {format_seconds(op.seconds):>10}  {op.op:<24} {op.strategy:<28} "
                         f"{where}")
    by_kind: dict[str, tuple[int, float]] = {}
    for col in plan.collectives:
        n, s = by_kind.get(col.kind, (0, 0.0))
        by_kind[col.kind] = (n + 1, s + col.seconds)
    if by_kind:
        lines.append("collectives: " + ", ".join(
            f"{k} ×{n} ({format_seconds(s)})" for k, (n, s) in sorted(by_kind.items())))
    for i, st in enumerate(plan.stages):
        if isinstance(st, StageAssignment):
            if i == 0:
                lines.append(f"pipeline: {len(plan.stages)} stage(s), {st.num_microbatches} "
                             f"micro-batch(es), schedule {st.schedule}")
            lines.append(f"  stage {i}: {st!r}")
    if plan.solver is not None:
        lines.append(f"solver: {plan.solver.describe()}")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _shapes(shapes, count: int) -> list:
    """Per flat input/output its shape, or None where the plan does not record them."""
    return list(shapes) if len(shapes) == count else [None] * count


def _size(shape) -> int:
    return -1 if shape is None else math.prod(shape)


def _spec_table(title, paths, specs, max_rows, shapes):
    lines = [f"{title}:"]
    width = max((len(p) for p in paths[:max_rows]), default=0)
    spec_width = max((len(str(s)) for s in specs[:max_rows]), default=0)
    for path, spec, shape in list(zip(paths, specs, shapes))[:max_rows]:
        where = "" if shape is None else f"  {_shape_text(shape)}"
        lines.append(f"  {path:<{width}}  {str(spec):<{spec_width}}{where}".rstrip())
    if len(paths) > max_rows:
        lines.append(f"  … {len(paths) - max_rows} more")
    return lines


def _batch_line(plan) -> str:
    """Which arguments are the batch, and whether autoshard chose them."""
    what = ", ".join(plan.batch) if plan.batch else "none"
    if not plan.batch_inferred:
        return f"batch: {what} (batch_argnums)"
    return (f"batch: {what} (inferred: not returned, donated, a PRNG key or a scalar, "
            f"and sharing the last one's leading dim; pass batch_argnums to choose)")


def _alternatives(plan) -> list[str]:
    """The hand-written layouts priced by the same model, against this plan: what each
    would add (or save) in total and in which part, and whether this plan leaves the
    batch whole on some mesh axis that DataParallel splits it over."""
    if not plan.alternatives:
        return []
    c = plan.cost
    lines = ["hand-written layouts (method=autoshard.<name>()) priced by the same model, "
             "laid out as XLA's propagation lays out their fixed layouts (audit a preset's "
             "compiled program to see any difference):"]
    width = max(len(a.method) for a in plan.alternatives)
    for a in sorted(plan.alternatives, key=lambda a: a.total_s):
        parts = [(name, getattr(a, f) - getattr(c, f)) for name, f in (
            ("compute", "compute_s"), ("communication", "communication_s"),
            ("resharding", "resharding_s"), ("host copies", "input_s"))]
        because = ", ".join(f"{name} {_signed(d)}" for name, d in parts
                            if abs(d) > 0.005 * max(c.total_s, 1e-12))
        relative = f"{100 * (a.total_s / c.total_s - 1):+.1f}%" if c.total_s > 0 else ""
        lines.append(f"  {a.method:<{width}}  {format_seconds(a.total_s):>10}  {relative:>7}"
                     + (f"  ({because})" if because else ""))
    whole = _batch_left_whole(plan)
    if whole:
        lines.append(f"  (this plan keeps the batch whole on mesh axes {whole}: in this model "
                     f"splitting it as DataParallel does costs what its row says)")
    return lines


def _shape_text(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]" if shape else "scalar"


def _signed(seconds: float) -> str:
    return ("+" if seconds >= 0 else "−") + format_seconds(abs(seconds))


def _batch_left_whole(plan) -> list[str]:
    """Mesh axes (of size > 1) that no batch input of the plan is split over."""
    used: set[str] = set()
    found = False
    for path, spec in zip(plan.in_paths, plan.flat_in_specs):
        if _in_batch(path, plan.batch):
            found = True
            for entry in spec:
                used |= {entry} if isinstance(entry, str) else set(entry or ())
    if not found:
        return []
    return [n for n, s in zip(plan.axis_names, plan.mesh_shape) if s > 1 and n not in used]


def _in_batch(path: str, batch) -> bool:
    """Whether the flat input ``path`` (``"args[2]['x']"``) is under a batch argument
    (``"args[2]"``, or ``"args[2] (x=)"`` for one passed by keyword)."""
    head = path[:path.index("]") + 1] if path.startswith("args[") else path
    return any(b.split(" ")[0] == head for b in batch)
