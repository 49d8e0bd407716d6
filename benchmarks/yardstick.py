"""An independent yardstick: a roofline time per step per device of a compiled program.

It reads only what XLA produced (``compiled.cost_analysis()``, ``compiled.memory_analysis()``
and the collectives in ``compiled.as_text()``) and a cluster's figures; it does not use
autoshard's cost model. For one device of the SPMD program::

    compute_s    = flops / peak[dtype]                  (cost_analysis "flops")
    memory_s     = bytes_accessed / memory_bandwidth    (cost_analysis "bytes accessed")
    collective_s = Σ over collectives c:  k_c · α + V_c / β
    total_s      = compute_s + memory_s + collective_s  (no overlap assumed)

with, for a collective over groups of ``n`` devices (ring algorithms), S its size in bytes:

    ==================  ===================  =====================
    kind                V_c (bytes moved)    k_c (latencies)
    ==================  ===================  =====================
    all-reduce          2(n−1)/n · S         2(n−1) + 1
    all-gather          (n−1)/n · S_out      (n−1) + 1
    reduce-scatter      (n−1)/n · S_in       (n−1) + 1
    all-to-all          (n−1)/n · S          (n−1) + 1
    collective-permute  S                    1
    ==================  ===================  =====================

k_c is the ring's steps plus one launch: the convention a cluster's α is defined by.
``autoshard.calibrate`` fits each axis' α to measured collectives with these counts (the
cost model's), so α·k_c is the measured latency of one collective; counting the steps
alone would take a third off a calibrated all-reduce over 2 devices.

S is the result's bytes (operands' for reduce-scatter; the result's n times when the
operand cannot be found). The link (α latency, β bandwidth) is that of the slowest mesh
axis the collective spans: ``cluster.links_for_mesh(mesh_shape, kind)`` gives one link
per mesh axis; the axes a collective spans are those along which the mesh coordinates of
the devices in a replica group differ (device id i at row-major coordinate
``np.unravel_index(i, mesh_shape)``); β is the smallest bandwidth and α the largest latency
among them. A collective whose groups hold one device costs nothing. Collectives are
static occurrences in the text (one inside a loop body counts once); an async
``-start``/``-done`` pair counts once.

On a cluster whose backend runs a combined all-reduce of k arrays as k all-reduces
(``Cluster.all_reduce_per_operand``: XLA's CPU collectives), it pays k times the
latencies.

On a cluster whose backend makes reduce-scatters (``Cluster.reduce_scatter_as_all_reduce``
off: the GPU presets), an all-reduce every reader of which keeps one n-th of the result by
a dynamic-slice is priced as the reduce-scatter XLA's GPU pipeline turns that pair into
(``benchmarks.reduce_scatters``; the program is compiled here, for the CPU, which keeps
the all-reduce).

``peak_memory_bytes`` is ``memory_analysis()``'s argument + output + temp − alias bytes.
The peak FLOP/s is the cluster's rate for ``dtype`` (default ``"float32"``; ``dtype=None``
takes the dtype of most dot/convolution result elements in the HLO).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

from autoshard.ir import hlo

from .reduce_scatters import sliced_all_reduces

__all__ = ["Yardstick", "CollectiveCost", "yardstick", "collective_cost"]

_HLO_TO_DTYPE = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}


@dataclasses.dataclass(frozen=True)
class CollectiveCost:
    """The collectives of one kind over one set of mesh axes, added up.

    ``bytes``: result bytes (as ``hlo.collective_stats`` counts them); ``moved_bytes``: the
    ring volume V; ``seconds``: Σ k·α + V/β.
    """

    kind: str
    axes: tuple[str, ...]
    count: int
    bytes: int
    moved_bytes: float
    seconds: float

    def __repr__(self) -> str:
        return (f"{self.kind}[{','.join(self.axes) or '-'}] ×{self.count}: "
                f"{self.bytes:,} B, {_fmt_s(self.seconds)}")


@dataclasses.dataclass(frozen=True)
class Yardstick:
    """Roofline time per step per device of one compiled program (see module docstring)."""

    compute_s: float
    memory_s: float
    collective_s: float
    total_s: float
    flops: float
    bytes_accessed: float
    collectives: tuple[CollectiveCost, ...]
    peak_memory_bytes: int | None
    kernels: int = 0

    def __repr__(self) -> str:
        cols = "; ".join(repr(c) for c in self.collectives) or "none"
        peak = "n/a" if self.peak_memory_bytes is None else f"{self.peak_memory_bytes:,} B"
        return (f"Yardstick(total {_fmt_s(self.total_s)} = compute {_fmt_s(self.compute_s)} "
                f"+ memory {_fmt_s(self.memory_s)} + collectives {_fmt_s(self.collective_s)}; "
                f"{self.flops:,.0f} flops, {self.bytes_accessed:,.0f} B accessed, "
                f"peak {peak}; collectives: {cols})")

    @property
    def collective_bytes(self) -> int:
        return sum(c.bytes for c in self.collectives)


#: ENTRY instructions that run no work of their own (the second half of an async pair
#: is its first's)
_NO_KERNEL = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast",
                        "partition-id", "replica-id", "after-all"})


def kernel_count(hlo_text: str) -> int:
    """The instructions of ``hlo_text``'s ENTRY computation that run as work of their own
    (fusions, library calls such as dots, collectives, copies): each pays a fixed launch
    cost besides its flops and bytes, which the roofline leaves out (on 8 virtual CPU
    devices sharing 2 cores, tens of microseconds each)."""
    entry = re.search(r"^ENTRY", hlo_text, re.M)
    if entry is None:
        return 0
    count = 0
    for line in hlo_text[entry.start():].splitlines()[1:]:
        if line.startswith("}"):
            break
        _, eq, rhs = line.partition(" = ")
        if not eq:
            continue
        rhs = rhs.lstrip()
        if rhs.startswith("("):  # a tuple-shaped result: skip its type
            depth = 0
            for i, ch in enumerate(rhs):
                depth += (ch == "(") - (ch == ")")
                if depth == 0:
                    rhs = rhs[i + 1:]
                    break
        else:
            rhs = rhs.partition(" ")[2]
        opcode = rhs.lstrip().partition("(")[0]
        if opcode and opcode not in _NO_KERNEL and not opcode.endswith("-done"):
            count += 1
    return count


def _fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.2f} µs"


def collective_cost(c: hlo.Collective, mesh_shape, cluster) -> tuple[float, float, tuple[int, ...]]:
    """``(seconds, moved_bytes, axes)`` of one collective on ``cluster``."""
    mesh_shape = tuple(int(s) for s in mesh_shape)
    num_devices = 1
    for s in mesh_shape:
        num_devices *= s
    axes = c.axes(mesh_shape)
    n = c.group_size(num_devices)
    if not axes or n <= 1:
        return 0.0, 0.0, axes
    # latencies: the ring's steps plus one launch (the cluster's convention for α)
    if c.kind == "collective-permute":
        volume, latencies = float(c.result_bytes), 1
    elif c.kind == "all-reduce":
        volume, latencies = 2 * (n - 1) / n * c.result_bytes, 2 * (n - 1) + 1
    elif c.kind == "reduce-scatter":
        s_in = c.operand_bytes if c.operand_bytes is not None else n * c.result_bytes
        volume, latencies = (n - 1) / n * s_in, n
    else:  # all-gather (result), all-to-all (result == operand)
        volume, latencies = (n - 1) / n * c.result_bytes, n
    kind = c.kind if c.kind != "collective-permute" else None
    links = cluster.links_for_mesh(mesh_shape, kind)
    spanned = [links[a] for a in axes]
    bandwidth = min(link.bandwidth for link in spanned)
    latency = max(link.latency for link in spanned)
    # a combined all-reduce on a backend that runs it array by array: each array's latencies
    copies = c.operands if c.kind == "all-reduce" and cluster.all_reduce_per_operand else 1
    return copies * latencies * latency + volume / bandwidth, volume, axes


def _dominant_dtype(hlo_text: str) -> str:
    counts: Counter = Counter()
    for m in re.finditer(r"=\s*([a-z]+[0-9]+)\[([0-9,]*)\]\{[^}]*\}\s+(?:dot|convolution)\(",
                         hlo_text):
        n = 1
        for d in filter(None, m.group(2).split(",")):
            n *= int(d)
        counts[m.group(1)] += n
    if not counts:
        return "float32"
    return _HLO_TO_DTYPE.get(counts.most_common(1)[0][0], "float32")


def yardstick(compiled, mesh_shape, cluster, *, dtype: str | None = "float32",
              axis_names=None) -> Yardstick:
    """Roofline time of ``compiled`` (a ``jax.stages.Compiled``) on ``cluster``.

    ``mesh_shape``: the shape of the mesh the program was compiled for; ``axis_names``
    (optional) names the mesh axes in the collectives' summary (default ``"0"``, ``"1"``…).
    """
    mesh_shape = tuple(int(s) for s in mesh_shape)
    names = tuple(axis_names) if axis_names is not None else tuple(str(i) for i in range(len(mesh_shape)))
    text = compiled.as_text()
    ca = hlo.cost_analysis(compiled)
    flops = float(ca.get("flops", 0.0))
    bytes_accessed = float(ca.get("bytes accessed", 0.0))
    if dtype is None:
        dtype = _dominant_dtype(text)
    rates = dict(cluster.flops)
    peak = rates.get(dtype, rates["float32"])
    groups: dict[tuple[str, tuple[int, ...]], list] = {}
    found = hlo.parse_collectives(text)
    devices = math.prod(mesh_shape)
    size = {c.name: c.group_size(devices) for c in found}
    scatters = frozenset() if cluster.reduce_scatter_as_all_reduce else \
        sliced_all_reduces(text, size.__getitem__)
    for c in found:
        if c.name in scatters:  # the GPU pipeline's reduce-scatter
            c = dataclasses.replace(c, kind="reduce-scatter", operand_bytes=c.result_bytes,
                                    result_bytes=c.result_bytes // size[c.name])
        seconds, volume, axes = collective_cost(c, mesh_shape, cluster)
        g = groups.setdefault((c.kind, axes), [0, 0, 0.0, 0.0])
        g[0] += 1
        g[1] += c.result_bytes
        g[2] += volume
        g[3] += seconds
    collectives = tuple(
        CollectiveCost(kind=kind, axes=tuple(names[a] for a in axes), count=g[0], bytes=g[1],
                       moved_bytes=g[2], seconds=g[3])
        for (kind, axes), g in sorted(groups.items(),
                                      key=lambda kv: (hlo.COLLECTIVE_KINDS.index(kv[0][0]),
                                                      kv[0][1])))
    mem = hlo.memory(compiled)
    compute_s = flops / peak
    memory_s = bytes_accessed / cluster.memory_bandwidth
    collective_s = sum(c.seconds for c in collectives)
    return Yardstick(compute_s=compute_s, memory_s=memory_s, collective_s=collective_s,
                     total_s=compute_s + memory_s + collective_s, flops=flops,
                     bytes_accessed=bytes_accessed, collectives=collectives,
                     peak_memory_bytes=None if mem is None else mem["total"],
                     kernels=kernel_count(text))
