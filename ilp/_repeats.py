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

import numpy as np

from ._clock import Deadline
from ._evaluate import evaluate
from ._heuristic import best_assignment, polish
from ._repeat_classes import RepeatClasses
from ._request import InfeasibleError, IntraOpRequest, IntraOpResult, tied_structure


def tied_hint(hint: Sequence[int], classes: RepeatClasses) -> tuple[int, ...]:
    """A plan of the whole request as a plan of its tied request: each class takes its
    first member's choice."""
    return tuple(hint[nodes[0]] for nodes in classes.members())


def tied_request(request: IntraOpRequest, classes: RepeatClasses | None = None
                 ) -> IntraOpRequest:
    """The request over classes (``request.repeats`` when not given): member costs
    summed, edges re-attached to classes (those between the same two classes summed into
    one), with ``request``'s options.

    Memory terms are carried over to the classes (a pair term inside one class becomes its
    diagonal), with the budget: a tied assignment's memory is priced exactly. Requests
    with ``memory_points`` are not tied (a node counted once per point cannot be mapped).
    The costs and edges over ``request.repeats`` are made once per request
    (``IntraOpRequest.tied_structure``).
    """
    if classes is None:
        classes, structure = request.repeats, request.tied_structure
    else:
        structure = tied_structure(request, classes)
    of = classes.of_node
    terms = tuple(tuple((of[t[0]], t[1]) if len(t) == 2 else
                        (of[t[0]], np.diagonal(t[2]).copy()) if of[t[0]] == of[t[1]] else
                        (of[t[0]], of[t[1]], t[2]) for t in point)
                  for point in request.memory_terms)
    return structure.with_options(
        memory_terms=terms, memory_budget=request.memory_budget,
        hint=None if request.hint is None else tied_hint(request.hint, classes),
        guide=None if request.guide is None else tied_hint(request.guide, classes),
        time_limit_s=request.time_limit_s, gap_limit=request.gap_limit,
        search=request.search)


def solve_tied(request: IntraOpRequest, deadline: Deadline,
               starting_plan: Callable[[], Sequence[int] | None] | None,
               solve: Callable[..., IntraOpResult]) -> IntraOpResult:
    """Solve over ``request.repeats`` (with ``solve``: ``solve_intra_op``), expand, polish
    node by node, never worse than the hint.

    The status is "FEASIBLE": the tied optimum need not be the untied one. The lower
    bound is Σ per-node minima + Σ per-edge minima (valid for any assignment, weak).
    """
    start = time.perf_counter()
    classes = request.repeats
    tied_start = None
    if starting_plan is not None:
        def tied_start():
            hint = starting_plan()
            return None if hint is None else tied_hint(hint, classes)
    try:
        sub = solve(tied_request(request).with_options(
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
