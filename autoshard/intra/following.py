"""Following: elementwise ops take the layout of an operand instead of choosing their own.

As in XLA's auto-sharding, an elementwise op (or a convert, a select, …) whose
leading operand has the output's shape *follows* that operand's producer: for
each strategy of the producer it takes the strategy that reads the operand in
exactly that layout. Followers chain, so a whole elementwise region becomes one
ILP node; its edges are re-indexed through the follow maps. This shrinks the
ILP by the number of such ops (most of a training step) at the price of never
resharding on the followed edge — which a cheapest plan rarely wants anyway.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from autoshard import ilp
from autoshard.ir.program import Literal

from .combining import MergedAllReduce
from .graph import ShardingGraph, Use
from .op_rules import ELEMENTWISE
from .strategies import axis_labels

_FOLLOWING = ELEMENTWISE - {"sharding_constraint", "reshard", "optimization_barrier"}


@dataclasses.dataclass(frozen=True, eq=False)
class Grouping:
    """``root[v]``: the node whose choice decides node ``v``; ``index[v][i]``: the strategy
    of ``v`` when its root picks strategy ``i``. ``roots`` lists the ILP's nodes in order."""

    root: tuple[int, ...]
    index: tuple[np.ndarray, ...]
    roots: tuple[int, ...]

    def expand(self, root_choices: Sequence[int]) -> list[int]:
        """Per-node strategy indices from the choices of the roots (in ``roots`` order)."""
        by_root = dict(zip(self.roots, root_choices))
        return [int(self.index[v][by_root[self.root[v]]]) for v in range(len(self.root))]


def followed_operand(program, node) -> int | None:
    """The operand an op node may follow: an elementwise op's first operand of the
    output's shape (``None``: the node chooses its own layout)."""
    if node.kind != "op" or len(node.strategies) < 2:
        return None
    eqn = program.eqns[node.eqn]
    if eqn.primitive.name not in _FOLLOWING:
        return None
    out_shape = tuple(program.avals[node.outputs[0]].shape)
    for k, atom in enumerate(eqn.inputs):
        if not isinstance(atom, Literal) and tuple(program.avals[atom].shape) == out_shape:
            return k
    return None


def follows_operand(program, node, operand: int) -> bool:
    """Whether ``node`` follows the layout of its operand ``operand``."""
    return followed_operand(program, node) == operand


def group_followers(graph: ShardingGraph, apart: frozenset[int] = frozenset()) -> Grouping:
    """Each follower (``followed_operand``) in its followed producer's group, except the
    nodes ``apart``, which choose their own layouts."""
    program = graph.traced.program
    n = len(graph.nodes)
    root = list(range(n))
    identity: dict[int, np.ndarray] = {}  # strategy count -> arange, one array shared

    def own(count: int) -> np.ndarray:
        if count not in identity:
            identity[count] = np.arange(count)
            identity[count].flags.writeable = False
        return identity[count]

    index = [own(len(node.strategies)) for node in graph.nodes]
    # repeated layers' nodes hold the very same strategy tuples and index arrays: a
    # follower's map is made once per (its strategies, operand, its leader's) and shared
    followed: dict[tuple, np.ndarray | None] = {}
    for v, node in enumerate(graph.nodes):
        k = followed_operand(program, node)
        if k is None or v in apart:
            continue
        u, out = graph.producer[program.eqns[node.eqn].inputs[k]]
        key = (id(node.strategies), k, id(graph.nodes[u].strategies), out, id(index[u]))
        if key not in followed:
            followed[key] = _follow_map(node.strategies, k, graph.nodes[u].strategies, out,
                                        index[u])
        if followed[key] is not None:
            root[v] = root[u]
            index[v] = followed[key]
    roots = tuple(v for v in range(n) if root[v] == v)
    return Grouping(tuple(root), tuple(index), roots)


def _follow_map(strategies, operand: int, leader_strategies, out: int, leader_index
                ) -> np.ndarray | None:
    """Per strategy of the leader's root (through ``leader_index``), the cheapest of
    ``strategies`` that reads operand ``operand`` as the leader makes output ``out``;
    None when some leader layout has no such strategy."""
    by_spec: dict = {}
    for j, s in enumerate(strategies):
        spec = s.in_specs[operand]
        if spec not in by_spec or s.cost_s < strategies[by_spec[spec]].cost_s:
            by_spec[spec] = j
    leader_specs = [leader_strategies[i].out_specs[out] for i in leader_index]
    if not all(spec in by_spec for spec in leader_specs):
        return None
    mapped = np.array([by_spec[spec] for spec in leader_specs])
    mapped.flags.writeable = False
    return mapped


