"""Memory constraints for the ILP: bytes per device of every tensor, at the steps that can peak.

A tensor's bytes per device depend on the strategy of the node that produces it,
so on the choice of that node's ILP root (followers map a root's choice to their
own): each tensor becomes a vector over its root's strategies, exact. A strategy's
temporary buffer (the partial result a reduce-scatter reads) is a tensor live at
its own step only. Resharding copies (they depend on two choices, and XLA often
fuses them into the collective's output) are not modelled, here or in the plan's
reported peak, so the constraints and the reported estimate agree exactly.

Candidate peaks: a step can only be the peak if the most its live tensors can
take (every one at its largest layout) reaches the least the fullest step must
take; of those, the ``max_points`` steps with the largest upper bound become
constraints. The planner re-checks the chosen plan's whole liveness profile and
adds the step that peaked if it was missed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from ._following import Grouping
from ._graph import ShardingGraph
from ._liveness import live_bytes
from .cost_model import MeshCostModel


@dataclasses.dataclass(frozen=True, eq=False)
class TensorBytes:
    """Per tensor id: ``root`` (the ILP node deciding its layout), ``vector`` (its bytes per
    device for each strategy of that node) and ``steps`` (first, last step it is live).
    Temporaries get negative ids."""

    root: Mapping[int, int]
    vector: Mapping[int, np.ndarray]
    steps: Mapping[int, tuple[int, int]]


def tensor_bytes(graph: ShardingGraph, grouping: Grouping, model: MeshCostModel,
                 ranges: Mapping[int, tuple[int, int]]) -> TensorBytes:
    program = graph.traced.program
    position = {r: p for p, r in enumerate(grouping.roots)}
    cache: dict = {}

    def nbytes(shape, itemsize, spec) -> int:
        key = (shape, itemsize, spec)
        if key not in cache:
            cache[key] = model.bytes_per_device(shape, itemsize, spec)
        return cache[key]

    root, vector, steps = {}, {}, {}
    for v, node in enumerate(graph.nodes):
        p, index = position[grouping.root[v]], grouping.index[v]
        for k, vid in enumerate(node.outputs):
            aval = program.avals[vid]
            shape, itemsize = tuple(aval.shape), np.dtype(aval.dtype).itemsize
            own = np.array([nbytes(shape, itemsize, s.out_specs[k]) for s in node.strategies],
                           dtype=np.float64)
            root[vid], vector[vid], steps[vid] = p, own[index], ranges[vid]
        temps = np.array([s.temp_bytes for s in node.strategies], dtype=np.float64)
        if temps.any() and node.eqn is not None:
            tid = -1 - v
            root[tid], vector[tid], steps[tid] = p, temps[index], (node.eqn, node.eqn)
    return TensorBytes(root, vector, steps)


def candidate_steps(tensors: TensorBytes, num_steps: int, max_points: int = 12) -> list[int]:
    """Steps whose live tensors could make the peak, in step order."""
    hi = live_bytes(tensors.steps, {t: v.max() for t, v in tensors.vector.items()}, num_steps)
    lo = live_bytes(tensors.steps, {t: v.min() for t, v in tensors.vector.items()}, num_steps)
    possible = np.flatnonzero(hi >= lo.max())
    steps = sorted(possible.tolist(), key=lambda s: (-hi[s], s))[:max_points]
    return sorted(set(steps) | {int(np.argmax(lo))})


def memory_terms(tensors: TensorBytes, steps: Iterable[int]):
    """One ILP memory point per step: ``(ILP node, bytes per strategy)`` of what is live."""
    points = []
    for step in steps:
        summed: dict[int, np.ndarray] = {}
        for tid, (born, last) in tensors.steps.items():
            if born <= step <= last:
                p = tensors.root[tid]
                summed[p] = summed[p] + tensors.vector[tid] if p in summed \
                    else tensors.vector[tid]
        if summed:
            points.append(tuple(sorted(summed.items())))
    return tuple(points)


def steps_over(tensors: TensorBytes, choices, num_steps: int, budget: float,
               limit: int = 16) -> list[int]:
    """The (at most ``limit``) fullest steps whose live bytes under ILP ``choices`` exceed
    ``budget``."""
    chosen = {t: v[choices[tensors.root[t]]] for t, v in tensors.vector.items()}
    live = live_bytes(tensors.steps, chosen, num_steps)
    over = np.flatnonzero(live > budget)
    return sorted(over[np.argsort(-live[over], kind="stable")][:limit].tolist())
