"""XLA's all-reduce combiner: independent all-reduces run as one merged collective.

XLA (on CPU and GPU alike) merges all-reduces over the same devices when none of them
depends on another, up to a size threshold, so their launch latency is paid once per
merged collective instead of once each; a data-parallel training step runs all its
gradient all-reduces as one. We price that for groups of all-reduces that cannot depend
on each other: the *terminal* nodes (from which no node that may emit a collective can be
reached: a gradient feeding only its optimizer update), and the nodes at the same
*communication depth* (as many nodes that may communicate on the longest path to them:
one cannot lie on the other's path, such as the two sums of a split softmax's
denominator and the label's logit), when they reduce with the same operation (XLA does
not merge a max with a sum). Each such all-reduce keeps its bandwidth term and a share
``bytes / COMBINE_THRESHOLD_BYTES`` of its latency (one merged collective per
threshold's worth of bytes), and one full latency per group and set of mesh axes
becomes a shared cost, paid once if any of them all-reduces over those axes.

A loop's body is a computation of its own: XLA merges the all-reduces of one step with
each other (a data-parallel scan over layers runs each step's weight gradients as one
all-reduce), never with those outside the loop. Its groups are the body's own (terminal:
no communicating node of the same body reachable), and their merged latency is paid every
step.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from autoshard.cost_model import MeshCostModel

from .graph import ShardingGraph
from .strategies import Strategy

#: bytes XLA merges into one all-reduce (its GPU default, 30 MiB; on host CPU we saw a
#: whole 12.3 MiB of gradients merged into one).
COMBINE_THRESHOLD_BYTES = 30 * 2**20


@dataclasses.dataclass(frozen=True)
class MergedAllReduce:
    """The latency (seconds, all its ``runs``) of one merged all-reduce over ``axes``,
    paid when any ``(node, strategy)`` of ``members`` is chosen; ``terminal``: the group
    of terminal nodes (the gradients), merged at the end of the step; ``runs``: how many
    times per call it runs (a loop's body's: once per run of the body)."""

    axes: tuple[int, ...]
    latency_s: float
    members: tuple[tuple[int, int], ...]
    terminal: bool = True
    runs: float = 1.0

    def __repr__(self) -> str:
        return (f"MergedAllReduce(axes={self.axes}, latency_s={self.latency_s:.3g}, "
                f"members={len(self.members)}, terminal={self.terminal}, runs={self.runs:g})")


def terminal_nodes(graph: ShardingGraph, region: Mapping[int, int] = {}) -> tuple[bool, ...]:  # noqa: B006
    """Per node: no node reachable from it (through tensor uses within one call) has a
    strategy that communicates, so its collectives depend on no other's. A node of a
    loop's body (``region``: node -> its loop) looks only at the nodes of the same body:
    what runs after the loop does not hold back the body's collectives."""
    n = len(graph.nodes)
    consumers: list[list[int]] = [[] for _ in range(n)]
    for use in graph.uses:
        if use.operand >= 0:
            consumers[use.src].append(use.dst)
    communicates = _communicating(graph)
    reaches = [False] * n  # some node downstream communicates
    for v in reversed(range(n)):  # uses run from lower to higher node index
        within = region.get(v)
        reaches[v] = any(communicates[u] or reaches[u] for u in consumers[v]
                         if within is None or region.get(u) == within)
    return tuple(not r for r in reaches)


def _communicating(graph: ShardingGraph) -> list[bool]:
    """Per node: whether any of its strategies communicates (worked out once per strategy
    tuple: repeated layers' nodes share theirs)."""
    by_tuple: dict[int, tuple] = {}
    for node in graph.nodes:
        if id(node.strategies) not in by_tuple:
            by_tuple[id(node.strategies)] = (
                node.strategies, any(s.communication_s > 0 for s in node.strategies))
    return [by_tuple[id(node.strategies)][1] for node in graph.nodes]


def communication_depth(graph: ShardingGraph) -> tuple[int, ...]:
    """Per node: the most nodes with a communicating strategy on a path to it (itself
    excluded). A node that communicates lies on the path of every node it reaches, so two
    nodes of equal depth do not depend on each other's collectives."""
    communicates = _communicating(graph)
    producers: list[list[int]] = [[] for _ in graph.nodes]
    for use in graph.uses:
        if use.operand >= 0:
            producers[use.dst].append(use.src)
    depth = [0] * len(graph.nodes)
    for v in range(len(graph.nodes)):  # uses run from lower to higher node index
        depth[v] = max((depth[u] + communicates[u] for u in producers[v]), default=0)
    return tuple(depth)


