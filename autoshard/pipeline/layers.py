"""Layer construction: every equation of the forward (loss) program gets a layer index.

*Anchored* equations carry the activations: they depend on both a differentiated input
(a parameter) and a batch input. They are cut into layers either at the user's
``autoshard.mark_layer_boundary`` calls or automatically: in program order, ``num_layers``
contiguous segments with balanced flops (the smallest achievable maximum, plus 10 %
slack) and, among those, the fewest bytes of activations crossing the cuts (Alpa's
``cluster_jaxpr_by_cost`` idea). *Floating* equations (parameter-only or batch-only
work, e.g. ``w.T`` or the targets' slicing) go as late as possible: to the first layer
that reads them. Backward and update equations are not here: each stage is
differentiated on its own, so its backward follows its forward layers.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from autoshard.intra.flops import eqn_flops
from autoshard.ir.custom_rules import body, is_cut_free
from autoshard.ir.program import Program, readers

from .markers import BOUNDARY_PRIMITIVE

_LAYER_STARTS = ("dot_general", "conv_general_dilated")


@dataclasses.dataclass(frozen=True, eq=False)
class Layering:
    """``program`` (boundary markers removed) and the layer of each of its equations."""

    program: Program
    layer_of: tuple[int, ...]
    num_layers: int
    flops: tuple[float, ...]          # per layer
    user_boundaries: bool


def strip_boundaries(program: Program) -> tuple[Program, list[int]]:
    """The program without boundary markers (their outputs renamed to their inputs), and
    per remaining equation the number of markers among its ancestors' path (its level)."""
    alias: dict[int, object] = {}
    level: dict[int, int] = {}
    eqns, levels = [], []

    def read(atom):
        return alias.get(atom, atom) if isinstance(atom, int) else atom

    for eqn in program.eqns:
        ins = tuple(read(a) for a in eqn.inputs)
        lv = max((level.get(a, 0) for a in eqn.inputs if isinstance(a, int)), default=0)
        if eqn.primitive.name == BOUNDARY_PRIMITIVE:
            for vid, src in zip(eqn.outputs, ins):
                alias[vid] = src
                level[vid] = lv + 1
            continue
        eqns.append(dataclasses.replace(eqn, inputs=ins))
        levels.append(lv)
        for vid in eqn.outputs:
            level[vid] = lv
    outvars = tuple(read(a) for a in program.outvars)
    return dataclasses.replace(program, eqns=tuple(eqns), outvars=outvars), levels


def _value_bytes(program: Program, vid: int) -> float:
    aval = program.avals[vid]
    return float(math.prod(aval.shape) * aval.dtype.itemsize)


def depends_on(program: Program, flags_in) -> list[bool]:
    """Per equation: whether it depends on an input whose flag is set."""
    dep = {v: bool(f) for v, f in zip(program.invars, flags_in)}
    out = []
    for eqn in program.eqns:
        d = any(dep.get(a, False) for a in eqn.inputs if isinstance(a, int))
        out.append(d)
        for v in eqn.outputs:
            dep[v] = d
    return out


