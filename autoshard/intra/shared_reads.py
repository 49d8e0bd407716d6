"""Reads of one value shared: XLA reshards a value into a layout once, however many ops
read it in that layout.

Two ops reading a value in the same other layout (an activation all-gathered for the
forward matmul and again for the weight gradient; a cotangent read by both gradient
matmuls) run one collective in the compiled program: XLA's common-subexpression pass
merges the two, and the result stays live from the first reader to the last. Pricing
each tensor use on its own would charge that collective once per reader.

So a value read by two or more ops (apart from elementwise readers that follow its
producer's layout, see ``following``) gets a *read node* (kind ``"reshard"``) between its
producer and its readers: a choice of the layout ``r`` the value is read in. The use
producer → read node costs the resharding from the made layout to ``r`` (once), and
each use read node → reader the resharding from ``r`` to what that reader wants (zero
when it wants ``r``). With ``r`` the made layout this is exactly the per-use pricing, so
the search only gains; with ``r`` the shared layout each reader pays nothing more. A
reader wanting a third layout is priced from ``r`` (a second resharding, as XLA emits
it from the shared copy or from the original; the cheaper of those is not modelled).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from autoshard import ilp

from .following import Grouping, follows_operand
from .graph import Node, ShardingGraph, Use
from .strategies import Strategy, spec_name

READ = "reshard"   # Node.kind of a read node


def share_reads(graph: ShardingGraph) -> ShardingGraph:
    """``graph`` with a read node after the producer of every value two or more ops read
    (elementwise followers apart); nodes stay in program order (a read node right after
    its producer), every other node and use keeps its meaning."""
    program = graph.traced.program
    readers: dict[tuple[int, int, float], list[Use]] = {}
    for use in graph.uses:
        dst = graph.nodes[use.dst]
        if use.operand < 0 or dst.kind != "op":
            continue
        if follows_operand(program, dst, use.operand) and _always_follows(graph, use):
            continue
        readers.setdefault((use.src, use.src_output, use.weight), []).append(use)
    shared = {key: uses for key, uses in readers.items() if len(uses) >= 2}
    if not shared:
        return graph
    by_layouts: dict[tuple, tuple[Strategy, ...]] = {}  # repeated layers share a tuple
    # (reads inside a loop planned once and reads outside it share no copy: ``Use.weight``)
    weights: dict[tuple[int, int], list[float]] = {}
    for v, k, weight in shared:
        weights.setdefault((v, k), []).append(weight)
    new_index, nodes, read_node = {}, [], {}
    for v, node in enumerate(graph.nodes):
        new_index[v] = len(nodes)
        nodes.append(node)
        for k in range(len(node.outputs)):
            for weight in sorted(weights.get((v, k), ())):
                uses = shared[(v, k, weight)]
                layouts = dict.fromkeys(s.out_specs[k] for s in node.strategies)
                for use in uses:
                    layouts.update(dict.fromkeys(
                        s.in_specs[use.operand] for s in graph.nodes[use.dst].strategies))
                layouts = tuple(layouts)
                if layouts not in by_layouts:
                    by_layouts[layouts] = tuple(Strategy(spec_name(spec), (spec,), (spec,), 0.0,
                                                         0.0) for spec in layouts)
                read_node[(v, k, weight)] = len(nodes)
                nodes.append(Node(f"{node.name} read", READ, None, (node.outputs[k],),
                                  by_layouts[layouts]))
    rerouted = {id(use): read_node[key] for key, uses in shared.items() for use in uses}
    new_uses = []
    for use in graph.uses:
        dst = new_index[use.dst]
        if id(use) in rerouted:
            new_uses.append(Use(rerouted[id(use)], 0, dst, use.operand, use.weight))
        else:
            new_uses.append(Use(new_index[use.src], use.src_output, dst, use.operand, use.weight))
    new_uses += [Use(new_index[v], k, r, 0, weight)
                 for (v, k, weight), r in sorted(read_node.items())]
    producer = {vid: (new_index[v], k) for vid, (v, k) in graph.producer.items()}
    return dataclasses.replace(graph, nodes=tuple(nodes), uses=tuple(new_uses),
                               producer=producer)


def _always_follows(graph: ShardingGraph, use: Use) -> bool:
    """Whether the follower ``use.dst`` can read its operand in every layout the producer
    makes it in (so that ``following`` groups the two: the follower never reshards it).
    A follower that cannot reshards on its own, and XLA shares that resharding with the
    value's other readers: it reads through the read node like them (a GPT's attention
    output all-gathered once for the projection's gradient and for a product)."""
    made = {s.out_specs[use.src_output] for s in graph.nodes[use.src].strategies}
    return made <= {s.in_specs[use.operand] for s in graph.nodes[use.dst].strategies}


def read_steps(graph: ShardingGraph) -> dict[int, tuple[int, int]]:
    """Read node → (first, last) equation reading through it: where its shared copy lives."""
    steps: dict[int, tuple[int, int]] = {}
    for use in graph.uses:
        if graph.nodes[use.src].kind == READ and use.operand >= 0:
            e = graph.nodes[use.dst].eqn
            first, last = steps.get(use.src, (e, e))
            steps[use.src] = (min(first, e), max(last, e))
    return steps


