"""Repeat classes: which nodes of a request play the same role in identical layers.

Colour refinement (1-dimensional Weisfeiler–Lehman) over the request finds nodes whose
costs (or roles, where the request names them) and neighbourhoods, up to ``rounds``
edges away, are identical; members are numbered in node order and split by that number
modulo ``period``. Reads a request's ``node_costs``, ``node_roles`` and ``edges`` only
(``_repeats`` ties the classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class RepeatClasses:
    """``of_node[v]``: the class of node ``v``; classes are numbered by first member."""

    of_node: tuple[int, ...]
    num_classes: int

    def expand(self, class_choices) -> tuple[int, ...]:
        return tuple(int(class_choices[c]) for c in self.of_node)

    def members(self) -> list[list[int]]:
        """Per class (in class order), its nodes in index order."""
        members: list[list[int]] = [[] for _ in range(self.num_classes)]
        for v, c in enumerate(self.of_node):
            members[c].append(v)
        return members

    def __repr__(self) -> str:
        return f"RepeatClasses({len(self.of_node)} nodes -> {self.num_classes} classes)"


def _array_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.float64)
    return repr(array.shape).encode() + array.tobytes()


#: node costs are compared by their shape (each strategy's cost over the node's dearest,
#: to this resolution), not their size: the same role in two layers can cost more in one
#: (XLA duplicates an early residual add into more fusions than a late one) yet is
#: decided the same way. Sizes still tell nodes apart through their edges' matrices, and
#: tying stays exact: the tied request sums its members' own costs.
COST_SHAPE_RESOLUTION = 1e-3


def _cost_keys(node_costs) -> list[bytes]:
    """Each node's costs over its largest finite cost, rounded (infinite ones kept)."""
    keys = []
    for cost in node_costs:
        cost = np.asarray(cost, dtype=np.float64)
        finite = np.isfinite(cost)
        largest = float(np.max(np.abs(cost[finite]), initial=0.0))
        shape = np.round(cost / (largest * COST_SHAPE_RESOLUTION)) if largest > 0 else cost
        keys.append(_array_bytes(np.where(finite, shape, cost)))
    return keys


def _numbered(keys) -> list[int]:
    """Each key's number among the distinct keys, by first appearance: equal numbers
    exactly for equal keys, the same in every process (no hash values involved)."""
    numbers: dict = {}
    return [numbers.setdefault(key, len(numbers)) for key in keys]


def repeat_classes(request, rounds: int = 3, period: int = 2) -> RepeatClasses:
    """Classes of nodes whose costs have the same shape (``COST_SHAPE_RESOLUTION``), or
    the same ``node_roles`` where the request names them, and whose neighbourhoods
    ``rounds`` deep are identical (``request``: an ``IntraOpRequest``)."""
    n = request.num_nodes
    roles = request.node_roles
    color = _numbered(_cost_keys(request.node_costs) if roles is None else roles)
    by_array: dict[int, bytes] = {}  # edges of repeated layers often share one array
    for e in request.edges:
        if id(e.cost) not in by_array:
            by_array[id(e.cost)] = _array_bytes(e.cost)
    tags = _numbered(by_array[id(e.cost)] for e in request.edges)
    incident: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    for e, tag in zip(request.edges, tags):
        incident[e.src].append((0, tag, e.dst))
        incident[e.dst].append((1, tag, e.src))
    for _ in range(rounds):
        color = _numbered((color[v], tuple(sorted((way, tag, color[u])
                                                  for way, tag, u in incident[v])))
                          for v in range(n))
    seen: dict[int, int] = {}
    keys: dict[tuple[int, int], int] = {}
    of_node = []
    for v in range(n):
        occurrence = seen.get(color[v], 0)
        seen[color[v]] = occurrence + 1
        key = (color[v], occurrence % period)
        of_node.append(keys.setdefault(key, len(keys)))
    return RepeatClasses(tuple(of_node), len(keys))
