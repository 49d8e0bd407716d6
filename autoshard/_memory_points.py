"""Memory constraints for the ILP: bytes per device of every tensor, at the steps that can peak.

A tensor's bytes per device depend on the strategy of the node that produces it,
so on the choice of that node's ILP root (followers map a root's choice to their
own). Each root's memory vector is its first output's bytes; another tensor decided
by the same root enters a point with a weight, its bytes relative to that vector
(exact when proportional — same shape and layout, e.g. an elementwise chain —
and an upper bound otherwise).

Candidate peaks: a step can only be the peak if the most its live tensors can
take (every one replicated) reaches the least the fullest step must take; of
those, the ``max_points`` steps with the largest upper bound become constraints.
The planner re-checks the chosen plan's full liveness peak and adds the step that
peaked if it was missed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from ._following import Grouping
from ._graph import ShardingGraph
from .cost_model import MeshCostModel


@dataclasses.dataclass(frozen=True, eq=False)
class TensorBytes:
    """``root[vid]``: ILP node deciding tensor ``vid``; ``vector[vid]``: its bytes per device
    for each strategy of that node; ``node_memory``: one vector per ILP node."""

    root: Mapping[int, int]
    vector: Mapping[int, np.ndarray]
    node_memory: tuple[np.ndarray, ...]


def tensor_bytes(graph: ShardingGraph, grouping: Grouping, model: MeshCostModel) -> TensorBytes:
    program = graph.traced.program
    position = {r: p for p, r in enumerate(grouping.roots)}
    cache: dict = {}

    def nbytes(shape, itemsize, spec) -> int:
        key = (shape, itemsize, spec)
        if key not in cache:
            cache[key] = model.bytes_per_device(shape, itemsize, spec)
        return cache[key]

    root, vector = {}, {}
    node_memory: list[np.ndarray | None] = [None] * len(grouping.roots)
    for v, node in enumerate(graph.nodes):
        p = position[grouping.root[v]]
        for k, vid in enumerate(node.outputs):
            aval = program.avals[vid]
            shape, itemsize = tuple(aval.shape), np.dtype(aval.dtype).itemsize
            own = np.array([nbytes(shape, itemsize, s.out_specs[k]) for s in node.strategies],
                           dtype=np.float64)
            root[vid], vector[vid] = p, own[grouping.index[v]]
            if node_memory[p] is None and grouping.root[v] == v:
                node_memory[p] = vector[vid]
    for p, r in enumerate(grouping.roots):
        if node_memory[p] is None:  # a root without outputs
            node_memory[p] = np.zeros(len(graph.nodes[r].strategies))
    return TensorBytes(root, vector, tuple(node_memory))


def _weight(vector: np.ndarray, base: np.ndarray) -> float:
    """Smallest w with ``vector <= w * base`` everywhere (exact when proportional)."""
    if not vector.any():
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(base > 0, vector / np.where(base > 0, base, 1.0), np.inf)
    ratio = np.where(vector > 0, ratio, 0.0)
    return float(ratio.max())


def live_at(ranges: Mapping[int, tuple[int, int]], step: int) -> list[int]:
    return sorted(v for v, (born, last) in ranges.items() if born <= step <= last)


def candidate_steps(ranges: Mapping[int, tuple[int, int]], tensors: TensorBytes,
                    num_steps: int, max_points: int = 12) -> list[int]:
    """Steps whose live tensors could make the peak, the likeliest first."""
    hi = np.zeros(max(num_steps, 1) + 1)
    lo = np.zeros(max(num_steps, 1) + 1)
    for vid, (born, last) in ranges.items():
        if vid not in tensors.vector:
            continue
        vec = tensors.vector[vid]
        hi[born] += vec.max()
        hi[last + 1] -= vec.max()
        lo[born] += vec.min()
        lo[last + 1] -= vec.min()
    hi, lo = np.cumsum(hi[:-1]), np.cumsum(lo[:-1])
    floor = lo.max()
    possible = np.flatnonzero(hi >= floor)
    ranked = sorted(possible.tolist(), key=lambda s: (-hi[s], s))
    steps = ranked[:max_points]
    if int(np.argmax(lo)) not in steps:
        steps.append(int(np.argmax(lo)))
    return sorted(steps)


def memory_point(ranges: Mapping[int, tuple[int, int]], tensors: TensorBytes, step: int
                 ) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(ILP nodes, weights) of the tensors live at ``step``."""
    weight: dict[int, float] = {}
    for vid in live_at(ranges, step):
        if vid not in tensors.vector:
            continue
        p = tensors.root[vid]
        weight[p] = weight.get(p, 0.0) + _weight(tensors.vector[vid], tensors.node_memory[p])
    nodes = sorted(p for p in weight if weight[p])
    return tuple(nodes), tuple(weight[p] for p in nodes)


def memory_points(ranges, tensors: TensorBytes, steps: Iterable[int]):
    points = [memory_point(ranges, tensors, s) for s in steps]
    points = [(n, w) for n, w in points if n]
    return tuple(n for n, _ in points), tuple(w for _, w in points)
