"""Exact float evaluation of an assignment: the oracle for objective and memory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoshard.cost_model import format_bytes, format_seconds

from ._request import IntraOpRequest

#: relative slack on the memory budget (float noise in byte counts).
MEMORY_RTOL = 1e-9


@dataclass(frozen=True)
class Evaluation:
    """Seconds (``objective = node_cost + edge_cost + shared_cost``; inf if forbidden/invalid)
    and bytes per point."""

    objective: float
    node_cost: float
    edge_cost: float
    memory_by_point: tuple[float, ...]
    violations: tuple[str, ...]
    shared_cost: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def __repr__(self) -> str:
        peak = max(self.memory_by_point, default=0.0)
        return (
            f"Evaluation(objective={format_seconds(self.objective)}, node_cost={format_seconds(self.node_cost)}, "
            f"edge_cost={format_seconds(self.edge_cost)}, peak_memory={format_bytes(peak)} "
            f"over {len(self.memory_by_point)} points, violations={len(self.violations)})"
        )


def point_memory(request: IntraOpRequest, choices) -> tuple[float, ...]:
    """Bytes per device at every memory point (each node counted once per point)."""
    simple = ()
    if request.node_memory is not None:
        per_node = [float(request.node_memory[v][c]) for v, c in enumerate(choices)]
        simple = tuple(float(sum(per_node[v] for v in sorted(set(point))))
                       for point in request.memory_points)
    terms = tuple(float(sum(float(t[1][choices[t[0]]]) if len(t) == 2 else
                            float(t[2][choices[t[0]], choices[t[1]]]) for t in point))
                  for point in request.memory_terms)
    return simple + terms


def evaluate(request: IntraOpRequest, choices) -> Evaluation:
    """Price ``choices`` (one strategy index per node) exactly and list every violation."""
    choices = tuple(int(c) for c in choices)
    violations: list[str] = []
    n = request.num_nodes
    if len(choices) != n:
        violations.append(f"expected {n} choices (one per node), got {len(choices)}")
        return Evaluation(np.inf, np.inf, np.inf, (), tuple(violations))
    priced = _priced_at_once(request, choices)
    if priced is not None:  # every choice in range, nothing forbidden: no message to write
        node_cost, edge_cost = priced
    else:
        node_cost, edge_cost = _priced_one_by_one(request, choices, violations)
        if node_cost is None:
            return Evaluation(np.inf, np.inf, np.inf, (), tuple(violations))
    # a shared cost is paid once when any of its (node, strategy) members is chosen
    shared_cost = 0.0
    if request.shared_costs:
        nodes, strategies, owner = request.shared_members
        paid = np.zeros(len(request.shared_costs), dtype=bool)
        paid[owner[np.asarray(choices)[nodes] == strategies]] = True
        shared_cost = sum(request.shared_costs[k].cost for k in np.flatnonzero(paid).tolist())
    memory = point_memory(request, choices)
    budget = request.memory_budget
    if budget is not None:
        for p, used in enumerate(memory):
            if used > budget * (1.0 + MEMORY_RTOL) + 1e-6:
                violations.append(
                    f"memory point {p}: {format_bytes(used)} > budget {format_bytes(budget)} "
                    f"({used - budget:.0f} B over)"
                )
    return Evaluation(node_cost + edge_cost + shared_cost, node_cost, edge_cost, memory,
                      tuple(violations), shared_cost)


def _priced_at_once(request: IntraOpRequest, choices: tuple[int, ...]
                    ) -> tuple[float, float] | None:
    """(node seconds, edge seconds) of ``choices`` from the request's flat arrays; None
    when a choice is out of range or a cost is forbidden (inf): the caller then prices
    one by one, naming each violation."""
    flat = request.flat_costs
    chosen = np.asarray(choices, dtype=np.int64)
    if chosen.size and not ((chosen >= 0) & (chosen < flat.counts)).all():
        return None
    nodes = flat.node_costs[flat.node_start + chosen]
    edges = flat.edge_costs[flat.edge_start + chosen[flat.src] * flat.cols + chosen[flat.dst]]
    if np.isinf(nodes).any() or np.isinf(edges).any():
        return None
    return float(nodes.sum()), float(edges.sum())


def _priced_one_by_one(request: IntraOpRequest, choices: tuple[int, ...],
                       violations: list[str]) -> tuple[float | None, float]:
    """``_priced_at_once`` with every violation appended to ``violations``; node seconds
    None when a choice is out of range (nothing can be priced then)."""
    valid = True
    node_cost = 0.0
    for v, c in enumerate(choices):
        count = request.num_strategies(v)
        if not 0 <= c < count:
            violations.append(f"{request.label(v)} choice {c} out of range ({count} strategies)")
            valid = False
            continue
        cost = float(request.node_costs[v][c])
        if cost == np.inf:
            violations.append(f"{request.label(v)} strategy {c} is forbidden (inf)")
        node_cost += cost
    if not valid:
        return None, np.inf
    edge_cost = 0.0
    for k, edge in enumerate(request.edges):
        cost = float(edge.cost[choices[edge.src], choices[edge.dst]])
        if cost == np.inf:
            violations.append(
                f"edge {k} {request.label(edge.src)} -> {request.label(edge.dst)} pair "
                f"({choices[edge.src]}, {choices[edge.dst]}) is forbidden (inf)"
            )
        edge_cost += cost
    return node_cost, edge_cost


@dataclass(frozen=True, eq=False)
class MoveCosts:
    """What moving one node of ``request`` to another strategy changes in the objective
    (seconds): its own cost, its edges' and the shared costs it is a member of; memory
    is not priced. Built once per request, each :meth:`change` costs the node's degree
    (and a shared cost's member nodes where the move may decide whether it is paid)."""

    request: IntraOpRequest
    edges_at: tuple[tuple[int, ...], ...]
    #: per node: (shared cost index, {member node: its member strategies}) it is in
    shared_at: tuple[tuple[tuple[int, dict], ...], ...]

    @classmethod
    def of(cls, request: IntraOpRequest) -> MoveCosts:
        edges_at: list[list[int]] = [[] for _ in range(request.num_nodes)]
        for k, edge in enumerate(request.edges):
            edges_at[edge.src].append(k)
            edges_at[edge.dst].append(k)
        shared_at: list[list] = [[] for _ in range(request.num_nodes)]
        for k, shared in enumerate(request.shared_costs):
            members: dict[int, set[int]] = {}
            for v, i in shared.members:
                members.setdefault(v, set()).add(i)
            for v in sorted(members):
                shared_at[v].append((k, members))
        return cls(request, tuple(map(tuple, edges_at)), tuple(map(tuple, shared_at)))

    def change(self, choices, v: int, strategy: int) -> float:
        """Objective of ``choices`` with node ``v`` at ``strategy``, less that of ``choices``."""
        request = self.request
        moved = lambda u: strategy if u == v else choices[u]  # noqa: E731
        delta = float(request.node_costs[v][strategy]) - float(request.node_costs[v][choices[v]])
        for k in self.edges_at[v]:
            edge = request.edges[k]
            delta += float(edge.cost[moved(edge.src), moved(edge.dst)]) - \
                float(edge.cost[choices[edge.src], choices[edge.dst]])
        for k, members in self.shared_at[v]:
            was, now = choices[v] in members[v], strategy in members[v]
            if was != now and not any(choices[u] in s for u, s in members.items() if u != v):
                delta += request.shared_costs[k].cost * (now - was)
        return delta

    def __repr__(self) -> str:
        return f"MoveCosts({self.request.num_nodes} nodes, {len(self.request.edges)} edges)"