def settle_reads(graph: ShardingGraph, grouping, request: ilp.IntraOpRequest,
                 choices: Sequence[int]) -> tuple[int, ...]:
    """``choices`` (per ILP node) with every read node moved to its cheapest layout given
    its neighbours' choices: a plan whose readers were chosen first (propagation) then
    shares each resharding as XLA does. Exact: a read node's edges all end at nodes that
    are not read nodes."""
    position = {r: p for p, r in enumerate(grouping.roots)}
    reads = {position[v] for v, node in enumerate(graph.nodes)
             if node.kind == READ and grouping.root[v] == v}
    if not reads:
        return tuple(choices)
    out = [int(c) for c in choices]
    totals = {p: np.array(request.node_costs[p], dtype=np.float64) for p in reads}
    for edge in request.edges:
        if edge.src in reads:
            totals[edge.src] = totals[edge.src] + np.asarray(edge.cost)[:, out[edge.dst]]
        if edge.dst in reads:
            totals[edge.dst] = totals[edge.dst] + np.asarray(edge.cost)[out[edge.src], :]
    for p, total in totals.items():
        out[p] = int(np.argmin(total))
    return tuple(out)


def prefer_made_layouts(graph: ShardingGraph, grouping: Grouping, request: ilp.IntraOpRequest,
                        choices: Sequence[int]) -> tuple[int, ...]:
    """``choices`` with every reader of a shared value that reads it in a third layout
    (neither its shared copy's nor the one it is made in) moved, where its ILP node has a
    strategy costing the plan no more, to one reading the shared or the made layout.

    The model prices a third layout from the shared copy (a free slice when the copy is
    replicated); XLA reshards the operand from the layout it is made in (an all-to-all
    where a batch-split value is read split over its sequence). Among plans the model
    prices alike, this keeps the one XLA compiles as priced. (Memory is not priced by the
    moves: the planner leaves a plan made under a memory budget as solved.)"""
    into_read = {use.dst: use for use in graph.uses if graph.nodes[use.dst].kind == READ}
    if not into_read:
        return tuple(choices)
    position = {r: p for p, r in enumerate(grouping.roots)}
    moves = ilp.MoveCosts.of(request)
    out = [int(c) for c in choices]
    slack = 1e-12 * abs(ilp.evaluate(request, out).objective)  # float rounding, not a price
    per_node = grouping.expand(out)
    for use in graph.uses:
        if use.src not in into_read or use.operand < 0:
            continue
        made_by = into_read[use.src]
        fine = (graph.nodes[use.src].strategies[per_node[use.src]].out_specs[0],
                graph.nodes[made_by.src].strategies[per_node[made_by.src]].out_specs[made_by.src_output])
        reader = graph.nodes[use.dst]
        if reader.strategies[per_node[use.dst]].in_specs[use.operand] in fine:
            continue
        p = position[grouping.root[use.dst]]
        for i, j in enumerate(grouping.index[use.dst]):
            if reader.strategies[j].in_specs[use.operand] in fine and \
                    moves.change(out, p, i) <= slack:
                out[p] = i
                per_node = grouping.expand(out)
                break
    return tuple(out)


def reads_following_producers(graph: ShardingGraph, grouping: Grouping) -> Grouping:
    """``grouping`` with every read node folded into its producer's root, taking the
    layout the value is made in: each reader then pays its own resharding, as XLA's
    sharding propagation sees the program (presets are priced by that propagation,
    then :func:`settle_reads` shares what XLA's CSE shares)."""
    root, index = list(grouping.root), list(grouping.index)
    for use in graph.uses:
        read = graph.nodes[use.dst]
        if read.kind != READ or grouping.root[use.dst] != use.dst:
            continue
        made = [s.out_specs[use.src_output]
                for s in (graph.nodes[use.src].strategies[i] for i in grouping.index[use.src])]
        where = {s.out_specs[0]: j for j, s in enumerate(read.strategies)}
        root[use.dst] = grouping.root[use.src]
        index[use.dst] = np.array([where[spec] for spec in made])
    return Grouping(tuple(root), tuple(index),
                    tuple(v for v in range(len(root)) if root[v] == v))


def regrouped(choices: Sequence[int], source: Grouping, target: Grouping) -> tuple[int, ...]:
    """Choices per ILP node of ``source`` as choices per ILP node of ``target`` (the same
    graph's nodes grouped otherwise; every root of ``target`` chooses its own strategy)."""
    per_node = source.expand(choices)
    return tuple(int(per_node[r]) for r in target.roots)


def shared_from_per_use(graph: ShardingGraph, grouping: Grouping, request: ilp.IntraOpRequest,
                        per_use_grouping: Grouping, choices: Sequence[int]) -> tuple[int, ...]:
    """A plan of the graph without read nodes (``share_reads``' input, grouped by
    ``per_use_grouping``) as choices over ``request``'s nodes: every read node first at the
    layout its value is made in (the same plan, priced per use), then settled."""
    made = iter(per_use_grouping.expand(choices))
    per_node = [0 if node.kind == READ else next(made) for node in graph.nodes]
    for use in graph.uses:
        read = graph.nodes[use.dst]
        if read.kind == READ:
            spec = graph.nodes[use.src].strategies[per_node[use.src]].out_specs[use.src_output]
            per_node[use.dst] = next(j for j, s in enumerate(read.strategies)
                                     if s.out_specs[0] == spec)
    return settle_reads(graph, grouping, request, [per_node[r] for r in grouping.roots])


def per_use_from_shared(graph: ShardingGraph, grouping: Grouping, per_use_grouping: Grouping,
                        choices: Sequence[int]) -> tuple[int, ...]:
    """A plan of ``graph`` (read nodes in, grouped by ``grouping``) as choices over the
    ILP nodes of the graph without read nodes (grouped by ``per_use_grouping``): the same
    strategies, each reader resharding for itself."""
    per_node = [c for c, node in zip(grouping.expand(choices), graph.nodes, strict=True)
                if node.kind != READ]
    return tuple(per_node[r] for r in per_use_grouping.roots)