def grouped_request(graph: ShardingGraph, grouping: Grouping, uses: Sequence[Use],
                    matrices: Sequence[np.ndarray], time_limit_s: float,
                    merged: Sequence[MergedAllReduce] = (),
                    resharding_weight: float = 1.0,
                    mesh_shape: Sequence[int] | None = None) -> ilp.IntraOpRequest:
    """The ILP over the roots: followers' costs and internal edges folded into their root;
    each merged all-reduce's latency a shared cost over the root strategies that pick a
    member strategy. ``resharding_weight`` scales the seconds of every resharding
    between ops against everything else. With ``mesh_shape`` every root strategy is
    labelled by what each mesh axis does under it, so that a problem too large to solve
    whole is searched one axis move at a time (``IntraOpRequest.strategy_labels``)."""
    w = resharding_weight
    position = {r: p for p, r in enumerate(grouping.roots)}
    costs = [np.zeros(len(grouping.index[r])) for r in grouping.roots]
    node_costs: dict = {}  # per strategy tuple (repeated layers share theirs)
    for v, node in enumerate(graph.nodes):
        key = id(node.strategies)
        if key not in node_costs:
            node_costs[key] = np.array([s.cost_s for s in node.strategies])
        costs[position[grouping.root[v]]] += node_costs[key][grouping.index[v]]
    blocks: dict = {}  # repeated layers: the same matrix read through the same index maps
    by_ids: dict = {}  # ... most often the very same index arrays (group_followers)

    def edge(matrix, rows, cols, src: int, dst: int) -> ilp.EdgeCost:
        ids = (id(matrix), id(rows), id(cols))
        if ids not in by_ids:
            key = (id(matrix), rows.tobytes(), cols.tobytes())
            if key not in blocks:
                grid = w * matrix[np.ix_(rows, cols)]
                grid.flags.writeable = False  # shared by the edges of every repeat
                # (the matrix kept alive for its id); the grid checked once, as an edge
                blocks[key] = (matrix, ilp.EdgeCost(src, dst, grid))
            by_ids[ids] = (rows, cols, blocks[key][1])  # (the maps kept alive for theirs)
        return by_ids[ids][2].between(src, dst)

    nonzero: dict = {}  # id(matrix) -> (matrix, whether any cell is non-zero)

    def any_cost(matrix) -> bool:
        if id(matrix) not in nonzero:
            nonzero[id(matrix)] = (matrix, bool(np.any(matrix)))
        return nonzero[id(matrix)][1]

    edges = []
    for use, matrix in zip(uses, matrices):
        rs, rd = grouping.root[use.src], grouping.root[use.dst]
        rows, cols = grouping.index[use.src], grouping.index[use.dst]
        if rs == rd:
            costs[position[rs]] += w * matrix[rows, cols]
        elif any_cost(matrix):
            edges.append(edge(matrix, rows, cols, position[rs], position[rd]))
    root_strategies: dict[int, dict[int, list[int]]] = {}  # node -> its strategy -> root's
    by_index: dict[bytes, dict[int, list[int]]] = {}  # the same for equal index maps

    def picked_by_root(v: int, i: int) -> list[int]:
        if v not in root_strategies:
            index = grouping.index[v]
            key = index.tobytes()
            if key not in by_index:
                by_strategy: dict[int, list[int]] = {}
                for j, k in enumerate(index.tolist()):
                    by_strategy.setdefault(k, []).append(j)
                by_index[key] = by_strategy
            root_strategies[v] = by_index[key]
        return root_strategies[v].get(i, [])

    shared = []
    for group in merged:
        members = sorted({(position[grouping.root[v]], j) for v, i in group.members
                          for j in picked_by_root(v, i)})
        if members:
            shared.append(ilp.SharedCost(group.latency_s, tuple(members)))
    labels = None
    if mesh_shape is not None:
        by_strategies: dict = {}  # repeated layers hold the very same strategy tuples
        for r in grouping.roots:
            strategies = graph.nodes[r].strategies
            if id(strategies) not in by_strategies:
                by_strategies[id(strategies)] = axis_labels(strategies, mesh_shape)
        labels = tuple(by_strategies[id(graph.nodes[r].strategies)][grouping.index[r]]
                       for r in grouping.roots)
    return ilp.IntraOpRequest(node_costs=tuple(costs), edges=tuple(edges),
                              node_names=tuple(graph.nodes[r].name for r in grouping.roots),
                              shared_costs=tuple(shared), time_limit_s=time_limit_s,
                              strategy_labels=labels, node_roles=node_roles(graph, grouping))


def node_roles(graph: ShardingGraph, grouping: Grouping) -> tuple[int, ...]:
    """Per root (request node): a number naming what its group computes, equal for the
    same group of two identical layers: each member's equation (its signature, which
    decides its strategies' layouts) or input (its shape), its number of strategies and
    its map onto the root's strategies. Unlike their costs, this does not tell an early
    layer from a late one where XLA recomputes a value in more fusions the more layers
    follow it (a residual stream's gradient)."""
    program = graph.traced.program
    signatures = graph.traced.signatures
    members: dict[int, list] = {r: [] for r in grouping.roots}
    for v, node in enumerate(graph.nodes):
        what = _role_text(program, node.eqn, signatures) if node.eqn is not None else \
            tuple((tuple(program.avals[o].shape), str(program.avals[o].dtype))
                  for o in node.outputs)
        members[grouping.root[v]].append((node.kind, what, len(node.strategies),
                                          grouping.index[v].tobytes()))
    numbers: dict = {}
    return tuple(numbers.setdefault(tuple(members[r]), len(numbers)) for r in grouping.roots)


def _role_text(program, e: int, signatures) -> str:
    """Equation ``e``'s signature, but a ``slice``'s by the extent it takes, not where
    it starts: each step of an unrolled ``lax.scan`` slices its own row of the stacked
    inputs (and of the residuals its backward reads), and the steps play the same role.
    Told apart by their starts, a 100-step RNN's 1919 nodes made 671 repeat classes (89
    by extent), and its LP ran to the 60 s time limit."""
    eqn = program.eqns[e]
    if eqn.primitive.name != "slice":
        return signatures[e]
    params = eqn.params
    extents = tuple(hi - lo for lo, hi in zip(params["start_indices"], params["limit_indices"]))
    return repr(("slice", extents, params.get("strides"),
                 [str(program.avals[v].shape) for v in (*eqn.inputs, *eqn.outputs)
                  if not isinstance(v, Literal)],
                 [str(program.avals[v].dtype) for v in eqn.outputs]))
