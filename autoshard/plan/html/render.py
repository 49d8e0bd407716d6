"""HTML view of a :class:`~autoshard.Plan`: ``Plan._repr_html_`` (Jupyter) and ``Plan.save_html``.

Everything is inline (CSS in a ``<style>`` element, pictures as inline SVG): the page makes
no network fetches, uses no scripts and no web fonts. Every user-supplied string (pytree
paths, op names, source locations, warnings, stage fields) goes through :func:`html.escape`.

What is drawn
-------------
* Cost breakdown: compute / communication / resharding as one stacked bar, and per-device
  peak memory against the memory budget (``plan.memory_budget`` when a plan carries one)
  or the cluster's usable device memory.
* The mesh: devices numbered by mesh position (row-major; for ``autoshard.make_mesh`` on the
  host CPU this is the jax device id), one colour per mesh axis.
* One small picture per input (and, folded away, per output), grouped by pytree path
  prefix in ``<details>`` elements. A tensor whose spec names at most two dims is drawn
  like ``jax.debug.visualize_array_sharding``: a rectangle cut into its shard blocks, each
  block labelled with the devices that hold it; cuts are drawn in the colour of the mesh
  axis that makes them. Tensors with more split dims get their spec text and one split bar
  per dim. A plan records specs, not shapes, so the rank of ``P()``/``P('x')`` is not known:
  dim 0 is drawn top→bottom and dim 1 left→right. When shapes are available
  (``plan.in_shapes``/``plan.out_shapes`` if a plan carries them, or ``in_shapes=`` passed to
  :func:`plan_html`) the aspect ratio, rank and sizes are exact.
* Collectives (grouped by kind, then the costliest ones with their seconds), costliest ops,
  solver statistics and warnings.
* Pipeline plans (non-empty ``plan.stages``): a stage table and a timeline of micro-batches
  on stages over time for the schedule.

Stage data contract (``plan.stages``: a tuple of JSON-able dicts, one per stage, in pipeline
order; attribute-style objects with the same names also work)::

    {"layers": [0, 1, 2],            # layer indices or names this stage runs
     "mesh_shape": [1, 4],           # the stage's sub-mesh
     "device_ids": [0, 1, 2, 3],     # devices of the sub-mesh, row-major
     "cost": {"forward_s": 1e-3,     # seconds per micro-batch, forward pass
              "backward_s": 2e-3,    # seconds per micro-batch, backward pass
              "peak_memory_bytes": 123},   # optional
     "num_microbatches": 8,          # the schedule; the same in every stage
     "schedule": "1f1b"}             # "1f1b" (PipeDream-flush) or "gpipe"

``cost`` may also be a number (seconds per micro-batch, forward + backward) or a dict with
only ``total_s``/``seconds``; it is then split 1:2 between forward and backward.
``num_microbatches`` and ``schedule`` may instead be attributes of the plan.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from autoshard.cost_model import format_bytes, format_seconds
from autoshard.runtime import stage_orders

from .css import AXIS_COLOURS, COST_COLOURS, CSS
from .svg import MeshPicture, escape, mesh_svg, num, ranges, spec_text, stacked_bar, tensor_svg, timeline_svg

MAX_PICTURES = 2000        # inputs + outputs drawn; the rest are listed as text
MAX_COLLECTIVES = 50


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


_TOKEN = re.compile(r"""\['(?:[^'\\]|\\.)*'\]|\["(?:[^"\\]|\\.)*"\]|\[[^\]]*\]|\.[^.\[]+|[^.\[]+""")


def _split_path(path: str) -> list[str]:
    """``args[0]['layers'][3].mu`` → ``['args', "[0]", "['layers']", '[3]', '.mu']``."""
    parts = _TOKEN.findall(path)
    return parts if "".join(parts) == path and parts else [path]


class _Node:
    __slots__ = ("children", "items", "count")

    def __init__(self):
        self.children: dict[str, _Node] = {}
        # In path order: ("leaf", last component, flat index) or ("group", component, None).
        self.items: list[tuple[str, str, int | None]] = []
        self.count = 0


def _build_tree(paths: Sequence[str]) -> _Node:
    root = _Node()
    for i, path in enumerate(paths):
        parts = _split_path(path)
        node = root
        node.count += 1
        for part in parts[:-1]:
            if part not in node.children:
                node.children[part] = _Node()
                node.items.append(("group", part, None))
            node = node.children[part]
            node.count += 1
        node.items.append(("leaf", parts[-1], i))
    return root


