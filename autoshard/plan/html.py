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

import html
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from autoshard.cost_model import format_bytes
from autoshard.runtime import stage_orders

__all__ = ["plan_html", "plan_page", "simulate_schedule"]

AXIS_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#e15759", "#76b7b2",
                "#edc948", "#9c755f")
COST_COLOURS = {"compute": "#4e79a7", "communication": "#f28e2b", "resharding": "#e15759"}
MAX_PICTURES = 2000        # inputs + outputs drawn; the rest are listed as text
MAX_COLLECTIVES = 50
MAX_TIMELINE_OPS = 4000

_CSS = """
.autoshard-plan{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 font-size:13px;color:#222;line-height:1.35;max-width:1150px}
.autoshard-plan h3{font-size:16px;margin:4px 0 8px}
.autoshard-plan h4{font-size:14px;margin:12px 0 4px}
.autoshard-plan code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.autoshard-plan table{border-collapse:collapse;margin:4px 0}
.autoshard-plan td,.autoshard-plan th{padding:2px 8px;text-align:left;vertical-align:top;
 border-bottom:1px solid #eee}
.autoshard-plan th{font-weight:600;border-bottom:1px solid #ccc}
.autoshard-plan td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.autoshard-plan details{margin:2px 0 2px 6px;padding-left:8px;border-left:2px solid #e3e3e3}
.autoshard-plan summary{cursor:pointer;font-weight:500}
.autoshard-plan summary .as-n{color:#888;font-weight:400}
.autoshard-plan .as-grid{display:flex;flex-wrap:wrap;gap:6px;margin:4px 0 6px}
.autoshard-plan .as-t{border:1px solid #e3e3e3;border-radius:4px;padding:4px;background:#fff}
.autoshard-plan .as-name{font-weight:500;max-width:190px;overflow-wrap:anywhere}
.autoshard-plan .as-spec{color:#555}
.autoshard-plan .as-legend span.sw{display:inline-block;width:10px;height:10px;border-radius:2px;
 margin:0 4px 0 10px;vertical-align:-1px}
.autoshard-plan .as-warn{color:#a33}
.autoshard-plan .as-muted{color:#888}
"""


# --------------------------------------------------------------------------- helpers
def _e(value: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def _fmt_s(seconds: float) -> str:
    seconds = float(seconds)
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _num(x: float) -> str:
    """SVG coordinate."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _spec_entries(spec) -> list:
    try:
        return list(spec)
    except TypeError:
        return []


def _entry_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, (tuple, list)):
        return tuple(str(a) for a in entry)
    return ()


def _spec_text(spec) -> str:
    parts = []
    for entry in _spec_entries(spec):
        if entry is None:
            parts.append("None")
        elif isinstance(entry, str):
            parts.append(repr(entry))
        elif isinstance(entry, (tuple, list)):
            parts.append("(" + ", ".join(repr(a) for a in entry) + ("," if len(entry) == 1 else "")
                         + ")")
        else:
            parts.append(str(entry))
    return "P(" + ", ".join(parts) + ")"


def _ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 3, 6] → '0–3,6'."""
    ids = sorted(ids)
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if j == i else
                   f"{ids[i]},{ids[j]}" if j == i + 1 else f"{ids[i]}–{ids[j]}")
        i = j + 1
    return ",".join(out)


class _Mesh:
    """Mesh shape, axis names, colours and the device → coordinate table."""

    def __init__(self, shape: Sequence[int], names: Sequence[str]):
        self.shape = tuple(int(n) for n in shape)
        self.names = tuple(str(n) for n in names)
        self.size = int(math.prod(self.shape))
        self.index = {n: i for i, n in enumerate(self.names)}
        self.coords = (np.stack(np.unravel_index(np.arange(self.size), self.shape), axis=1)
                       if self.shape else np.zeros((1, 0), dtype=int))

    def colour(self, axis: str) -> str:
        i = self.index.get(axis)
        return "#999" if i is None else AXIS_COLOURS[i % len(AXIS_COLOURS)]

    def axis_size(self, axis: str) -> int:
        i = self.index.get(axis)
        return 1 if i is None else self.shape[i]

    def dim_split(self, axes: Sequence[str]) -> int:
        return int(math.prod(self.axis_size(a) for a in axes))

    def shard_index(self, axes: Sequence[str]) -> np.ndarray:
        """For every device: which shard (0..split-1) of a dim split over ``axes`` it holds."""
        idx = np.zeros(self.size, dtype=int)
        for a in axes:
            i = self.index.get(a)
            if i is not None:
                idx = idx * self.shape[i] + self.coords[:, i]
        return idx

    def boundary_axis(self, axes: Sequence[str], k: int) -> tuple[str, int]:
        """The axis whose step makes the cut before shard ``k`` of a dim split over ``axes``,
        and its rank (0 = most major) — major-axis cuts are drawn thicker."""
        known = [a for a in axes if a in self.index]
        stride = self.dim_split(known)
        for rank, a in enumerate(known):
            stride //= self.axis_size(a)
            if k % stride == 0:
                return a, rank
        return (known[-1] if known else "?"), len(known)


