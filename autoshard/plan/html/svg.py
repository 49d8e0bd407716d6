"""Inline SVG pictures of the plan view: a tensor's shards on the mesh, the mesh, a stacked
cost bar and a pipeline timeline."""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from autoshard.cost_model import format_seconds

from .css import AXIS_COLOURS

MAX_TIMELINE_OPS = 4000


def escape(value: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def num(x: float) -> str:
    """SVG coordinate."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


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


def spec_text(spec) -> str:
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


def ranges(ids: Sequence[int]) -> str:
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


class MeshPicture:
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


def tensor_svg(mesh: MeshPicture, spec, shape: tuple[int, ...] | None, tag: str) -> str:
    entries = _spec_entries(spec)
    rank = len(shape) if shape is not None else None
    if (rank is not None and rank > 2) or (rank is None and len(entries) > 2):
        return _split_bars_svg(mesh, entries, shape, tag)
    return _grid_svg(mesh, entries, shape, tag)


def _grid_svg(mesh: MeshPicture, entries: list, shape, tag: str) -> str:
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
    out = [f'<svg class="as-svg" data-tensor="{escape(tag)}" '
           f'width="{num(width + 2 * pad)}" height="{num(height + 2 * pad)}" '
           f'viewBox="{num(-pad)} {num(-pad)} {num(width + 2 * pad)} {num(height + 2 * pad)}">']
    for r in range(nr):
        for c in range(nc):
            devs = holders.get((r, c), [])
            label = ranges(devs)
            opacity = 0.22 if not used else (0.30 if (r + c) % 2 == 0 else 0.55)
            x, y = c * bw, r * bh
            title = f"shard ({r}, {c}) on device(s) {label}"
            out.append(f'<rect x="{num(x)}" y="{num(y)}" width="{num(bw)}" height="{num(bh)}" '
                       f'fill="{base}" fill-opacity="{opacity}"><title>{escape(title)}</title></rect>')
            size = min(11.0, bh * 0.6, 1.75 * bw / max(1, len(label)))
            if size >= 5:
                out.append(f'<text x="{num(x + bw / 2)}" y="{num(y + bh / 2)}" font-size="{num(size)}" '
                           f'text-anchor="middle" dominant-baseline="central" fill="#222">'
                           f'{escape(label)}</text>')
    for k in range(1, nr):   # horizontal cuts: the row axis
        axis, level = mesh.boundary_axis(row_axes, k)
        out.append(f'<line x1="0" x2="{num(width)}" y1="{num(k * bh)}" y2="{num(k * bh)}" '
                   f'stroke="{mesh.colour(axis)}" stroke-width="{2.5 if level == 0 else 1.2}"/>')
    for k in range(1, nc):   # vertical cuts: the column axis
        axis, level = mesh.boundary_axis(col_axes, k)
        out.append(f'<line y1="0" y2="{num(height)}" x1="{num(k * bw)}" x2="{num(k * bw)}" '
                   f'stroke="{mesh.colour(axis)}" stroke-width="{2.5 if level == 0 else 1.2}"/>')
    out.append(f'<rect x="0" y="0" width="{num(width)}" height="{num(height)}" fill="none" '
               f'stroke="#555" stroke-width="1"/></svg>')
    return "".join(out)


def _split_bars_svg(mesh: MeshPicture, entries: list, shape, tag: str) -> str:
    """Higher-rank tensors: one bar per dim, cut into that dim's shards."""
    rank = len(shape) if shape is not None else len(entries)
    label_w, bar_w, row_h = 34.0, 116.0, 16.0
    height = rank * row_h + 2
    out = [f'<svg class="as-svg" data-tensor="{escape(tag)}" '
           f'width="{num(label_w + bar_w + 2)}" height="{num(height)}">']
    for d in range(rank):
        axes = _entry_axes(entries[d]) if d < len(entries) else ()
        n = mesh.dim_split(axes)
        y = d * row_h + 1
        out.append(f'<text x="0" y="{num(y + row_h / 2)}" font-size="10" dominant-baseline="central" '
                   f'fill="#555">dim {d}</text>')
        known = [a for a in axes if a in mesh.index]
        fill = mesh.colour(known[0]) if known else "#bbbbbb"
        seg = bar_w / n
        for k in range(n):
            op = 0.22 if not known else (0.30 if k % 2 == 0 else 0.55)
            out.append(f'<rect x="{num(label_w + k * seg)}" y="{num(y + 2)}" width="{num(seg)}" '
                       f'height="{num(row_h - 4)}" fill="{fill}" fill-opacity="{op}"/>')
        for k in range(1, n):
            axis, level = mesh.boundary_axis(axes, k)
            x = label_w + k * seg
            out.append(f'<line x1="{num(x)}" x2="{num(x)}" y1="{num(y + 2)}" y2="{num(y + row_h - 2)}" '
                       f'stroke="{mesh.colour(axis)}" stroke-width="{2 if level == 0 else 1}"/>')
        out.append(f'<rect x="{num(label_w)}" y="{num(y + 2)}" width="{num(bar_w)}" '
                   f'height="{num(row_h - 4)}" fill="none" stroke="#555" stroke-width="0.8"/>')
        if n > 1:
            txt = "×".join(axes) + f" /{n}"
            out.append(f'<text x="{num(label_w + bar_w / 2)}" y="{num(y + row_h / 2)}" font-size="9" '
                       f'text-anchor="middle" dominant-baseline="central" fill="#222">{escape(txt)}</text>')
    out.append("</svg>")
    return "".join(out)


def mesh_svg(mesh: MeshPicture) -> str:
    """The device mesh: ids at their mesh position, axes in their colours."""
    if len(mesh.shape) > 2 or mesh.size > 256:
        return ""
    rows, cols = (mesh.shape if len(mesh.shape) == 2 else (1, mesh.shape[0]))
    cell, left, top = 30.0, 20.0, 18.0
    w, h = left + cols * cell + 4, top + rows * cell + 4
    out = [f'<svg width="{num(w)}" height="{num(h)}" style="flex:none">']
    col_axis = mesh.names[-1]
    row_axis = mesh.names[0] if len(mesh.shape) == 2 else None
    out.append(f'<text x="{num(left)}" y="11" font-size="10" fill="{mesh.colour(col_axis)}">'
               f'{escape(col_axis)} →</text>')
    if row_axis is not None:
        out.append(f'<text x="3" y="{num(top)}" font-size="10" fill="{mesh.colour(row_axis)}" '
                   f'transform="rotate(90 3 {num(top)})">{escape(row_axis)} →</text>')
    for r in range(rows):
        for c in range(cols):
            x, y = left + c * cell, top + r * cell
            out.append(f'<rect x="{num(x)}" y="{num(y)}" width="{num(cell - 2)}" '
                       f'height="{num(cell - 2)}" rx="3" fill="#f4f4f4" stroke="#999"/>')
            out.append(f'<text x="{num(x + cell / 2 - 1)}" y="{num(y + cell / 2 - 1)}" font-size="11" '
                       f'text-anchor="middle" dominant-baseline="central">{r * cols + c}</text>')
    out.append("</svg>")
    return "".join(out)


def stacked_bar(parts: Sequence[tuple[str, float, str]], width: float = 640, height: float = 22) -> str:
    total = sum(max(0.0, v) for _, v, _ in parts)
    out = [f'<svg width="{num(width)}" height="{num(height)}">',
           f'<rect x="0" y="0" width="{num(width)}" height="{num(height)}" fill="#f2f2f2"/>']
    x = 0.0
    for name, value, colour in parts:
        w = 0.0 if total <= 0 else width * max(0.0, value) / total
        if w > 0:
            out.append(f'<rect x="{num(x)}" y="0" width="{num(w)}" height="{num(height)}" '
                       f'fill="{colour}"><title>{escape(name)}: {escape(format_seconds(value))}</title></rect>')
            if w > 60:
                out.append(f'<text x="{num(x + 4)}" y="{num(height / 2)}" font-size="11" fill="#fff" '
                           f'dominant-baseline="central">{escape(name)}</text>')
        x += w
    out.append("</svg>")
    return "".join(out)


def timeline_svg(events, num_stages: int, num_microbatches: int) -> str:
    makespan = max((e[4] for e in events), default=0.0)
    left, width, row_h, top = 70.0, 860.0, 24.0, 6.0
    height = top + num_stages * row_h + 26
    scale = width / makespan if makespan > 0 else 0.0
    out = [f'<svg class="as-timeline" width="{num(left + width + 10)}" '
           f'height="{num(height)}">']
    for s in range(num_stages):
        y = top + s * row_h
        out.append(f'<rect x="{num(left)}" y="{num(y)}" width="{num(width)}" height="{num(row_h - 4)}" '
                   f'fill="#f4f4f4"/>')
        out.append(f'<text x="0" y="{num(y + row_h / 2 - 2)}" font-size="11" '
                   f'dominant-baseline="central">stage {s}</text>')
    for s, kind, m, start, end in events[:MAX_TIMELINE_OPS]:
        x, w = left + start * scale, max(0.5, (end - start) * scale)
        y = top + s * row_h
        colour = "#4e79a7" if kind == "F" else "#f28e2b"
        op = 0.55 + 0.45 * ((m % 4) / 3 if num_microbatches > 1 else 1)
        label = f"{'forward' if kind == 'F' else 'backward'} micro-batch {m} on stage {s}: " \
                f"{format_seconds(start)} – {format_seconds(end)}"
        out.append(f'<rect x="{num(x)}" y="{num(y)}" width="{num(w)}" height="{num(row_h - 4)}" '
                   f'fill="{colour}" fill-opacity="{op:.2f}" stroke="#fff" stroke-width="0.5">'
                   f'<title>{escape(label)}</title></rect>')
        if w >= 14:
            out.append(f'<text x="{num(x + w / 2)}" y="{num(y + row_h / 2 - 2)}" font-size="10" '
                       f'text-anchor="middle" dominant-baseline="central" fill="#fff">{m}</text>')
    axis_y = top + num_stages * row_h + 2
    out.append(f'<line x1="{num(left)}" x2="{num(left + width)}" y1="{num(axis_y)}" '
               f'y2="{num(axis_y)}" stroke="#888"/>')
    for k in range(5):
        t = makespan * k / 4
        x = left + t * scale
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        out.append(f'<text x="{num(x)}" y="{num(axis_y + 13)}" font-size="10" text-anchor="{anchor}" '
                   f'fill="#555">{escape(format_seconds(t))}</text>')
    busy = sum(e[4] - e[3] for e in events)
    bubble = 1 - busy / (num_stages * makespan) if makespan > 0 else 0.0
    out.append("</svg>")
    out.append(f'<div class="as-legend"><span class="sw" style="background:#4e79a7"></span>forward'
               f'<span class="sw" style="background:#f28e2b"></span>backward'
               f'<span class="as-muted"> — step {escape(format_seconds(makespan))}, bubble {bubble:.0%}</span></div>')
    return "".join(out)