def _render_tree(node: _Node, label: str, depth: int, total: int, draw) -> list[str]:
    # Fold chains of single-child groups: args[1] → [0] → .mu becomes args[1][0].mu.
    while len(node.items) == 1 and node.items[0][0] == "group":
        part = node.items[0][1]
        label, node = label + part, node.children[part]
    body, run = [], []
    for kind, part, i in node.items:
        if kind == "leaf":
            run.append(draw(i, part))
            continue
        if run:
            body.append('<div class="as-grid">' + "".join(run) + "</div>")
            run = []
        body += _render_tree(node.children[part], part, depth + 1, total, draw)
    if run:
        body.append('<div class="as-grid">' + "".join(run) + "</div>")
    if depth == 0 and not label:
        return body
    is_open = total <= 40 or node.count <= 12 or (depth <= 1 and total <= 400)
    return [f'<details{" open" if is_open else ""}><summary><code>{escape(label)}</code> '
            f'<span class="as-n">({node.count})</span></summary>'] + body + ["</details>"]


def _shape_list(shapes, n: int):
    if shapes is None:
        return [None] * n
    try:
        import jax
        leaves = jax.tree_util.tree_leaves(shapes)
        flat = [tuple(int(d) for d in (x.shape if hasattr(x, "shape") else x)) for x in leaves] \
            if leaves and hasattr(leaves[0], "shape") else [tuple(int(d) for d in s) for s in shapes]
    except Exception:  # noqa: BLE001 - shapes are a nicety; never break the view over them
        return [None] * n
    return flat if len(flat) == n else [None] * n


def _specs_section(mesh: MeshPicture, title: str, paths, specs, shapes, prefix: str,
                   budget: list[int], open_: bool) -> str:
    n = len(paths)

    def draw(i: int, name: str) -> str:
        shape = shapes[i]
        spec_txt = spec_text(specs[i])
        shape_txt = "" if shape is None else f" · {tuple(shape)}"
        if budget[0] > 0:
            budget[0] -= 1
            pic = tensor_svg(mesh, specs[i], shape, f"{prefix}{i}")
        else:
            pic = ""
        return (f'<div class="as-t" data-{prefix}="{i}" title="{escape(paths[i])}">{pic}'
                f'<div class="as-name"><code>{escape(name)}</code></div>'
                f'<div class="as-spec"><code>{escape(spec_txt)}</code>{escape(shape_txt)}</div></div>')

    body = _render_tree(_build_tree(paths), "", 0, n, draw)
    return (f'<details{" open" if open_ else ""}><summary><b>{escape(title)}</b> '
            f'<span class="as-n">({n})</span></summary>' + "".join(body) + "</details>")


def _cost_section(plan) -> str:
    c = plan.cost
    parts = [("compute", c.compute_s, COST_COLOURS["compute"]),
             ("communication", c.communication_s, COST_COLOURS["communication"]),
             ("resharding", c.resharding_s, COST_COLOURS["resharding"])]
    total = c.total_s
    legend = "".join(
        f'<span class="sw" style="background:{col}"></span>{escape(name)} {escape(format_seconds(v))}'
        f' ({(v / total if total > 0 else 0):.0%})' for name, v, col in parts)
    out = [f'<h4>Modelled cost per step: {escape(format_seconds(total))}</h4>', stacked_bar(parts),
           f'<div class="as-legend">{legend}</div>']
    # Memory: peak per device against the budget (if the plan carries one) or the device.
    peak = int(c.peak_memory_bytes)
    cluster = plan.cluster
    device_mem = int(getattr(cluster, "device_memory", 0) or 0)
    reserve = int(getattr(cluster, "memory_reserve", 0) or 0)
    budget = getattr(plan, "memory_budget", None)
    if budget:
        cap, cap_name = int(budget), "memory budget"
    elif reserve:   # an accelerator preset: its memory less what the runtime keeps
        cap, cap_name = device_mem - reserve, "usable device memory"
    else:           # the host CPU: a modelling figure, no limit is enforced
        cap, cap_name = device_mem, f"the {cluster.name} cluster's memory figure (not a limit)"
    width, height = 640.0, 18.0
    frac = peak / cap if cap > 0 else 0.0
    colour = "#59a14f" if frac <= 0.8 else "#edc948" if frac <= 1.0 else "#e15759"
    w = width * min(1.0, frac)
    svg = (f'<svg width="{num(width)}" height="{num(height)}">'
           f'<rect x="0" y="0" width="{num(width)}" height="{num(height)}" fill="#f2f2f2" stroke="#ccc"/>'
           f'<rect x="0" y="0" width="{num(max(w, 1.0 if peak else 0.0))}" height="{num(height)}" '
           f'fill="{colour}"/></svg>')
    detail = f"device memory {format_bytes(device_mem)}" if device_mem else ""
    if budget and device_mem:
        detail += f", budget {format_bytes(int(budget))}"
    out.append(f'<h4>Peak memory per device: {escape(format_bytes(peak))} '
               f'<span class="as-muted">of {escape(format_bytes(cap))} {escape(cap_name)} '
               f'({frac:.2%})</span></h4>{svg}'
               f'<div class="as-muted">{escape(detail)}</div>')
    if getattr(plan, "remat", None) is not None:
        out.append(f"<div>{escape(plan.remat.describe())}</div>")
    return "".join(out)