# --------------------------------------------------------------------------- pictures
def _tensor_svg(mesh: _Mesh, spec, shape: tuple[int, ...] | None, tag: str) -> str:
    entries = _spec_entries(spec)
    rank = len(shape) if shape is not None else None
    if (rank is not None and rank > 2) or (rank is None and len(entries) > 2):
        return _split_bars_svg(mesh, entries, shape, tag)
    return _grid_svg(mesh, entries, shape, tag)


def _grid_svg(mesh: _Mesh, entries: list, shape, tag: str) -> str:
    """A 0/1/2-D tensor as a rectangle cut into shard blocks labelled with their devices."""
    row_axes = _entry_axes(entries[0]) if len(entries) > 0 else ()
    col_axes = _entry_axes(entries[1]) if len(entries) > 1 else ()
    if shape is not None and len(shape) == 1:      # a vector: one row, like visualize_array_sharding
        row_axes, col_axes = (), row_axes
    nr, nc = mesh.dim_split(row_axes), mesh.dim_split(col_axes)
    width = 150.0
    if shape is not None and len(shape) == 2 and min(shape) > 0:
        height = width * min(1.6, max(0.25, shape[0] / shape[1]))
    elif shape is not None and len(shape) <= 1:
        height = 34.0 if nr == 1 else 60.0
    else:
        height = 90.0
    rows = mesh.shard_index(row_axes)
    cols = mesh.shard_index(col_axes)
    holders: dict[tuple[int, int], list[int]] = {}
    for dev in range(mesh.size):
        holders.setdefault((int(rows[dev]), int(cols[dev])), []).append(dev)
    used = [a for a in row_axes + col_axes if a in mesh.index]
    base = mesh.colour(used[0]) if used else "#bbbbbb"
    bw, bh = width / nc, height / nr
    pad = 1.0
    out = [f'<svg class="as-svg" data-tensor="{_e(tag)}" '
           f'width="{_num(width + 2 * pad)}" height="{_num(height + 2 * pad)}" '
           f'viewBox="{_num(-pad)} {_num(-pad)} {_num(width + 2 * pad)} {_num(height + 2 * pad)}">']
    for r in range(nr):
        for c in range(nc):
            devs = holders.get((r, c), [])
            label = _ranges(devs)
            opacity = 0.22 if not used else (0.30 if (r + c) % 2 == 0 else 0.55)
            x, y = c * bw, r * bh
            title = f"shard ({r}, {c}) on device(s) {label}"
            out.append(f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(bw)}" height="{_num(bh)}" '
                       f'fill="{base}" fill-opacity="{opacity}"><title>{_e(title)}</title></rect>')
            size = min(11.0, bh * 0.6, 1.75 * bw / max(1, len(label)))
            if size >= 5:
                out.append(f'<text x="{_num(x + bw / 2)}" y="{_num(y + bh / 2)}" font-size="{_num(size)}" '
                           f'text-anchor="middle" dominant-baseline="central" fill="#222">'
                           f'{_e(label)}</text>')
    for k in range(1, nr):   # horizontal cuts: the row axis
        axis, level = mesh.boundary_axis(row_axes, k)
        out.append(f'<line x1="0" x2="{_num(width)}" y1="{_num(k * bh)}" y2="{_num(k * bh)}" '
                   f'stroke="{mesh.colour(axis)}" stroke-width="{2.5 if level == 0 else 1.2}"/>')
    for k in range(1, nc):   # vertical cuts: the column axis
        axis, level = mesh.boundary_axis(col_axes, k)
        out.append(f'<line y1="0" y2="{_num(height)}" x1="{_num(k * bw)}" x2="{_num(k * bw)}" '
                   f'stroke="{mesh.colour(axis)}" stroke-width="{2.5 if level == 0 else 1.2}"/>')
    out.append(f'<rect x="0" y="0" width="{_num(width)}" height="{_num(height)}" fill="none" '
               f'stroke="#555" stroke-width="1"/></svg>')
    return "".join(out)