def combine_all_reduces(graph: ShardingGraph, model: MeshCostModel,
                        loops: Mapping[int, tuple[int, float]] = {}  # noqa: B006
                        ) -> tuple[ShardingGraph, tuple[MergedAllReduce, ...]]:
    """Reprice the all-reduces of independent nodes (terminal ones, and those of equal
    communication depth) as parts of merged ones; returns the repriced graph and one
    ``MergedAllReduce`` per group and mesh-axis set that has members. On a backend that
    runs a merged all-reduce as one per array (``Cluster.all_reduce_per_operand``) nothing
    is repriced: each all-reduce keeps its whole latency. ``loops``: a loop body's node ->
    (its loop, how many times the body runs per call); such nodes merge with their own
    body's only, once per run of it (module docstring)."""
    if model.cluster.all_reduce_per_operand:
        return graph, ()
    region = {v: loop for v, (loop, _) in loops.items()}
    terminal = terminal_nodes(graph, region)
    depth = communication_depth(graph)
    # (id(strategies), runs) -> new strategies (repeated layers share one tuple: keep sharing it)
    repriced: dict[tuple[int, float], tuple] = {}
    nodes = list(graph.nodes)
    members: dict[tuple, list[tuple[int, int]]] = {}
    runs_of = {-1: 1.0, **dict(loops.values())}  # region -> how many times per call it runs
    # per strategy tuple: whether any strategy all-reduces, and (strategy, axes) of each
    # all-reduce, which merges with the others over its axes
    reducing: dict[int, tuple[bool, list]] = {}
    for v, node in enumerate(graph.nodes):
        key = id(node.strategies)
        if key not in reducing:
            reducing[key] = (any(s.all_reduce_latency_s > 0 for s in node.strategies),
                             [(i, axes) for i, s in enumerate(node.strategies)
                              if s.all_reduce_latency_s > 0 for axes in s.all_reduce_axes])
        if not reducing[key][0]:
            continue
        loop, runs = loops.get(v, (-1, 1.0))
        group = (loop, -1 if terminal[v] else depth[v], _reduction(graph, node))
        if (key, runs) not in repriced:
            repriced[(key, runs)] = tuple(_latency_shared(s, model, runs) for s in node.strategies)
        nodes[v] = dataclasses.replace(node, strategies=repriced[(key, runs)])
        for i, axes in reducing[key][1]:
            members.setdefault(group + (axes,), []).append((v, i))
    merged = tuple(MergedAllReduce(key[3], model.all_reduce_latency(key[3]) * runs_of[key[0]],
                                   tuple(members[key]), terminal=key[:2] == (-1, -1),
                                   runs=runs_of[key[0]])
                   for key in sorted(members))
    return dataclasses.replace(graph, nodes=tuple(nodes)), merged


# the operation an equation's all-reduce of partial results applies (others: a sum)
_REDUCTIONS = {"reduce_max": "max", "reduce_min": "min", "reduce_prod": "mul",
               "reduce_and": "and", "reduce_or": "or", "reduce_xor": "xor"}


def _reduction(graph: ShardingGraph, node) -> str:
    return _REDUCTIONS.get(graph.traced.program.eqns[node.eqn].primitive.name, "add")


def _latency_shared(strategy: Strategy, model: MeshCostModel, runs: float = 1.0) -> Strategy:
    """``strategy`` keeping of each of its all-reduces' latency only its byte share of one
    merged collective (the rest is the shared cost); ``runs``: how many times per call
    its collectives run (a loop body's, with as many copies of the equation as the
    compiled body holds; its ``communication_s`` is all the runs')."""
    if strategy.all_reduce_latency_s <= 0:
        return strategy
    kept = 1.0 - min(1.0, strategy.all_reduce_bytes / COMBINE_THRESHOLD_BYTES)
    removed = [model.all_reduce_latency(s.axes) * kept
               if s.kind == "all-reduce" and s.axes in strategy.all_reduce_axes else 0.0
               for s in strategy.collectives]
    collectives = tuple(dataclasses.replace(s, seconds=s.seconds - r) if r else s
                        for s, r in zip(strategy.collectives, removed))
    return dataclasses.replace(strategy, communication_s=strategy.communication_s - sum(removed) * runs,
                               collectives=collectives)