def _alternatives_section(plan) -> str:
    """The batch taken, and the hand-written layouts priced by the same model (searched
    plans only), as in ``Plan.summary``."""
    out = []
    batch = getattr(plan, "batch", ())
    if batch:
        how = "inferred" if getattr(plan, "batch_inferred", False) else "batch_argnums"
        out.append(f"<div>batch: <code>{escape(', '.join(batch))}</code> "
                   f"<span class='as-muted'>({how})</span></div>")
    alternatives = sorted(getattr(plan, "alternatives", ()), key=lambda a: a.total_s)
    total = plan.cost.total_s
    if alternatives:
        rows = "".join(
            f"<tr><td><code>{escape(a.method)}</code></td>"
            f"<td>{escape(format_seconds(a.total_s))}</td>"
            f"<td>{(a.total_s / total - 1 if total > 0 else 0):+.1%}</td>"
            f"<td>{escape(format_seconds(a.compute_s))}</td>"
            f"<td>{escape(format_seconds(a.communication_s))}</td>"
            f"<td>{escape(format_seconds(a.resharding_s))}</td></tr>" for a in alternatives)
        out.append("<details><summary><b>Hand-written layouts priced by the same model</b> "
                   f"<span class='as-n'>({len(alternatives)})</span></summary>"
                   "<table><tr><th>method</th><th>total</th><th>vs this plan"
                   "</th><th>compute</th><th>communication</th><th>resharding</th></tr>"
                   f"{rows}</table></details>")
    return "".join(out)


def _collectives_section(plan) -> str:
    cols = list(plan.collectives)
    if not cols:
        return "<h4>Collectives</h4><div class='as-muted'>none: the plan needs no communication</div>"
    by_kind: dict[str, list[float]] = {}
    for col in cols:
        by_kind.setdefault(str(col.kind), []).append(float(col.seconds))
    rows = "".join(f"<tr><td>{escape(k)}</td><td class='num'>{len(v)}</td>"
                   f"<td class='num'>{escape(format_seconds(sum(v)))}</td></tr>"
                   for k, v in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])))
    out = [f"<h4>Collectives ({len(cols)})</h4><table><tr><th>kind</th><th>count</th>"
           f"<th>seconds</th></tr>{rows}</table>"]
    top = sorted(cols, key=lambda col: -float(col.seconds))[:MAX_COLLECTIVES]
    biggest = max((float(col.seconds) for col in top), default=0.0) or 1.0
    kinds = sorted(by_kind)
    palette = {k: AXIS_COLOURS[(i + 1) % len(AXIS_COLOURS)] for i, k in enumerate(kinds)}
    body = []
    for col in top:
        w = 160 * float(col.seconds) / biggest
        bar = (f'<svg width="160" height="10">'
               f'<rect x="0" y="0" width="{num(max(w, 0.5))}" height="10" '
               f'fill="{palette[str(col.kind)]}"/></svg>')
        body.append(f"<tr><td><code>{escape(col.op)}</code></td><td>{escape(col.kind)}</td>"
                    f"<td class='num'>{escape(format_seconds(col.seconds))}</td><td>{bar}</td></tr>")
    more = "" if len(cols) <= len(top) else \
        f"<div class='as-muted'>… {len(cols) - len(top)} smaller ones not listed</div>"
    out.append(f"<details{' open' if len(cols) <= 12 else ''}><summary>costliest collectives</summary>"
               f"<table><tr><th>op</th><th>kind</th><th>seconds</th><th></th></tr>"
               + "".join(body) + f"</table>{more}</details>")
    return "".join(out)