def _split_bars_svg(mesh: _Mesh, entries: list, shape, tag: str) -> str:
    """Higher-rank tensors: one bar per dim, cut into that dim's shards."""
    rank = len(shape) if shape is not None else len(entries)
    label_w, bar_w, row_h = 34.0, 116.0, 16.0
    height = rank * row_h + 2
    out = [f'<svg class="as-svg" data-tensor="{_e(tag)}" '
           f'width="{_num(label_w + bar_w + 2)}" height="{_num(height)}">']
    for d in range(rank):
        axes = _entry_axes(entries[d]) if d < len(entries) else ()
        n = mesh.dim_split(axes)
        y = d * row_h + 1
        out.append(f'<text x="0" y="{_num(y + row_h / 2)}" font-size="10" dominant-baseline="central" '
                   f'fill="#555">dim {d}</text>')
        known = [a for a in axes if a in mesh.index]
        fill = mesh.colour(known[0]) if known else "#bbbbbb"
        seg = bar_w / n
        for k in range(n):
            op = 0.22 if not known else (0.30 if k % 2 == 0 else 0.55)
            out.append(f'<rect x="{_num(label_w + k * seg)}" y="{_num(y + 2)}" width="{_num(seg)}" '
                       f'height="{_num(row_h - 4)}" fill="{fill}" fill-opacity="{op}"/>')
        for k in range(1, n):
            axis, level = mesh.boundary_axis(axes, k)
            x = label_w + k * seg
            out.append(f'<line x1="{_num(x)}" x2="{_num(x)}" y1="{_num(y + 2)}" y2="{_num(y + row_h - 2)}" '
                       f'stroke="{mesh.colour(axis)}" stroke-width="{2 if level == 0 else 1}"/>')
        out.append(f'<rect x="{_num(label_w)}" y="{_num(y + 2)}" width="{_num(bar_w)}" '
                   f'height="{_num(row_h - 4)}" fill="none" stroke="#555" stroke-width="0.8"/>')
        if n > 1:
            txt = "×".join(axes) + f" /{n}"
            out.append(f'<text x="{_num(label_w + bar_w / 2)}" y="{_num(y + row_h / 2)}" font-size="9" '
                       f'text-anchor="middle" dominant-baseline="central" fill="#222">{_e(txt)}</text>')
    out.append("</svg>")
    return "".join(out)


def _mesh_svg(mesh: _Mesh) -> str:
    """The device mesh: ids at their mesh position, axes in their colours."""
    if len(mesh.shape) > 2 or mesh.size > 256:
        return ""
    rows, cols = (mesh.shape if len(mesh.shape) == 2 else (1, mesh.shape[0]))
    cell, left, top = 30.0, 20.0, 18.0
    w, h = left + cols * cell + 4, top + rows * cell + 4
    out = [f'<svg width="{_num(w)}" height="{_num(h)}" style="flex:none">']
    col_axis = mesh.names[-1]
    row_axis = mesh.names[0] if len(mesh.shape) == 2 else None
    out.append(f'<text x="{_num(left)}" y="11" font-size="10" fill="{mesh.colour(col_axis)}">'
               f'{_e(col_axis)} →</text>')
    if row_axis is not None:
        out.append(f'<text x="3" y="{_num(top)}" font-size="10" fill="{mesh.colour(row_axis)}" '
                   f'transform="rotate(90 3 {_num(top)})">{_e(row_axis)} →</text>')
    for r in range(rows):
        for c in range(cols):
            x, y = left + c * cell, top + r * cell
            out.append(f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(cell - 2)}" '
                       f'height="{_num(cell - 2)}" rx="3" fill="#f4f4f4" stroke="#999"/>')
            out.append(f'<text x="{_num(x + cell / 2 - 1)}" y="{_num(y + cell / 2 - 1)}" font-size="11" '
                       f'text-anchor="middle" dominant-baseline="central">{r * cols + c}</text>')
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------- grouping
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
    return [f'<details{" open" if is_open else ""}><summary><code>{_e(label)}</code> '
            f'<span class="as-n">({node.count})</span></summary>'] + body + ["</details>"]


