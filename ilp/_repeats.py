"""Repeated structure: tie nodes that play the same role in identical layers.

A deep model repeats one layer many times, and so does its ILP: the same node
costs and the same edge matrices between the same kinds of neighbours. Colour
refinement (1-dimensional Weisfeiler–Lehman) over the request finds nodes whose
costs and neighbourhoods, up to ``rounds`` edges away, are identical; those are
tied into one class that takes one choice. Members are numbered in node order and
split by that number modulo ``period`` (2: a class alternates, which keeps
Megatron's column/row pattern across consecutive identical layers reachable).

Tying is a restriction, never a relaxation: every tied assignment is a valid
assignment of the original request, priced exactly (an edge inside one class
costs its diagonal). The tied problem has about ``period`` layers' worth of nodes
whatever the depth, so its solve time stops growing with the number of layers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ._request import EdgeCost, IntraOpRequest, SharedCost


@dataclass(frozen=True, eq=False)
class RepeatClasses:
    """``of_node[v]``: the class of node ``v``; classes are numbered by first member."""

    of_node: tuple[int, ...]
    num_classes: int

    def expand(self, class_choices) -> tuple[int, ...]:
        return tuple(int(class_choices[c]) for c in self.of_node)

    def __repr__(self) -> str:
        return f"RepeatClasses({len(self.of_node)} nodes -> {self.num_classes} classes)"


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def _array_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.float64)
    return repr(array.shape).encode() + array.tobytes()


def repeat_classes(request: IntraOpRequest, rounds: int = 3, period: int = 2) -> RepeatClasses:
    """Classes of nodes with identical costs and identical neighbourhoods ``rounds`` deep."""
    n = request.num_nodes
    color = [_digest(_array_bytes(c)) for c in request.node_costs]
    incident: list[list[tuple[bytes, int]]] = [[] for _ in range(n)]
    for e in request.edges:
        tag = _array_bytes(e.cost)
        incident[e.src].append((b"out" + tag, e.dst))
        incident[e.dst].append((b"in" + tag, e.src))
    edge_tags = [[(_digest(tag), u) for tag, u in row] for row in incident]
    for _ in range(rounds):
        color = [_digest(color[v], *sorted(_digest(tag, color[u]) for tag, u in edge_tags[v]))
                 for v in range(n)]
    seen: dict[bytes, int] = {}
    keys: dict[tuple[bytes, int], int] = {}
    of_node = []
    for v in range(n):
        occurrence = seen.get(color[v], 0)
        seen[color[v]] = occurrence + 1
        key = (color[v], occurrence % period)
        of_node.append(keys.setdefault(key, len(keys)))
    return RepeatClasses(tuple(of_node), len(keys))


def tied_request(request: IntraOpRequest, classes: RepeatClasses) -> IntraOpRequest:
    """The request over classes: member costs summed, edges re-attached to classes.

    Memory constraints are not carried over (callers tie only unconstrained requests).
    """
    costs = [None] * classes.num_classes
    for v, c in enumerate(classes.of_node):
        cost = np.asarray(request.node_costs[v], dtype=np.float64)
        costs[c] = cost.copy() if costs[c] is None else costs[c] + cost
    edges = []
    for e in request.edges:
        a, b = classes.of_node[e.src], classes.of_node[e.dst]
        if a == b:  # both ends take the same choice
            costs[a] = costs[a] + np.diagonal(e.cost)
        else:
            edges.append(EdgeCost(a, b, e.cost))
    hint = None
    if request.hint is not None:
        first = {}
        for v, c in enumerate(classes.of_node):
            first.setdefault(c, request.hint[v])
        hint = tuple(first[c] for c in range(classes.num_classes))
    names = {}
    for v, c in enumerate(classes.of_node):
        names.setdefault(c, request.label(v))
    # a class choosing a member strategy chooses it for every node of the class: same charge
    shared = tuple(SharedCost(s.cost, tuple(sorted({(classes.of_node[v], i) for v, i in s.members})))
                   for s in request.shared_costs)
    return IntraOpRequest(node_costs=tuple(costs), edges=tuple(edges), shared_costs=shared,
                          node_names=tuple(names[c] for c in range(classes.num_classes)),
                          hint=hint, time_limit_s=request.time_limit_s,
                          gap_limit=request.gap_limit)
