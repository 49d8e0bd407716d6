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

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ._clock import Deadline
from ._evaluate import evaluate
from ._heuristic import best_assignment, polish
from ._request import EdgeCost, InfeasibleError, IntraOpRequest, IntraOpResult, SharedCost


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


def repeat_classes(request: IntraOpRequest, rounds: int = 3, period: int = 2) -> RepeatClasses:
    """Classes of nodes whose costs have the same shape (``COST_SHAPE_RESOLUTION``) and
    whose neighbourhoods ``rounds`` deep are identical."""
    n = request.num_nodes
    color = _numbered(_cost_keys(request.node_costs))
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


def tied_hint(hint: Sequence[int], classes: RepeatClasses) -> tuple[int, ...]:
    """A plan of the whole request as a plan of its tied request: each class takes its
    first member's choice."""
    return tuple(hint[nodes[0]] for nodes in classes.members())


def tied_request(request: IntraOpRequest, classes: RepeatClasses) -> IntraOpRequest:
    """The request over classes: member costs summed, edges re-attached to classes (those
    between the same two classes summed into one).

    Memory terms are carried over to the classes (a pair term inside one class becomes its
    diagonal), with the budget: a tied assignment's memory is priced exactly. Requests
    with ``memory_points`` are not tied (a node counted once per point cannot be mapped).
    """
    costs = [None] * classes.num_classes
    for v, c in enumerate(classes.of_node):
        cost = np.asarray(request.node_costs[v], dtype=np.float64)
        costs[c] = cost.copy() if costs[c] is None else costs[c] + cost
    edges: dict[tuple[int, int], np.ndarray] = {}  # parallel edges summed: flat in depth
    for e in request.edges:
        a, b = classes.of_node[e.src], classes.of_node[e.dst]
        if a == b:  # both ends take the same choice
            costs[a] = costs[a] + np.diagonal(e.cost)
            continue
        matrix = e.cost if a < b else e.cost.T
        key = (min(a, b), max(a, b))
        edges[key] = edges[key] + matrix if key in edges else matrix
    members = [nodes[0] for nodes in classes.members()]  # each class's first member
    hint = None if request.hint is None else tied_hint(request.hint, classes)
    guide = None if request.guide is None else tied_hint(request.guide, classes)
    # members share costs and neighbourhoods: the first one's labels stand for the class
    labels = None if request.strategy_labels is None else \
        tuple(request.strategy_labels[v] for v in members)
    # a class choosing a member strategy chooses it for every node of the class: same
    # charge; charges whose members tie to the same (class, strategy) pairs are paid
    # together, so they are one charge of their sum (one per repeated layer's merged
    # all-reduce becomes one per class)
    charges: dict[tuple, float] = {}
    for s in request.shared_costs:
        tied = tuple(sorted({(classes.of_node[v], i) for v, i in s.members}))
        charges[tied] = charges.get(tied, 0.0) + s.cost
    shared = tuple(SharedCost(cost, tied) for tied, cost in charges.items())
    of = classes.of_node
    terms = tuple(tuple((of[t[0]], t[1]) if len(t) == 2 else
                        (of[t[0]], np.diagonal(t[2]).copy()) if of[t[0]] == of[t[1]] else
                        (of[t[0]], of[t[1]], t[2]) for t in point)
                  for point in request.memory_terms)
    return IntraOpRequest(node_costs=tuple(costs), shared_costs=shared,
                          memory_terms=terms, memory_budget=request.memory_budget,
                          edges=tuple(EdgeCost(a, b, m) for (a, b), m in sorted(edges.items())),
                          node_names=tuple(request.label(v) for v in members),
                          hint=hint, guide=guide, time_limit_s=request.time_limit_s,
                          gap_limit=request.gap_limit, search=request.search,
                          strategy_labels=labels)


def solve_tied(request: IntraOpRequest, classes: RepeatClasses, deadline: Deadline,
               starting_plan: Callable[[], Sequence[int] | None] | None,
               solve: Callable[..., IntraOpResult]) -> IntraOpResult:
    """Solve over repeat classes (with ``solve``: ``solve_intra_op``), expand, polish
    node by node, never worse than the hint.

    The status is "FEASIBLE": the tied optimum need not be the untied one. The lower
    bound is Σ per-node minima + Σ per-edge minima (valid for any assignment, weak).
    """
    start = time.perf_counter()
    tied_start = None
    if starting_plan is not None:
        def tied_start():
            hint = starting_plan()
            return None if hint is None else tied_hint(hint, classes)
    try:
        sub = solve(tied_request(request, classes).with_options(
            wall_time_limit_s=deadline.wall_limit()), starting_plan=tied_start)
    except InfeasibleError:  # no tied plan fits the budget: an untied one may
        return solve(request.with_options(tie_repeats=False,
                                          wall_time_limit_s=deadline.wall_limit()),
                     starting_plan=starting_plan)
    if starting_plan is not None:
        request = request.with_options(hint=starting_plan())
    costs = [np.asarray(c, dtype=np.float64) for c in request.node_costs]
    edges = [(e.src, e.dst, e.cost) for e in request.edges]
    expanded = list(classes.expand(sub.choices))
    # polishing ignores shared costs: keep the unpolished expansion as a candidate too
    candidates = [polish(costs, edges, expanded), expanded] + (
        [request.hint] if request.hint is not None else [])
    choices = best_assignment(request, candidates)
    if choices is None:
        choices = tuple(expanded)
    objective = evaluate(request, choices).objective
    floor = sum(float(np.min(c)) for c in request.node_costs) + \
        sum(float(np.min(e.cost)) for e in request.edges)  # shared costs may all go unpaid
    lower_bound = min(objective, floor)
    gap = (objective - lower_bound) / abs(objective) if objective else 0.0
    stats = dataclasses.replace(sub.stats, tied_classes=classes.num_classes, tied_gap=sub.gap,
                                input_edges=len(request.edges))
    return IntraOpResult(choices=tuple(choices), objective=objective, lower_bound=lower_bound,
                         gap=gap, status="FEASIBLE", solve_time_s=time.perf_counter() - start,
                         num_variables=sub.num_variables, num_constraints=sub.num_constraints,
                         stats=stats)