def _balanced_cuts(flops: list[float], cut_bytes: list[float], num_layers: int,
                   starts_layer=None, may_cut=None) -> list[int]:
    """Segment start indices: ``num_layers`` contiguous non-empty segments of ``flops``
    with the least cut bytes among those whose max segment flops is within 10 % of optimal.
    ``cut_bytes[p]``: bytes live across a cut before item ``p``; among equal bytes a cut
    before an item with ``starts_layer[p]`` (a matmul or convolution) is preferred; no cut
    before an item ``p`` whose ``may_cut[p]`` is false (``num_layers`` must leave enough
    places to cut)."""
    n = len(flops)
    allowed = [True] * (n + 1) if may_cut is None else [True, *may_cut[1:], True]
    prefix = np.concatenate([[0.0], np.cumsum(flops)])
    seg = lambda i, j: prefix[j] - prefix[i]  # noqa: E731 - flops of items i..j-1

    def min_max():
        inf = math.inf
        best = [[inf] * (n + 1) for _ in range(num_layers + 1)]
        best[0][0] = 0.0
        for k in range(1, num_layers + 1):
            for j in range(k, n + 1):
                if allowed[j]:
                    best[k][j] = min((max(best[k - 1][i], seg(i, j)) for i in range(k - 1, j)
                                      if allowed[i]), default=inf)
        return best[num_layers][n]

    limit = min_max() * 1.1 + 1e-9
    inf = math.inf
    cost = [[inf] * (n + 1) for _ in range(num_layers + 1)]
    back = [[0] * (n + 1) for _ in range(num_layers + 1)]
    cost[0][0] = 0.0
    for k in range(1, num_layers + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                if cost[k - 1][i] == inf or seg(i, j) > limit or not allowed[i]:
                    continue
                c = cost[k - 1][i] + (cut_bytes[i] if i > 0 else 0.0)
                if i > 0 and starts_layer is not None and not starts_layer[i]:
                    c += 0.5  # less than any real difference in bytes
                if c < cost[k][j] - 1e-9:
                    cost[k][j], back[k][j] = c, i
    starts, j = [], n
    for k in range(num_layers, 0, -1):
        i = back[k][j]
        starts.append(i)
        j = i
    return starts[::-1]


def _cuts_outside_custom_rules(eqns, items: list[int]) -> list[bool]:
    """Per item (an equation index, in order): whether a layer may start at it, not
    between two equations of one custom gradient's or cond's body (``ir.custom_rules``: the
    equations inlined before the rule equation, and the rule equation itself). A
    ``jax.checkpoint`` body may be cut: each stage's part is then differentiated as it is."""
    region: dict[int, int] = {}
    for m, eqn in enumerate(eqns):   # an enclosing rule's equation comes later: it wins
        if is_cut_free(eqn):
            for e in [*body(eqns, m), m]:
                region[e] = m
    return [p == 0 or region.get(e) is None or region.get(e) != region.get(items[p - 1])
            for p, e in enumerate(items)]


def assign_layers(program: Program, diff_flags, batch_flags, num_layers: int | None,
                  forward_only: bool = False) -> Layering:
    """Layer of every equation of the forward ``program`` (see the module doc).

    ``num_layers`` is used when the program has no boundary markers (``None`` = 8, capped
    at the number of anchored equations); with markers it must be ``None`` or agree.
    ``diff_flags``: the inputs the layers are anchored on (the differentiated ones; for a
    step without a gradient, ``forward_only``, its parameters).
    """
    stripped, levels = strip_boundaries(program)
    has_markers = len(stripped.eqns) != len(program.eqns)
    eqns = stripped.eqns
    on_params = depends_on(stripped, diff_flags)
    if any(batch_flags):
        on_batch = depends_on(stripped, batch_flags)
        anchored = [p and b for p, b in zip(on_params, on_batch)]
    else:
        anchored = on_params
    anchored_idx = [e for e, a in enumerate(anchored) if a]
    flops = [eqn_flops(stripped, eqn) for eqn in eqns]
    layer = [None] * len(eqns)
    if not anchored_idx and forward_only:
        raise ValueError(
            "the step takes no gradient, so it would run forward only, and none of its work "
            "reads both the batch and the arrays outside it (the parameters): nothing to "
            "pipeline. A training step takes its gradient with jax.value_and_grad or jax.grad "
            "(however imported) or autoshard.value_and_grad / autoshard.grad: one taken with "
            "jax.vjp, jax.jacrev or a custom rule outside such a call is not seen")
    if not anchored_idx:
        raise ValueError("the loss does not depend on the differentiated arguments: nothing "
                         "to pipeline")
    if has_markers:
        count = max(levels[e] for e in anchored_idx) + 1
        if num_layers is not None and num_layers != count:
            raise ValueError(f"num_layers={num_layers} but the loss marks {count} layers with "
                             f"autoshard.mark_layer_boundary: leave num_layers out, or "
                             f"change the boundaries")
        for e in anchored_idx:
            layer[e] = levels[e]
        num_layers = count
    else:
        want = 8 if num_layers is None else int(num_layers)
        if want < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        heavy = anchored_idx
        # a custom rule's inlined body and its rule equation stay in one layer: its
        # stage rebinds the user's call (ir.custom_rules)
        may_cut = _cuts_outside_custom_rules(eqns, heavy)
        num_layers = min(want, sum(may_cut[1:]) + 1)
        pos = {e: p for p, e in enumerate(heavy)}
        # bytes live across a cut before anchored item p: values made by anchored items < p
        # and read by anchored items >= p (or returned)
        diff = np.zeros(len(heavy) + 1)
        users = readers(stripped)
        outs = {a for a in stripped.outvars if isinstance(a, int)}
        for e in heavy:
            for v in eqns[e].outputs:
                last = max((pos[u] for u in users.get(v, []) if u in pos), default=pos[e])
                if v in outs:
                    last = len(heavy) - 1
                if last > pos[e]:  # live across the cuts before items pos[e]+1 .. last
                    diff[pos[e] + 1] += _value_bytes(stripped, v)
                    diff[last + 1] -= _value_bytes(stripped, v)
        cut_bytes = list(np.cumsum(diff))
        starts = _balanced_cuts([flops[e] for e in heavy], cut_bytes, num_layers,
                                [eqns[e].primitive.name in _LAYER_STARTS for e in heavy],
                                may_cut)
        bounds = starts[1:] + [len(heavy)]
        k = 0
        for p, e in enumerate(heavy):
            while p >= bounds[k]:
                k += 1
            layer[e] = k
    # floating equations: as late as possible (first layer that reads them)
    users = readers(stripped)
    outs = {a for a in stripped.outvars if isinstance(a, int)}
    for e in range(len(eqns) - 1, -1, -1):
        if layer[e] is not None:
            continue
        lv = num_layers - 1
        for v in eqns[e].outputs:
            for u in users.get(v, []):
                lv = min(lv, layer[u])
        layer[e] = lv
    per_layer = [0.0] * num_layers
    for e, lv in enumerate(layer):
        per_layer[lv] += flops[e]
    return Layering(stripped, tuple(layer), num_layers, tuple(per_layer), has_markers)
