"""Request / result types of the intra-operator ILP, and up-front validation.

Units: costs are seconds, memory is bytes per device. Arrays are copied to
read-only float64 on construction; a malformed request raises ``ValueError``
naming the offending node (by name when ``node_names`` is given).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from autoshard.cost_model import format_bytes, format_seconds

from ._repeat_classes import RepeatClasses, repeat_classes
from ._request_parts import (
    EdgeCost,
    EdgeList,
    FlatCosts,
    MemoryTerms,
    SharedCost,
    frozen_array,
    value_summary,
)

OPTIONS = frozenset({"memory_terms", "memory_budget", "hint", "guide", "time_limit_s",
                     "wall_time_limit_s", "tie_repeats", "gap_limit", "search"})
"""The fields of an ``IntraOpRequest`` that ``with_options`` may change."""


def _structural(derive):
    """A property of a request worked out from its nodes, edges and costs alone, once for
    the request and every copy ``with_options`` makes of it (before or after: the copies
    share those and the store the result is kept in), whichever asks first."""
    name = derive.__name__

    @functools.wraps(derive)
    def get(self):
        store = self.__dict__["_structure"]
        if name not in store:
            store[name] = derive(self)
        return store[name]
    return property(get)


@dataclass(frozen=True, eq=False)
class IntraOpRequest:
    """One intra-op problem: pick a strategy per node minimising node + edge seconds.

    ``node_costs[v][i]``: seconds of strategy i of node v (``np.inf`` = forbidden).
    ``node_memory[v][i]``: bytes per device of node v's output under strategy i.
    ``memory_points``: node sets live together at a candidate peak; with
    ``memory_budget`` (bytes per device) each point's sum must stay within it.
    Nodes repeated inside one point count once. ``memory_terms``: more points,
    each a tuple of terms that add up: ``(node, bytes per strategy of that node)``
    (a node whose choice decides several live tensors, or a temporary buffer that
    only some of its strategies need) or ``(src, dst, bytes[i, j])`` when src uses
    strategy i and dst strategy j (a resharding copy, which exists only for some
    pairs); they need no ``node_memory``. ``hint``: a complete assignment to
    warm-start from. ``time_limit_s`` is turned into a deterministic solver limit, so
    the same request stops at the same point on every run and in every process.
    ``wall_time_limit_s``: wall-clock seconds the whole solve (LP, warm start, search)
    may take besides; ``None``: the deterministic limit alone (with a backstop against
    pathological slowness). A solve stopped by the wall clock may differ between runs.
    ``gap_limit``: stop once the solution is proven within this relative gap of the
    optimum (0: prove optimality or reach the time limit).
    ``search``: False to skip the CP-SAT search when the LP relaxation is fractional and
    return the best warm start (the hint and the LP's rounding, each improved by local
    search; solver status ``NO_SEARCH``), for a caller with a better fallback than a
    long search (neighbourhood rounds of a very large request still search).
    ``shared_costs``: fixed charges paid once when any of their (node, strategy)
    members is chosen (``SharedCost``).
    ``tie_repeats``: solve with nodes of repeated layers tied (``_repeats``; a
    restriction, used for deep models; memory terms are tied too; ignored with
    ``memory_points``).
    ``strategy_labels[v]``: integers of shape (strategies of v, labels), e.g. one label
    per mesh axis naming what the axis splits under each strategy; a request too large
    to solve whole (``_neighbourhood.LARGE_PROBLEM_CELLS``) is then solved over
    neighbourhoods of its plan: strategies differing from the current choice in at
    most one label (``_neighbourhood``). ``guide``: with a memory budget, a complete
    assignment over it (the optimum without the budget); such a request solved over
    neighbourhoods also starts from plans found between the guide and the budget by
    pricing memory (``_lagrangian``).
    ``node_roles[v]``: an integer naming what node v computes (equal for the same op of
    two identical layers); repeat classes (``tie_repeats``) then compare these instead of
    the nodes' costs, which can differ between identical layers (a value XLA recomputes in
    more fusions the more layers follow it).
    """

    node_costs: tuple[np.ndarray, ...]
    edges: tuple[EdgeCost, ...] = ()
    node_names: tuple[str, ...] = ()
    node_memory: tuple[np.ndarray, ...] | None = None
    memory_points: tuple[tuple[int, ...], ...] = ()
    memory_terms: tuple[tuple[tuple[int, np.ndarray], ...], ...] = ()
    memory_budget: float | None = None
    hint: tuple[int, ...] | None = None
    guide: tuple[int, ...] | None = None
    shared_costs: tuple[SharedCost, ...] = ()
    time_limit_s: float = 60.0
    wall_time_limit_s: float | None = None
    tie_repeats: bool = False
    gap_limit: float = 0.0
    search: bool = True
    strategy_labels: tuple[np.ndarray, ...] | None = None
    node_roles: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        names = tuple(str(name) for name in self.node_names)
        object.__setattr__(self, "node_names", names)
        costs = tuple(
            frozen_array(c, 1, f"{self._label(v)} node_costs") for v, c in enumerate(self.node_costs)
        )
        object.__setattr__(self, "node_costs", costs)
        if type(self.edges) is not EdgeList:
            object.__setattr__(self, "edges", EdgeList(
                e if isinstance(e, EdgeCost) else EdgeCost(*e) for e in self.edges))
        if self.node_memory is not None:
            memory = tuple(
                frozen_array(m, 1, f"{self._label(v)} node_memory")
                for v, m in enumerate(self.node_memory)
            )
            object.__setattr__(self, "node_memory", memory)
        points = tuple(tuple(int(v) for v in point) for point in self.memory_points)
        object.__setattr__(self, "memory_points", points)
        object.__setattr__(self, "shared_costs", tuple(
            c if isinstance(c, SharedCost) else SharedCost(*c) for c in self.shared_costs))
        if self.strategy_labels is not None:
            object.__setattr__(self, "strategy_labels",
                               tuple(self._labels(v, labels)
                                     for v, labels in enumerate(self.strategy_labels)))
        self._validate()
        object.__setattr__(self, "_structure", {})  # see _structural
        self._set_options({}, terms=True)

    def with_options(self, **changes) -> IntraOpRequest:
        """This request with some of ``OPTIONS`` changed (memory terms and budget, hint,
        limits, tying, search): what ``dataclasses.replace`` gives, without converting
        and checking the nodes, edges and costs again (they are shared)."""
        unknown = sorted(set(changes) - OPTIONS)
        if unknown:
            raise TypeError(f"with_options: {', '.join(unknown)} are not options of a request "
                            f"(options: {', '.join(sorted(OPTIONS))}); use dataclasses.replace")
        new = object.__new__(IntraOpRequest)
        new.__dict__.update(self.__dict__)
        new._set_options(changes, terms="memory_terms" in changes)
        return new

    def _set_options(self, changes: dict, *, terms: bool) -> None:
        """Set ``changes`` (``OPTIONS`` fields), normalise the options and check them (the
        memory terms only when ``terms``: they can be many)."""
        for name, value in changes.items():
            object.__setattr__(self, name, value)
        counts = tuple(len(c) for c in self.node_costs)
        # terms another request normalised and checked against the same strategy counts
        # (a neighbourhood round's, a memory probe's) are taken as they are
        terms = terms and not (type(self.memory_terms) is MemoryTerms and
                               self.memory_terms.checked == counts)
        if terms:
            object.__setattr__(self, "memory_terms", MemoryTerms(
                tuple(self._memory_term(p, term) for term in point)
                for p, point in enumerate(self.memory_terms)))
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", float(self.memory_budget))
        for name in ("hint", "guide"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        object.__setattr__(self, "time_limit_s", float(self.time_limit_s))
        if self.wall_time_limit_s is not None:
            object.__setattr__(self, "wall_time_limit_s", float(self.wall_time_limit_s))
        object.__setattr__(self, "gap_limit", float(self.gap_limit))
        self._validate_options(terms)
        if terms:
            self.memory_terms.checked = counts

    def _labels(self, v: int, labels) -> np.ndarray:
        array = np.asarray(labels)
        if array.ndim != 2 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"strategy_labels of {self._label(v)}: expected a 2-d integer array "
                             f"(strategies x labels), got shape {array.shape} of {array.dtype}")
        array = array.astype(np.int64)
        array.flags.writeable = False
        return array

    def _memory_term(self, p: int, term) -> tuple:
        if len(term) == 2:
            v, memory = term
            return int(v), frozen_array(memory, 1, f"memory_terms[{p}] of {self._label(int(v))}")
        if len(term) == 3:
            a, b, memory = term
            return int(a), int(b), frozen_array(
                memory, 2, f"memory_terms[{p}] of edge {self._label(int(a))} -> {self._label(int(b))}")
        raise ValueError(f"memory_terms[{p}]: expected (node, bytes) or (src, dst, bytes) terms, "
                         f"got a {len(term)}-tuple")

    # -- helpers -----------------------------------------------------------------
    @_structural
    def flat_costs(self) -> FlatCosts:
        """Every node's and edge's costs in one array each, for pricing a plan at once
        (an edge matrix several edges share is stored once; the edges' arrays are made
        once per ``EdgeList``, for every request holding it)."""
        counts = np.array([len(c) for c in self.node_costs], dtype=np.int64)
        node_start = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        costs = np.concatenate(self.node_costs) if self.node_costs else np.zeros(0)
        for array in (counts, node_start, costs):
            array.flags.writeable = False
        return FlatCosts(counts, node_start, costs, *self.edges.flat_edges)

    @_structural
    def repeats(self) -> RepeatClasses:
        """The classes of repeated layers' nodes the solver ties when ``tie_repeats`` is
        set (``repeat_classes``, default depth and period). Found once per request and
        shared by the copies ``with_options`` makes: they depend on the costs and edges
        only (``_structural``)."""
        return repeat_classes(self)

    @property
    def ties(self) -> bool:
        """Whether the solver solves this request over ``repeats``: ``tie_repeats`` is set,
        no node is counted at ``memory_points`` (those cannot be mapped onto classes), and
        tying shrinks it."""
        return self.tie_repeats and not self.memory_points and \
            self.repeats.num_classes < self.num_nodes

    @_structural
    def tied_structure(self) -> IntraOpRequest:
        """The request over ``repeats``' classes with no options set (no memory terms,
        hint or guide, default limits): the costs and edges ``_repeats.tied_request``
        completes with this request's options, made once per request."""
        return tied_structure(self, self.repeats)

    @_structural
    def shared_members(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every shared cost's members as three int arrays, member by member: (node,
        strategy, index of its shared cost), for pricing many plans at once."""
        counts = np.array([len(shared.members) for shared in self.shared_costs], dtype=np.int64)
        pairs = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(
            shared.members for shared in self.shared_costs)), dtype=np.int64,
            count=2 * int(counts.sum())).reshape(-1, 2)
        columns = (pairs[:, 0].copy(), pairs[:, 1].copy(),
                   np.repeat(np.arange(len(counts), dtype=np.int64), counts))
        for column in columns:
            column.flags.writeable = False
        return columns

    @property
    def num_nodes(self) -> int:
        return len(self.node_costs)

    def num_strategies(self, node: int) -> int:
        return len(self.node_costs[node])

    def _label(self, node: int) -> str:
        if 0 <= node < len(self.node_names):
            return f"node {self.node_names[node]!r} (#{node})"
        return f"node {node}"

    def label(self, node: int) -> str:
        """``"node 'dot_3' (#3)"`` or ``"node 3"``, for messages."""
        return self._label(node)

    def _validate(self) -> None:
        n = self.num_nodes
        counts = [len(c) for c in self.node_costs].__getitem__  # strategies per node
        if self.node_names and len(self.node_names) != n:
            raise ValueError(f"node_names has {len(self.node_names)} entries, expected {n} (one per node)")
        for v, cost in enumerate(self.node_costs):
            if cost.size == 0:
                raise ValueError(f"{self._label(v)} has zero strategies; expected at least one")
            if np.isnan(cost).any() or (cost == -np.inf).any():
                raise ValueError(f"{self._label(v)} node_costs contain NaN or -inf; expected finite seconds or +inf")
            if not np.isfinite(cost).any():
                raise ValueError(f"{self._label(v)}: every strategy is forbidden (all costs inf)")
        checked = tuple(len(c) for c in self.node_costs)  # the edges' checks depend on these
        for k, edge in enumerate(() if self.edges.checked == checked else self.edges):
            for end, v in (("src", edge.src), ("dst", edge.dst)):
                if not 0 <= v < n:
                    raise ValueError(f"edge {k}: {end} node index {v} out of range (expected 0..{n - 1})")
            if edge.src == edge.dst:
                raise ValueError(f"edge {k}: src == dst ({self._label(edge.src)}); self-edges are not allowed")
            expected = (counts(edge.src), counts(edge.dst))
            if edge.cost.shape != expected:
                raise ValueError(
                    f"edge {k} {self._label(edge.src)} -> {self._label(edge.dst)}: cost matrix has shape "
                    f"{edge.cost.shape}, expected {expected} (strategies of src x strategies of dst)"
                )
            if not edge.valid_cells:
                raise ValueError(
                    f"edge {k} {self._label(edge.src)} -> {self._label(edge.dst)}: cost contains NaN or -inf"
                )
        self.edges.checked = checked
        if self.node_memory is not None:
            if len(self.node_memory) != n:
                raise ValueError(f"node_memory has {len(self.node_memory)} entries, expected {n} (one per node)")
            for v, memory in enumerate(self.node_memory):
                if memory.shape != self.node_costs[v].shape:
                    raise ValueError(
                        f"{self._label(v)}: node_memory has {memory.size} entries, expected "
                        f"{counts(v)} (one per strategy)"
                    )
                if np.isnan(memory).any():
                    raise ValueError(f"{self._label(v)}: node_memory contains NaN")
        for p, point in enumerate(self.memory_points):
            for v in point:
                if not 0 <= v < n:
                    raise ValueError(f"memory point {p}: node index {v} out of range (expected 0..{n - 1})")
        if self.memory_points and self.node_memory is None:
            raise ValueError("memory_points given without node_memory")
        for k, shared in enumerate(self.shared_costs):
            if not (math.isfinite(shared.cost) and shared.cost >= 0):
                raise ValueError(f"shared_costs[{k}]: cost must be finite seconds >= 0, got {shared.cost}")
            if not shared.members:
                raise ValueError(f"shared_costs[{k}]: no members; expected (node, strategy) pairs")
            for v, i in shared.members:
                if not 0 <= v < n:
                    raise ValueError(f"shared_costs[{k}]: node index {v} out of range (expected 0..{n - 1})")
                if not 0 <= i < counts(v):
                    raise ValueError(f"shared_costs[{k}]: strategy {i} of {self._label(v)} out of range "
                                     f"(expected 0..{counts(v) - 1})")
        if self.node_roles is not None:
            if len(self.node_roles) != n:
                raise ValueError(f"node_roles has {len(self.node_roles)} entries, "
                                 f"expected {n} (one per node)")
            for v, role in enumerate(self.node_roles):
                if not isinstance(role, (int, np.integer)):
                    raise ValueError(f"node_roles of {self._label(v)}: expected an integer, "
                                     f"got {role!r}")
        if self.strategy_labels is not None:
            if len(self.strategy_labels) != n:
                raise ValueError(f"strategy_labels has {len(self.strategy_labels)} entries, "
                                 f"expected {n} (one per node)")
            for v, labels in enumerate(self.strategy_labels):
                if labels.shape[0] != counts(v):
                    raise ValueError(f"strategy_labels of {self._label(v)} has {labels.shape[0]} "
                                     f"rows, expected {counts(v)} (one per strategy)")

    def _validate_options(self, terms: bool) -> None:
        n = self.num_nodes
        counts = [len(c) for c in self.node_costs].__getitem__  # strategies per node
        for p, point in enumerate(self.memory_terms if terms else ()):
            for *nodes, memory in point:
                for v in nodes:
                    if not 0 <= v < n:
                        raise ValueError(f"memory_terms[{p}]: node index {v} out of range (expected 0..{n - 1})")
                expected = tuple(counts(v) for v in nodes)
                if memory.shape != expected or np.isnan(memory).any():
                    what = " -> ".join(self._label(v) for v in nodes)
                    raise ValueError(
                        f"memory_terms[{p}] for {what}: expected byte counts of shape {expected} "
                        f"(one per strategy{' pair' if len(nodes) == 2 else ''}, no NaN), "
                        f"got shape {memory.shape}")
                if len(nodes) == 2 and nodes[0] == nodes[1]:
                    raise ValueError(f"memory_terms[{p}]: edge term from {self._label(nodes[0])} "
                                     "to itself; give a node term instead")
        if self.memory_budget is not None:
            if math.isnan(self.memory_budget) or self.memory_budget < 0:
                raise ValueError(f"memory_budget must be >= 0 bytes, got {self.memory_budget}")
            if self.node_memory is None and not self.memory_terms:
                raise ValueError("memory_budget given without node_memory or memory_terms")
        for name in ("hint", "guide"):
            plan = getattr(self, name)
            if plan is None:
                continue
            if len(plan) != n:
                raise ValueError(f"{name} has {len(plan)} entries, expected {n} (one per node)")
            for v, choice in enumerate(plan):
                if not 0 <= choice < counts(v):
                    raise ValueError(
                        f"{name} for {self._label(v)} is {choice}, expected 0..{counts(v) - 1}"
                    )
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s}")
        if self.wall_time_limit_s is not None and not self.wall_time_limit_s >= 0:
            raise ValueError(f"wall_time_limit_s must be None or >= 0 seconds, got "
                             f"{self.wall_time_limit_s}")
        if not 0.0 <= self.gap_limit < 1.0:
            raise ValueError(f"gap_limit must be in [0, 1), got {self.gap_limit}")

    def __repr__(self) -> str:
        counts = [len(c) for c in self.node_costs]
        parts = [
            f"nodes={self.num_nodes}",
            f"strategies={sum(counts)} (max {max(counts, default=0)})",
            f"edges={len(self.edges)}",
        ]
        if self.memory_points:
            parts.append(f"memory_points={len(self.memory_points)}")
        if self.memory_budget is not None:
            parts.append(f"memory_budget={format_bytes(self.memory_budget)}")
        if self.shared_costs:
            parts.append(f"shared_costs={len(self.shared_costs)}")
        if self.hint is not None:
            parts.append("hint=yes")
        parts.append(f"time_limit_s={self.time_limit_s:g}")
        if self.wall_time_limit_s is not None:
            parts.append(f"wall_time_limit_s={self.wall_time_limit_s:g}")
        return f"IntraOpRequest({', '.join(parts)})"


@dataclass(frozen=True)
class SolverStats:
    """What the reductions left, what the LP relaxation and CP-SAT reported.

    ``solver_status``: CP-SAT's status, or ``LP_INTEGRAL`` (the LP optimum was
    integral, no search), ``LP_BOUND`` (the warm start was within ``gap_limit`` of the
    LP bound, no search), ``NO_SEARCH`` (fractional LP, the request said ``search=False``:
    the warm start), ``TRIVIAL`` (nothing left after the reductions),
    ``OUT_OF_TIME`` (the wall-clock budget ran out before the search: the warm start) or
    ``STALLED`` (a round of the search found nothing better, ``_search_rounds``).

    ``scale``: integer units per second in the CP-SAT objective;
    ``max_rounding_error_s``: bound on |scaled objective/scale - true objective|.
    """

    active_nodes: int = 0
    fixed_nodes: int = 0
    dropped_strategies: int = 0
    input_edges: int = 0
    model_edges: int = 0
    merged_edges: int = 0
    folded_edges: int = 0
    memory_points: int = 0
    scale: float = 0.0
    max_rounding_error_s: float = 0.0
    build_time_s: float = 0.0
    wall_time_s: float = 0.0
    deterministic_time: float = 0.0
    num_conflicts: int = 0
    num_branches: int = 0
    solver_status: str = ""
    tied_classes: int = 0  # > 0: repeated layers were tied into this many classes
    tied_gap: float = 0.0  # the optimality gap within the tied problem
    lp_bound: float = float("nan")  # seconds, the LP relaxation's optimum (nan: not solved)
    lp_integral: bool = False  # the LP optimum was integral, hence the ILP optimum
    lp_time_s: float = 0.0
    #: > 0: a request too large to solve whole was solved over this many neighbourhoods
    #: of its plan (``_neighbourhood``); the statistics above are the last round's
    neighbourhood_rounds: int = 0


@dataclass(frozen=True)
class IntraOpResult:
    """Chosen strategy per node; objective/lower_bound in seconds."""

    choices: tuple[int, ...]
    objective: float
    lower_bound: float
    gap: float
    status: str
    solve_time_s: float
    num_variables: int
    num_constraints: int
    stats: SolverStats = field(default_factory=SolverStats, compare=False)

    def __repr__(self) -> str:
        return (
            f"IntraOpResult(status={self.status}, objective={format_seconds(self.objective)}, "
            f"lower_bound={format_seconds(self.lower_bound)}, gap={self.gap:.3g}, "
            f"choices={value_summary(self.choices)}, solve_time_s={self.solve_time_s:.3f}, "
            f"num_variables={self.num_variables}, num_constraints={self.num_constraints})"
        )


class InfeasibleError(ValueError):
    """The memory budget cannot be met; ``min_peak_bytes`` is the best achievable peak."""

    def __init__(self, message: str, min_peak_bytes: float, memory_budget: float | None = None):
        super().__init__(message)
        self.min_peak_bytes = float(min_peak_bytes)
        self.memory_budget = memory_budget


def tied_structure(request: IntraOpRequest, classes: RepeatClasses) -> IntraOpRequest:
    """The request over ``classes``' classes with no options set: member costs summed,
    edges re-attached to classes (those between the same two classes summed into one),
    shared costs tied, the first member's labels for each class (``_repeats.tied_request``
    adds the options)."""
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
    return IntraOpRequest(node_costs=tuple(costs), shared_costs=shared,
                          edges=tuple(EdgeCost(a, b, m) for (a, b), m in sorted(edges.items())),
                          node_names=tuple(request.label(v) for v in members),
                          strategy_labels=labels)