# --------------------------------------------------------------------------- sections
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


def _specs_section(mesh: _Mesh, title: str, paths, specs, shapes, prefix: str,
                   budget: list[int], open_: bool) -> str:
    n = len(paths)

    def draw(i: int, name: str) -> str:
        shape = shapes[i]
        spec_txt = _spec_text(specs[i])
        shape_txt = "" if shape is None else f" · {tuple(shape)}"
        if budget[0] > 0:
            budget[0] -= 1
            pic = _tensor_svg(mesh, specs[i], shape, f"{prefix}{i}")
        else:
            pic = ""
        return (f'<div class="as-t" data-{prefix}="{i}" title="{_e(paths[i])}">{pic}'
                f'<div class="as-name"><code>{_e(name)}</code></div>'
                f'<div class="as-spec"><code>{_e(spec_txt)}</code>{_e(shape_txt)}</div></div>')

    body = _render_tree(_build_tree(paths), "", 0, n, draw)
    return (f'<details{" open" if open_ else ""}><summary><b>{_e(title)}</b> '
            f'<span class="as-n">({n})</span></summary>' + "".join(body) + "</details>")


def _stacked_bar(parts: Sequence[tuple[str, float, str]], width: float = 640, height: float = 22) -> str:
    total = sum(max(0.0, v) for _, v, _ in parts)
    out = [f'<svg width="{_num(width)}" height="{_num(height)}">',
           f'<rect x="0" y="0" width="{_num(width)}" height="{_num(height)}" fill="#f2f2f2"/>']
    x = 0.0
    for name, value, colour in parts:
        w = 0.0 if total <= 0 else width * max(0.0, value) / total
        if w > 0:
            out.append(f'<rect x="{_num(x)}" y="0" width="{_num(w)}" height="{_num(height)}" '
                       f'fill="{colour}"><title>{_e(name)}: {_e(_fmt_s(value))}</title></rect>')
            if w > 60:
                out.append(f'<text x="{_num(x + 4)}" y="{_num(height / 2)}" font-size="11" fill="#fff" '
                           f'dominant-baseline="central">{_e(name)}</text>')
        x += w
    out.append("</svg>")
    return "".join(out)


def _cost_section(plan) -> str:
    c = plan.cost
    parts = [("compute", c.compute_s, COST_COLOURS["compute"]),
             ("communication", c.communication_s, COST_COLOURS["communication"]),
             ("resharding", c.resharding_s, COST_COLOURS["resharding"])]
    total = c.total_s
    legend = "".join(
        f'<span class="sw" style="background:{col}"></span>{_e(name)} {_e(_fmt_s(v))}'
        f' ({(v / total if total > 0 else 0):.0%})' for name, v, col in parts)
    out = [f'<h4>Modelled cost per step: {_e(_fmt_s(total))}</h4>', _stacked_bar(parts),
           f'<div class="as-legend">{legend}</div>']
    # Memory: peak per device against the budget (if the plan carries one) or the device.
    peak = int(c.peak_memory_bytes)
    cluster = plan.cluster
    device_mem = int(getattr(cluster, "device_memory", 0) or 0)
    usable = int(getattr(cluster, "usable_memory", device_mem) or device_mem)
    budget = getattr(plan, "memory_budget", None)
    cap, cap_name = (int(budget), "memory budget") if budget else (usable, "usable device memory")
    width, height = 640.0, 18.0
    frac = peak / cap if cap > 0 else 0.0
    colour = "#59a14f" if frac <= 0.8 else "#edc948" if frac <= 1.0 else "#e15759"
    w = width * min(1.0, frac)
    svg = (f'<svg width="{_num(width)}" height="{_num(height)}">'
           f'<rect x="0" y="0" width="{_num(width)}" height="{_num(height)}" fill="#f2f2f2" stroke="#ccc"/>'
           f'<rect x="0" y="0" width="{_num(max(w, 1.0 if peak else 0.0))}" height="{_num(height)}" '
           f'fill="{colour}"/></svg>')
    detail = f"device memory {format_bytes(device_mem)}" if device_mem else ""
    if budget and device_mem:
        detail += f", budget {format_bytes(int(budget))}"
    out.append(f'<h4>Peak memory per device: {_e(format_bytes(peak))} '
               f'<span class="as-muted">of {_e(format_bytes(cap))} {_e(cap_name)} '
               f'({frac:.2%})</span></h4>{svg}'
               f'<div class="as-muted">{_e(detail)}</div>')
    return "".join(out)


