"""The strategies of a preset's ops that XLA compiles its fixed layouts into: each op's
values made, and its operands read, in the layouts of ``xla_propagation``."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoshard.ir.specs import Spec

from .following import Grouping, followed_operand
from .graph import ShardingGraph
from .user_constraints import CONSTRAINTS
from .xla_propagation import ProgramFactors, Propagated, program_factors, propagated_layouts


def propagated_options(graph: ShardingGraph, grouping: Grouping, layouts: Sequence[Spec],
                       mesh_shape: Sequence[int], pairs: Sequence[tuple[int, int]] = (),
                       factors: ProgramFactors | None = None,
                       propagated: Propagated | None = None) -> dict[int, list[int]]:
    """Per ILP node (position in ``grouping.roots``) the strategies closest to what XLA
    compiles from the inputs' fixed ``layouts`` (each carried output of ``pairs``, (flat
    output, flat input), fixed to its input's layout; the program's sharding constraints
    kept): :func:`propagated_layouts`. Each member op scores its strategies by how close
    they come to reading and making its values in the propagated layouts (``_score``);
    the node keeps the strategies of the best total, when some score and not all alike.
    ``factors``: ``program_factors`` of the graph's program, made here when not
    given; ``propagated``: ``preset_propagation`` of these layouts and pairs, made here
    when not given."""
    program = graph.traced.program
    if propagated is None:
        propagated = preset_propagation(graph, layouts, mesh_shape, pairs, factors)
    made = propagated.made
    members: dict[int, list[int]] = {r: [] for r in grouping.roots}
    for v, r in enumerate(grouping.root):
        if graph.nodes[v].kind == "op" and graph.nodes[v].eqn in propagated.read:
            members[r].append(v)
    scores: dict[tuple, np.ndarray] = {}   # repeated layers share their strategy tuples
    kept: dict[tuple, list[int] | None] = {}   # ... and their nodes' members alike
    options = {}
    for position, r in enumerate(grouping.roots):
        keys = []
        for v in members[r]:
            node = graph.nodes[v]
            out = tuple(made.get(vid) or ((),) * len(program.avals[vid].shape)
                        for vid in node.outputs)
            key = (id(node.strategies), out, propagated.read[node.eqn])
            if key not in scores:
                scores[key] = np.array([_score(s, out, key[2]) for s in node.strategies])
            keys.append((key, grouping.index[v].tobytes()))
        signature = (len(grouping.index[r]), tuple(keys))
        if signature not in kept:
            score = np.zeros(len(grouping.index[r]), dtype=np.int64)
            for v, (key, _) in zip(members[r], keys):
                score += scores[key][grouping.index[v]]
            best = score.max(initial=0)
            kept[signature] = np.flatnonzero(score == best).tolist() \
                if best > 0 and not (score == best).all() else None
        if kept[signature] is not None:
            options[position] = list(kept[signature])
    return options


def resharded_followers(graph: ShardingGraph, propagated: Propagated) -> frozenset[int]:
    """The follower nodes (``following.followed_operand``) whose followed operand XLA's
    propagation (``preset_propagation`` of the inputs' fixed layouts) reads in another
    layout than the one it is made in: XLA computes the op in its own layout and
    reshards that operand. Measured: ZeRO-3 of a relu MLP whose batch splits over one axis
    of 2x4 (or 8x8): the backward's ``select_n`` is computed as the gradient it selects is
    split, on the features over both axes, and the relu's mask, made in the forward split
    as the batch is, is resharded for it (an all-to-all and a permute of the mask);
    following the mask, the preset was priced as the gradient resharded to the mask's
    layout and back (5 audit differences)."""
    program = graph.traced.program
    apart = set()
    for v, node in enumerate(graph.nodes):
        k = followed_operand(program, node)
        if k is None or node.eqn not in propagated.read:
            continue
        vid, read = program.eqns[node.eqn].inputs[k], propagated.read[node.eqn][k]
        made = propagated.made.get(vid) or ((),) * len(program.avals[vid].shape)
        if read is not None and tuple(read) != tuple(made):
            apart.add(v)
    return frozenset(apart)


def preset_propagation(graph: ShardingGraph, layouts: Sequence[Spec],
                       mesh_shape: Sequence[int], pairs: Sequence[tuple[int, int]] = (),
                       factors: ProgramFactors | None = None) -> Propagated:
    """``propagated_layouts`` of the graph's program from the inputs' fixed ``layouts``,
    each carried output of ``pairs`` fixed to its input's layout, the program's sharding
    constraints kept."""
    program = graph.traced.program
    constrained = {node.eqn: node.strategies[0].out_specs[0] for node in graph.nodes
                   if node.kind == "op" and len(node.strategies) == 1
                   and program.eqns[node.eqn].primitive.name in CONSTRAINTS}
    factors = factors or program_factors(program, graph.traced.signatures, graph.per_step_copies)
    return propagated_layouts(program, layouts, {o: layouts[i] for o, i in pairs},
                              constrained, mesh_shape, factors)


def _score(strategy, out: tuple, read: tuple) -> int:
    """3: ``strategy`` reads ``read`` and makes ``out``; 2: it reads ``read`` and makes
    a layout ``out`` slices (XLA's partitioner computes the op as its operands are read,
    then slices the result into its layout: a whole partial sum all-reduced over the
    batch's axis, then sliced into a weight's layout over two axes); 1: it makes
    ``out``; else 0."""
    reads = all(want is None or have == want
                for have, want in zip(strategy.in_specs, read, strict=True))
    if tuple(strategy.out_specs) == out:
        return 1 + 2 * reads
    if reads and all(len(have) == len(want) and all(
            tuple(w[:len(h)]) == tuple(h) for h, w in zip(have, want, strict=True))
            for have, want in zip(strategy.out_specs, out, strict=True)):
        return 2
    return 0