def _top_ops_section(plan) -> str:
    ops = list(plan.top_ops)[:20]
    if not ops:
        return ""
    rows = "".join(f"<tr><td class='num'>{escape(format_seconds(op.seconds))}</td>"
                   f"<td><code>{escape(op.op)}</code></td>"
                   f"<td><code>{escape(getattr(op, 'scope', ''))}</code></td>"
                   f"<td><code>{escape(op.strategy)}</code></td><td><code>{escape(op.source)}</code></td></tr>"
                   for op in ops)
    return (f"<details><summary><b>Costliest ops</b> <span class='as-n'>({len(ops)})</span></summary>"
            f"<table><tr><th>seconds</th><th>op</th><th>module path</th><th>strategy</th>"
            f"<th>source</th></tr>{rows}</table></details>")


def _solver_section(plan) -> str:
    out = []
    s = plan.solver
    if s is not None:
        out.append(f"<div class='as-muted'>solver: {escape(s.describe())}</div>")
    for w in plan.warnings:
        out.append(f"<div class='as-warn'>warning: {escape(w)}</div>")
    return "".join(out)


def _stage_times(stage) -> tuple[float, float]:
    cost = _get(stage, "cost", 0.0)
    if isinstance(cost, (int, float)):
        return float(cost) / 3, 2 * float(cost) / 3
    fwd, bwd = _get(cost, "forward_s"), _get(cost, "backward_s")
    if fwd is not None and bwd is not None:
        return float(fwd), float(bwd)
    total = _get(cost, "total_s", _get(cost, "seconds", 0.0)) or 0.0
    total = float(total)
    if fwd is not None:
        return float(fwd), max(0.0, total - float(fwd))
    return total / 3, 2 * total / 3


def simulate_schedule(forward_s: Sequence[float], backward_s: Sequence[float],
                      num_microbatches: int, schedule: str = "1f1b"):
    """Events ``(stage, 'F'|'B', microbatch, start_s, end_s)`` of a pipeline schedule.

    ``gpipe``: every stage runs all forwards, then all backwards. ``1f1b`` (PipeDream-flush):
    stage ``s`` of ``S`` runs ``S - s - 1`` warm-up forwards, then alternates one forward
    and one backward, then drains the backwards. A forward waits for the previous stage's
    forward of the same micro-batch; a backward for the next stage's backward.
    """
    S, B = len(forward_s), int(num_microbatches)
    schedule = str(schedule).lower().replace("-", "").replace("_", "")
    orders = stage_orders(S, B, schedule)
    done: dict[tuple[str, int, int], float] = {}
    ptr, free, events = [0] * S, [0.0] * S, []
    progress = True
    while progress:
        progress = False
        for s in range(S):
            while ptr[s] < len(orders[s]):
                kind, m = orders[s][ptr[s]]
                if kind == "F":
                    dep = ("F", s - 1, m) if s > 0 else None
                else:
                    dep = ("B", s + 1, m) if s < S - 1 else ("F", s, m)
                if dep is not None and dep not in done:
                    break
                start = max(free[s], done[dep] if dep is not None else 0.0)
                end = start + (forward_s[s] if kind == "F" else backward_s[s])
                done[(kind, s, m)] = end
                free[s] = end
                events.append((s, kind, m, start, end))
                ptr[s] += 1
                progress = True
    return events


def _layers_text(layers) -> str:
    if layers is None:
        return ""
    if isinstance(layers, (str, int)):
        return str(layers)
    layers = list(layers)
    if layers and all(isinstance(x, int) for x in layers):
        return ranges(layers)
    return ", ".join(str(x) for x in layers)