def _collectives_section(plan) -> str:
    cols = list(plan.collectives)
    if not cols:
        return "<h4>Collectives</h4><div class='as-muted'>none: the plan needs no communication</div>"
    by_kind: dict[str, list[float]] = {}
    for col in cols:
        by_kind.setdefault(str(col.kind), []).append(float(col.seconds))
    rows = "".join(f"<tr><td>{_e(k)}</td><td class='num'>{len(v)}</td>"
                   f"<td class='num'>{_e(_fmt_s(sum(v)))}</td></tr>"
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
               f'<rect x="0" y="0" width="{_num(max(w, 0.5))}" height="10" '
               f'fill="{palette[str(col.kind)]}"/></svg>')
        body.append(f"<tr><td><code>{_e(col.op)}</code></td><td>{_e(col.kind)}</td>"
                    f"<td class='num'>{_e(_fmt_s(col.seconds))}</td><td>{bar}</td></tr>")
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
    rows = "".join(f"<tr><td class='num'>{_e(_fmt_s(op.seconds))}</td><td><code>{_e(op.op)}</code></td>"
                   f"<td><code>{_e(op.strategy)}</code></td><td><code>{_e(op.source)}</code></td></tr>"
                   for op in ops)
    return (f"<details><summary><b>Costliest ops</b> <span class='as-n'>({len(ops)})</span></summary>"
            f"<table><tr><th>seconds</th><th>op</th><th>strategy</th><th>source</th></tr>{rows}"
            f"</table></details>")


def _solver_section(plan) -> str:
    out = []
    s = plan.solver
    if s is not None:
        out.append(f"<div class='as-muted'>solver: {_e(s.describe())}</div>")
    for w in plan.warnings:
        out.append(f"<div class='as-warn'>warning: {_e(w)}</div>")
    return "".join(out)


# --------------------------------------------------------------------------- pipeline stages
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
        return _ranges(layers)
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
        rows.append(f"<tr><td>{i}</td><td><code>{_e(_layers_text(_get(st, 'layers')))}</code></td>"
                    f"<td>{_e('×'.join(str(n) for n in mesh_shape or ()))}</td>"
                    f"<td><code>{_e(_ranges([int(d) for d in devs]) if devs else '')}</code></td>"
                    f"<td class='num'>{_e(_fmt_s(fwd[i]))}</td><td class='num'>{_e(_fmt_s(bwd[i]))}</td>"
                    f"<td class='num'>{_e(format_bytes(int(mem)) if mem is not None else '')}</td></tr>")
    out = [f"<h4>Pipeline: {len(stages)} stages, {_e(B)} micro-batches, schedule {_e(schedule)}</h4>",
           "<table><tr><th>stage</th><th>layers</th><th>sub-mesh</th><th>devices</th>"
           "<th>forward / µbatch</th><th>backward / µbatch</th><th>peak memory</th></tr>",
           "".join(rows), "</table>"]
    events = simulate_schedule(fwd, bwd, int(B), str(schedule))
    out.append(_timeline_svg(events, len(stages), int(B)))
    return "".join(out)


def _timeline_svg(events, num_stages: int, num_microbatches: int) -> str:
    makespan = max((e[4] for e in events), default=0.0)
    left, width, row_h, top = 70.0, 860.0, 24.0, 6.0
    height = top + num_stages * row_h + 26
    scale = width / makespan if makespan > 0 else 0.0
    out = [f'<svg class="as-timeline" width="{_num(left + width + 10)}" '
           f'height="{_num(height)}">']
    for s in range(num_stages):
        y = top + s * row_h
        out.append(f'<rect x="{_num(left)}" y="{_num(y)}" width="{_num(width)}" height="{_num(row_h - 4)}" '
                   f'fill="#f4f4f4"/>')
        out.append(f'<text x="0" y="{_num(y + row_h / 2 - 2)}" font-size="11" '
                   f'dominant-baseline="central">stage {s}</text>')
    for s, kind, m, start, end in events[:MAX_TIMELINE_OPS]:
        x, w = left + start * scale, max(0.5, (end - start) * scale)
        y = top + s * row_h
        colour = "#4e79a7" if kind == "F" else "#f28e2b"
        op = 0.55 + 0.45 * ((m % 4) / 3 if num_microbatches > 1 else 1)
        label = f"{'forward' if kind == 'F' else 'backward'} micro-batch {m} on stage {s}: " \
                f"{_fmt_s(start)} – {_fmt_s(end)}"
        out.append(f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(w)}" height="{_num(row_h - 4)}" '
                   f'fill="{colour}" fill-opacity="{op:.2f}" stroke="#fff" stroke-width="0.5">'
                   f'<title>{_e(label)}</title></rect>')
        if w >= 14:
            out.append(f'<text x="{_num(x + w / 2)}" y="{_num(y + row_h / 2 - 2)}" font-size="10" '
                       f'text-anchor="middle" dominant-baseline="central" fill="#fff">{m}</text>')
    axis_y = top + num_stages * row_h + 2
    out.append(f'<line x1="{_num(left)}" x2="{_num(left + width)}" y1="{_num(axis_y)}" '
               f'y2="{_num(axis_y)}" stroke="#888"/>')
    for k in range(5):
        t = makespan * k / 4
        x = left + t * scale
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        out.append(f'<text x="{_num(x)}" y="{_num(axis_y + 13)}" font-size="10" text-anchor="{anchor}" '
                   f'fill="#555">{_e(_fmt_s(t))}</text>')
    busy = sum(e[4] - e[3] for e in events)
    bubble = 1 - busy / (num_stages * makespan) if makespan > 0 else 0.0
    out.append("</svg>")
    out.append(f'<div class="as-legend"><span class="sw" style="background:#4e79a7"></span>forward'
               f'<span class="sw" style="background:#f28e2b"></span>backward'
               f'<span class="as-muted"> — step {_e(_fmt_s(makespan))}, bubble {bubble:.0%}</span></div>')
    return "".join(out)


# --------------------------------------------------------------------------- entry points
def plan_html(plan, *, in_shapes=None, out_shapes=None, max_pictures: int = MAX_PICTURES) -> str:
    """The plan as an HTML fragment (a ``<div>`` with its own ``<style>``) for Jupyter.

    ``in_shapes``/``out_shapes``: optional shapes of the flat inputs/outputs (a sequence of
    shape tuples, or a pytree of arrays / ``ShapeDtypeStruct`` such as the example args);
    default ``plan.in_shapes``/``plan.out_shapes`` when a plan has them.
    """
    mesh = _Mesh(plan.mesh_shape, plan.axis_names)
    in_shapes = _shape_list(in_shapes if in_shapes is not None else getattr(plan, "in_shapes", None),
                            len(plan.in_paths))
    out_shapes = _shape_list(out_shapes if out_shapes is not None
                             else getattr(plan, "out_shapes", None), len(plan.out_paths))
    mesh_txt = " × ".join(f"{n}={s}" for n, s in zip(plan.axis_names, plan.mesh_shape))
    cluster_name = getattr(plan.cluster, "name", "")
    legend = "".join(f'<span class="sw" style="background:{mesh.colour(a)}"></span>{_e(a)}'
                     f' ({mesh.axis_size(a)})' for a in mesh.names)
    out = ['<div class="autoshard-plan">', f"<style>{_CSS}</style>",
           f"<h3>autoshard plan — <code>{_e(plan.method)}</code></h3>",
           f"<div>mesh {_e(mesh_txt)} ({mesh.size} devices), cluster {_e(cluster_name)}, "
           f"{len(plan.in_paths)} inputs, {len(plan.out_paths)} outputs</div>",
           _cost_section(plan)]
    if plan.stages:
        try:
            out.append(_stages_section(plan))
        except Exception as err:  # noqa: BLE001 - a malformed stage must not hide the rest
            out.append(f"<div class='as-warn'>cannot draw the pipeline stages: {_e(err)}</div>")
    out.append(f'<h4>Shardings</h4><div style="display:flex;gap:16px;align-items:center">'
               f'{_mesh_svg(mesh)}<div><div class="as-legend">mesh axes:{legend}</div>'
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
            f"<title>{_e(title)}</title>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<style>body{margin:16px;background:#fff}</style></head><body>\n"
            + plan_html(plan, **kwargs) + "\n</body></html>\n")