def _stages_section(plan) -> str:
    stages = list(plan.stages)
    first = stages[0]
    B = _get(first, "num_microbatches", getattr(plan, "num_microbatches", 1)) or 1
    schedule = _get(first, "schedule", getattr(plan, "schedule", "1f1b")) or "1f1b"
    times = [_stage_times(st) for st in stages]
    fwd, bwd = [t[0] for t in times], [t[1] for t in times]
    rows = []
    for i, st in enumerate(stages):
        mesh_shape = _get(st, "mesh_shape", ())
        devs = _get(st, "device_ids", ())
        mem = _get(_get(st, "cost", {}), "peak_memory_bytes") if not isinstance(
            _get(st, "cost", 0), (int, float)) else None
        rows.append(f"<tr><td>{i}</td><td><code>{escape(_layers_text(_get(st, 'layers')))}</code></td>"
                    f"<td>{escape('×'.join(str(n) for n in mesh_shape or ()))}</td>"
                    f"<td><code>{escape(ranges([int(d) for d in devs]) if devs else '')}</code></td>"
                    f"<td class='num'>{escape(format_seconds(fwd[i]))}</td>"
                    f"<td class='num'>{escape(format_seconds(bwd[i]))}</td>"
                    f"<td class='num'>{escape(format_bytes(int(mem)) if mem is not None else '')}</td></tr>")
    out = [f"<h4>Pipeline: {len(stages)} stages, {escape(B)} micro-batches, schedule {escape(schedule)}</h4>",
           "<table><tr><th>stage</th><th>layers</th><th>sub-mesh</th><th>devices</th>"
           "<th>forward / µbatch</th><th>backward / µbatch</th><th>peak memory</th></tr>",
           "".join(rows), "</table>"]
    events = simulate_schedule(fwd, bwd, int(B), str(schedule))
    out.append(timeline_svg(events, len(stages), int(B)))
    return "".join(out)


def plan_html(plan, *, in_shapes=None, out_shapes=None, max_pictures: int = MAX_PICTURES) -> str:
    """The plan as an HTML fragment (a ``<div>`` with its own ``<style>``) for Jupyter.

    ``in_shapes``/``out_shapes``: optional shapes of the flat inputs/outputs (a sequence of
    shape tuples, or a pytree of arrays / ``ShapeDtypeStruct`` such as the example args);
    default ``plan.in_shapes``/``plan.out_shapes`` when a plan has them.
    """
    mesh = MeshPicture(plan.mesh_shape, plan.axis_names)
    in_shapes = _shape_list(in_shapes if in_shapes is not None else getattr(plan, "in_shapes", None),
                            len(plan.in_paths))
    out_shapes = _shape_list(out_shapes if out_shapes is not None
                             else getattr(plan, "out_shapes", None), len(plan.out_paths))
    mesh_txt = " × ".join(f"{n}={s}" for n, s in zip(plan.axis_names, plan.mesh_shape))
    cluster_name = getattr(plan.cluster, "name", "")
    legend = "".join(f'<span class="sw" style="background:{mesh.colour(a)}"></span>{escape(a)}'
                     f' ({mesh.axis_size(a)})' for a in mesh.names)
    out = ['<div class="autoshard-plan">', f"<style>{CSS}</style>",
           f"<h3>autoshard plan — <code>{escape(plan.method)}</code></h3>",
           f"<div>mesh {escape(mesh_txt)} ({mesh.size} devices), cluster {escape(cluster_name)}, "
           f"{len(plan.in_paths)} inputs, {len(plan.out_paths)} outputs</div>",
           _cost_section(plan), _alternatives_section(plan)]
    if plan.stages:
        try:
            out.append(_stages_section(plan))
        except Exception as err:  # noqa: BLE001 - a malformed stage must not hide the rest
            out.append(f"<div class='as-warn'>cannot draw the pipeline stages: {escape(err)}</div>")
    out.append(f'<h4>Shardings</h4><div style="display:flex;gap:16px;align-items:center">'
               f'{mesh_svg(mesh)}<div><div class="as-legend">mesh axes:{legend}</div>'
               f'<div class="as-muted">each tensor is drawn cut into its shard blocks (dim 0 ↓, '
               f'dim 1 →), labelled with the devices holding the block; cuts take the colour '
               f'of the mesh axis that makes them. Devices are numbered by mesh position.</div>'
               f'</div></div>')
    budget = [int(max_pictures)]
    out.append(_specs_section(mesh, "inputs", plan.in_paths, plan.flat_in_specs, in_shapes,
                              "input", budget, open_=True))
    out.append(_specs_section(mesh, "outputs", plan.out_paths, plan.flat_out_specs, out_shapes,
                              "output", budget, open_=False))
    if budget[0] <= 0:
        out.append(f"<div class='as-muted'>only the first {int(max_pictures)} tensors are drawn</div>")
    out.append(_collectives_section(plan))
    out.append(_top_ops_section(plan))
    out.append(_solver_section(plan))
    out.append("</div>")
    return "\n".join(x for x in out if x)


def plan_page(plan, **kwargs) -> str:
    """A complete, self-contained HTML document (no external resources) showing the plan."""
    title = f"autoshard plan — {plan.method}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<style>body{margin:16px;background:#fff}</style></head><body>\n"
            + plan_html(plan, **kwargs) + "\n</body></html>\n")
