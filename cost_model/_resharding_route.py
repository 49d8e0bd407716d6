"""Which collectives turn a ``src`` layout into ``dst``, decided from the mesh shape and
the two specs alone: a ``Route`` names each collective and the per-device layout whose
shard it moves, and the copies' memory traffic as shards of named layouts. It holds no
sizes, so one route serves every tensor (``_mesh_cost`` prices it for a shape and an
itemsize); the rules are ``MeshCostModel.resharding``'s docstring.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

Spec = tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class RouteStep:
    """One collective: ``kind`` over mesh ``axes``, moving the shard of ``layout``."""

    kind: str
    axes: tuple[int, ...]
    layout: Spec


@dataclasses.dataclass(frozen=True)
class RouteTraffic:
    """``factor`` × (bytes of one ``layout`` shard // ``divisor``), counted only when
    ``before_dim`` is None or the shard has more than one element in the dims before
    ``before_dim`` (a gathered dim that is not the outermost is relayouted), and, for
    ``sliced_all_to_all`` terms, only on a backend that sends an all-to-all as slices
    (``Cluster.all_to_all_as_slices``)."""

    factor: int
    layout: Spec
    divisor: int = 1
    before_dim: int | None = None
    sliced_all_to_all: bool = False


@dataclasses.dataclass(frozen=True)
class Route:
    """The collectives of a resharding in order (none that moves nothing) and the bytes
    per device its copies read and write, as terms over shards. ``waypoints``: the
    layouts it passes through on the way, in order (neither ``src`` nor ``dst``), each
    reached from the one before by one priced move (a local slice, a collective, or an
    all-to-all with the collective-permute that orders its blocks); a program that pins
    an operand to each in turn makes XLA take this route, not one of its own."""

    steps: tuple[RouteStep, ...]
    traffic: tuple[RouteTraffic, ...]
    waypoints: tuple[Spec, ...] = ()


def split(mesh_shape: tuple[int, ...], axes) -> int:
    """Devices spanned by ``axes`` (the parts a dim split over them has)."""
    return math.prod(mesh_shape[a] for a in axes)


@functools.lru_cache(maxsize=1 << 17)
def resharding_route(mesh_shape: tuple[int, ...], src: Spec, dst: Spec) -> Route:
    """The ``Route`` from ``src`` to ``dst`` on a mesh of ``mesh_shape`` (specs checked
    and normalised by the caller)."""
    if src == dst:
        return Route((), ())
    ndim = len(src)
    kept = []
    for d in range(ndim):
        k = 0
        while k < min(len(src[d]), len(dst[d])) and src[d][k] == dst[d][k]:
            k += 1
        kept.append(k)
    src_dim = {a: d for d in range(ndim) for a in src[d]}
    dst_dim = {a: d for d in range(ndim) for a in dst[d]}
    layout = [list(axes) for axes in src]
    now = lambda: tuple(tuple(axes) for axes in layout)  # noqa: E731
    moves = lambda axes: any(mesh_shape[a] > 1 for a in axes)  # noqa: E731
    live = lambda spec: sorted(a for axes in spec for a in axes if mesh_shape[a] > 1)  # noqa: E731
    steps: list[RouteStep] = []
    traffic: list[RouteTraffic] = []

    # 0. A permutation of the devices' blocks (see ``MeshCostModel.resharding``).
    if _permutes_blocks(mesh_shape, src, dst):
        return Route((RouteStep("collective-permute", permute_axes(mesh_shape, src, dst), src),),
                     (RouteTraffic(2, src),))

    # 0b. dst splits every dim at least as finely as src (by a multiple), but not by
    #    keeping src's axes in front: every device's dst block lies inside one other
    #    device's src block, which slices it and sends it over in one collective-permute.
    if _refines_elsewhere(mesh_shape, src, dst):
        return Route((RouteStep("collective-permute", permute_axes(mesh_shape, src, dst), dst),),
                     (RouteTraffic(4, dst),))

    # 0c. An exchange XLA cannot run as one all-to-all: its two legs, pinned between them.
    mid = _exchange_waypoint(mesh_shape, src, dst)
    if mid is not None:
        first, second = resharding_route(mesh_shape, src, mid), resharding_route(mesh_shape, mid, dst)
        return Route(first.steps + second.steps, first.traffic + second.traffic,
                     first.waypoints + (mid,) + second.waypoints)

    # 1. Local slicing of axes only dst uses: reads and writes the part it keeps.
    sliced = [a for d in range(ndim) for a in dst[d][kept[d]:] if a not in src_dim]
    for d in range(ndim):
        layout[d].extend(a for a in dst[d][kept[d]:] if a not in src_dim)
    passed: list[Spec] = []   # the layout after each move (see Route.waypoints)
    if moves(sliced):
        traffic.append(RouteTraffic(2, now()))
        passed.append(now())

    # 2. Axes that leave their place in src but stay in dst. The axes moving from one dim
    #    to one other dim move in one all-to-all over them (operand and result, and the
    #    local transposes around it). When one dim's axes go to several dims, or several
    #    dims' axes to one, XLA cannot: it gathers the moved axes (one all-gather per dim
    #    they leave), then slices (its "involuntary full rematerialization").
    moved: dict[tuple[int, int], list[int]] = {}
    for d in range(ndim):
        for a in src[d][kept[d]:]:
            if a in dst_dim:
                moved.setdefault((d, dst_dim[a]), []).append(a)
    sources = [d for d, _ in moved]
    targets = [e for _, e in moved]
    many = len(set(sources)) < len(sources) or len(set(targets)) < len(targets)
    relayout = live(src) == live(dst)   # nothing sliced, nothing gathered
    split_src = {d for d in range(ndim) if moves(src[d])}
    split_dst = {d for d in range(ndim) if moves(dst[d])}
    exchange = _exchange_group(mesh_shape, src, dst) if relayout else None
    if relayout and (many or len(moved) > 1) and \
            (split_src <= split_dst or split_dst <= split_src or exchange is not None):
        # An exchange among the split dims (a swap; two dims' axes into one of them; one
        # dim's axes into it and another; on equal axes, a rotation over three dims): XLA
        # runs one all-to-all (over the devices that hold one dst block between them,
        # ``_exchange_group``; else over the axes that change dim), then one
        # collective-permute putting the blocks in dst's order.
        axes = exchange or \
            tuple(sorted(a for (d, e), group in moved.items() if d != e for a in group))
        here = now()
        order = tuple(live(src)) if exchange is None else \
            permute_axes(mesh_shape, _exchanged(mesh_shape, src, dst, exchange), dst)
        steps.append(RouteStep("all-to-all", axes, here))
        # (a backend slicing the operand per peer reads it once per slice: the all-to-all
        # runs among as many devices as the dim whose parts fall loses)
        peers = max(split(mesh_shape, src[d]) // split(mesh_shape, dst[d]) for d in range(ndim))
        traffic += [RouteTraffic(4, here), RouteTraffic(peers - 1, here, sliced_all_to_all=True)]
        if order:
            # the blocks are put together before the permute sends them (a kernel of its
            # own, written and read back), then sent
            steps.append(RouteStep("collective-permute", order, here))
            traffic.append(RouteTraffic(4, here))
        layout = [list(axes) for axes in dst]
    elif many:
        # one all-gather per dim the moved axes leave, the last dim first (measured on jax
        # 0.10, 2x2x2: P(None, "a", "b") to P(("b", "a")) gathers "b", then "a"), pinned
        # gathered (else XLA moves the axes its own way), then a slice in dst's order
        # behind the axes already there
        for d in sorted({d for d, _ in moved}, reverse=True):
            group = [a for (source, _), axes in moved.items() if source == d for a in axes]
            staying = [a for a in layout[d] if a not in group and mesh_shape[a] > 1]
            if moves(group) and any(layout[d].index(a) < layout[d].index(b)
                                    for a in group if mesh_shape[a] > 1 for b in staying):
                # gathered from in front of an axis that stays: XLA first moves them behind
                # it with a collective-permute, as for a dropped axis (step 3)
                here = now()
                layout[d] = [a for a in layout[d] if a not in group] + \
                    [a for a in layout[d] if a in group]
                steps.append(RouteStep("collective-permute",
                                       permute_axes(mesh_shape, here, now()), here))
                traffic.append(RouteTraffic(2, here))
                passed.append(now())
            for a in group:
                layout[d].remove(a)
            if moves(group):
                here = now()
                steps.append(RouteStep("all-gather", tuple(sorted(
                    a for a in group if mesh_shape[a] > 1)), here))
                traffic += [RouteTraffic(1, here, split(mesh_shape, group)), RouteTraffic(1, here)]
                passed.append(here)
        for e in sorted({e for _, e in moved}):
            layout[e].extend(sorted((a for (_, target), group in moved.items() if target == e
                                     for a in group), key=dst[e].index))
        if moves(a for group in moved.values() for a in group):
            traffic.append(RouteTraffic(2, now()))  # the slice into dst's layout
            passed.append(now())
    else:
        for (d, e), group in moved.items():
            if d == e:  # stays in its dim: an axis in front of it leaves (step 3 orders it)
                continue
            here = now()
            staying = [a for a in layout[d] if a not in group and mesh_shape[a] > 1]
            behind = any(layout[d].index(a) > layout[d].index(b) for a in staying for b in group)
            for a in group:
                layout[d].remove(a)
            layout[e].extend(group)
            if not moves(group):
                continue
            after = now()
            # an axis that leaves from in front of one that stays: XLA's all-to-all runs
            # over the dim's minor-most axes (``_exchange_group``), then a permute orders
            # the blocks (over every axis where that group is no set of whole axes)
            exchange = _exchange_group(mesh_shape, here, after) if behind else None
            steps.append(RouteStep("all-to-all", exchange or tuple(sorted(group)), here))
            # (a backend slicing the operand per peer reads it once per slice)
            traffic += [RouteTraffic(4, here),
                        RouteTraffic(split(mesh_shape, group) - 1, here, sliced_all_to_all=True)]
            reorder = () if not behind else tuple(live(here)) if exchange is None else \
                permute_axes(mesh_shape, _exchanged(mesh_shape, here, after, exchange), after)
            if reorder:
                steps.append(RouteStep("collective-permute", reorder, here))
                traffic.append(RouteTraffic(2, here))
            passed.append(after)
    # 3. All-gather for axes dst drops: one all-gather per dim over every axis it drops,
    #    the dim of the last mesh axis first (operand and result; a dim that is not the
    #    outermost with more than one element per device is gathered as the major dim and
    #    then relayouted: read and written once more). Measured on jax 0.10: P(("a", "b"))
    #    to P() on 2x4 is one all-gather over all 8 devices, P(("a", "b", "c")) to P("a")
    #    on 2x2x2 one over "b" and "c"; P("a", "b") to P() one per dim, "b" first. An axis
    #    in front of a split that stays (dropping "model" from a dim split over ("model",
    #    "data")) would gather blocks that are not contiguous: XLA first moves it behind
    #    that split with a collective-permute (measured on jax 0.10: [256, 256] from
    #    P(("model", "data")) to P("data") on 2x4 is a collective-permute of the [32, 256]
    #    shard, then an all-gather over "model").
    dropped = sorted((a for d in range(ndim) for a in src[d][kept[d]:] if a not in dst_dim), reverse=True)
    groups: dict[int, list[int]] = {}   # dim -> the axes it drops; dims in order of their last axis
    for a in dropped:
        groups.setdefault(src_dim[a], []).append(a)
    for d, group in groups.items():
        staying = [b for b in layout[d] if b not in group]
        if any(layout[d].index(a) < layout[d].index(b) for a in group if mesh_shape[a] > 1
               for b in staying if mesh_shape[b] > 1):
            here = now()   # (one permute puts every dropped axis behind those that stay)
            layout[d] = staying + [a for a in layout[d] if a in group]
            steps.append(RouteStep("collective-permute", permute_axes(mesh_shape, here, now()),
                                   here))
            traffic.append(RouteTraffic(2, here))
            passed.append(now())
        for a in group:
            layout[d].remove(a)
        if not moves(group):
            continue
        here = now()
        steps.append(RouteStep("all-gather", tuple(sorted(a for a in group if mesh_shape[a] > 1)),
                               here))
        traffic += [RouteTraffic(1, here, split(mesh_shape, group)), RouteTraffic(1, here),
                    RouteTraffic(2, here, before_dim=d)]
        passed.append(here)
    here, there = live_axes(mesh_shape, now()), live_axes(mesh_shape, dst)
    if here != there and [sorted(axes) for axes in here] == [sorted(axes) for axes in there]:
        # 4. The axes left in another order than dst's (one dim's axes moved to another
        #    dim, reversed; moved or sliced behind an axis src keeps in front; an axis
        #    dropped from between them): XLA puts the blocks in order with one
        #    collective-permute, after the all-gathers (measured on jax 0.10, 2x2x2:
        #    P(("b", "a"), None, "c") to P(("a", "b")) gathers "c", then permutes over a, b)
        steps.append(RouteStep("collective-permute", permute_axes(mesh_shape, now(), dst), now()))
        traffic.append(RouteTraffic(2, now()))
    return Route(tuple(steps), tuple(traffic), _waypoints(mesh_shape, src, dst, passed))


@functools.lru_cache(maxsize=1 << 14)
def permute_axes(mesh_shape: tuple[int, ...], src: Spec, dst: Spec) -> tuple[int, ...]:
    """The mesh axes along which XLA's one collective-permute from ``src`` to ``dst``
    (``dst`` splitting every dim into a multiple of ``src``'s parts) sends blocks: those
    on which some device's coordinate differs from its sender's.

    Each device's dst block lies in one src block, at position ``r`` (row-major over the
    dims, in dst blocks); XLA takes it from the holder of that src block whose replica
    index (over the mesh axes src leaves unsplit, major first) is ``r * Q/R + t mod Q/R``:
    ``R`` positions, ``Q`` replicas, ``t`` the receiver's own replica index over the axes
    dst leaves unsplit. Compiled with jax 0.10.2, every such pair of rank-3 layouts on
    2x2x2 (1,362) and on 2x4 and 4x2 runs its permute over exactly these axes (priced
    over the axes that move, or those of either layout, before: 636 of 1,362 differed)."""
    live_src, live_dst = live_axes(mesh_shape, src), live_axes(mesh_shape, dst)
    coords = np.indices(mesh_shape).reshape(len(mesh_shape), -1).T
    sender = np.zeros_like(coords)

    def index(axes):  # each device's block (or replica) index over ``axes``, major first
        out = np.zeros(len(coords), dtype=np.int64)
        for a in axes:
            out = out * mesh_shape[a] + coords[:, a]
        return out

    def place(value, axes):  # the sender's coordinates on ``axes`` from its index over them
        for a in reversed(axes):
            sender[:, a] = value % mesh_shape[a]
            value = value // mesh_shape[a]

    position = np.zeros(len(coords), dtype=np.int64)
    positions = 1
    for s, d in zip(live_src, live_dst):
        factor = split(mesh_shape, d) // split(mesh_shape, s)
        block = index(d)
        place(block // factor, s)
        position = position * factor + block % factor
        positions *= factor
    unsplit = lambda live: [a for a, n in enumerate(mesh_shape)  # noqa: E731
                            if n > 1 and all(a not in axes for axes in live)]
    replicas = unsplit(live_src)
    spare = split(mesh_shape, replicas) // positions
    place(position * spare + index(unsplit(live_dst)) % spare, replicas)
    return tuple(int(a) for a in np.flatnonzero((sender != coords).any(axis=0)))


def _parts(mesh_shape: tuple[int, ...], live: Spec) -> list[int]:
    """The parts each dim of a layout (its live axes) is split into."""
    return [split(mesh_shape, axes) for axes in live]


def _falls_and_rises(parts_src: list[int], parts_dst: list[int]) -> tuple[list[int], list[int]]:
    """(the dims split into fewer parts in dst than in src, those split into more)."""
    return ([i for i, (a, b) in enumerate(zip(parts_src, parts_dst)) if a > b],
            [i for i, (a, b) in enumerate(zip(parts_src, parts_dst)) if a < b])


def _exchange_group(mesh_shape: tuple[int, ...], src: Spec, dst: Spec) -> tuple[int, ...] | None:
    """The mesh axes of the all-to-all XLA runs for an exchange, when they are whole axes.

    XLA compares the parts each dim is split into: when one dim's fall by a factor m and
    one other's rise by m, its all-to-all runs among the m devices that differ in the
    minor-most factor m of their block's index along the falling dim (then a
    collective-permute orders the blocks). Those are whole mesh axes when the falling
    dim's minor-most axes in ``src`` multiply to exactly m: returned, sorted; else None
    (on 2x4, the swap ``P("a", "b")`` to ``P("b", "a")`` runs among 2 devices of "b": a
    group no set of whole axes names). E.g. ``P(None, ("a", "b"))`` to ``P("a", "b")``
    on 8x8 is an all-to-all over "b", the axis that stays, then a collective-permute.
    Compiled with jax 0.10.2, every way of moving two mesh axes among three dims (96
    src -> dst pairs per mesh) runs the collectives priced, kinds and axes, on 2x2 and
    8x8 meshes (60 of 96 before this rule)."""
    s, d = live_axes(mesh_shape, src), live_axes(mesh_shape, dst)
    parts_src, parts_dst = _parts(mesh_shape, s), _parts(mesh_shape, d)
    falls, rises = _falls_and_rises(parts_src, parts_dst)
    if len(falls) != 1 or len(rises) != 1:
        return None
    i, j = falls[0], rises[0]
    if parts_src[i] % parts_dst[i] or parts_dst[j] % parts_src[j]:
        return None
    factor = parts_src[i] // parts_dst[i]
    if parts_dst[j] // parts_src[j] != factor:
        return None
    group, size = [], 1
    for a in reversed(s[i]):
        if size >= factor:
            break
        group.append(a)
        size *= mesh_shape[a]
    return tuple(sorted(group)) if size == factor else None


def _exchange_waypoint(mesh_shape: tuple[int, ...], src: Spec, dst: Spec) -> Spec | None:
    """The layout halfway through an exchange (the same mesh axes in both layouts) that XLA
    does not run as one all-to-all: two dims' parts fall and a dim already split rises, or
    both falling dims stay split (and the mirror: one dim's parts fall but stay split, or
    two dims already split rise). XLA replicates the first kind and slices (its
    "involuntary full rematerialization") and runs the rotations as two all-to-alls.
    Compiled with jax 0.10.2: on 2x2x2 every such rank-3 resharding (216: three dims split
    by one axis each to all three on one dim, or back) gathers all three axes; on 2x2x4,
    4x2x2 and 2x4x2, three dims' rotations run two all-to-alls and (4, 2, 2) parts to
    (1, 4, 4) gathers. With this layout pinned between them each half is an exchange of one
    falling and one rising dim, which compiles to the all-to-all (and permute) priced for
    it. The halfway layout moves the axes one dim sends to another (the first such pair,
    by source dim, whose move alone is such an exchange), appended in dst's order; None for
    any other resharding."""
    s, d = live_axes(mesh_shape, src), live_axes(mesh_shape, dst)
    if sorted(a for axes in s for a in axes) != sorted(a for axes in d for a in axes):
        return None
    falls, rises = _falls_and_rises(_parts(mesh_shape, s), _parts(mesh_shape, d))
    if not ((len(falls) >= 2 and len(rises) == 1
             and (s[rises[0]] or all(d[i] for i in falls)))
            or (len(rises) >= 2 and len(falls) == 1
                and (d[falls[0]] or all(s[i] for i in rises)))):
        return None
    for source in range(len(s)):
        for target in range(len(s)):
            if source == target:
                continue
            moving = sorted((a for a in s[source] if a in d[target]), key=d[target].index)
            if not moving:
                continue
            mid = tuple(tuple(a for a in axes if a not in moving)
                        + (tuple(moving) if k == target else ()) for k, axes in enumerate(s))
            falls, rises = _falls_and_rises(_parts(mesh_shape, s), _parts(mesh_shape, mid))
            if len(falls) == 1 and len(rises) == 1:
                return mid
    return None


def _exchanged(mesh_shape: tuple[int, ...], src: Spec, dst: Spec, group: tuple[int, ...]
               ) -> Spec:
    """The layout XLA's all-to-all over ``group`` (``_exchange_group``) leaves: those axes
    taken from the dim whose parts fall and put, in their order in ``src``, behind the axes
    of the dim whose parts rise. Its collective-permute then runs from there to ``dst``
    (compiled with jax 0.10.2 on 2x2x2, the permute's axes are those ``permute_axes``
    finds from this layout)."""
    s, d = live_axes(mesh_shape, src), live_axes(mesh_shape, dst)
    rise = _falls_and_rises(_parts(mesh_shape, s), _parts(mesh_shape, d))[1][0]
    moved = tuple(a for axes in s for a in axes if a in group)
    return tuple(tuple(a for a in axes if a not in group) + (moved if k == rise else ())
                 for k, axes in enumerate(s))


def _waypoints(mesh_shape: tuple[int, ...], src: Spec, dst: Spec, passed) -> tuple[Spec, ...]:
    """``passed`` without the layouts that split the devices as ``src``, ``dst`` or the
    waypoint before does (mesh axes of size 1 apart)."""
    kept, last = [], live_axes(mesh_shape, src)
    for layout in passed:
        here = live_axes(mesh_shape, layout)
        if here != last and here != live_axes(mesh_shape, dst):
            kept.append(layout)
            last = here
    return tuple(kept)


@functools.lru_cache(maxsize=1 << 16)
def live_axes(mesh_shape: tuple[int, ...], spec: Spec) -> tuple[tuple[int, ...], ...]:
    """Per dim, the mesh axes of ``spec`` that split it (size > 1), in order (memoised:
    a matrix's routes ask for each layout's many times)."""
    return tuple(tuple(a for a in axes if mesh_shape[a] > 1) for axes in spec)


def _refines_elsewhere(mesh_shape: tuple[int, ...], src: Spec, dst: Spec) -> bool:
    """Whether ``dst`` splits every dim of a ``src`` tensor into a multiple of src's
    parts, without keeping src's axes of that dim as its leading ones everywhere: each
    device's dst block is then part of one other device's src block."""
    s, d = live_axes(mesh_shape, src), live_axes(mesh_shape, dst)
    return (all(split(mesh_shape, b) % split(mesh_shape, a) == 0 for a, b in zip(s, d))
            and any(b[:len(a)] != a for a, b in zip(s, d)))


def _permutes_blocks(mesh_shape: tuple[int, ...], src: Spec, dst: Spec) -> bool:
    """Whether ``dst`` lays every device's block of a ``src`` tensor whole on one other
    device: the same mesh axes (of size > 1) split every dim by the same factor, and
    some of them sit elsewhere."""
    live, moved = live_axes(mesh_shape, src), live_axes(mesh_shape, dst)
    return (live != moved
            and sorted(a for axes in live for a in axes) == sorted(a for axes in moved for a in axes)
            and all(split(mesh_shape, s) == split(mesh_shape, d) for s, d in zip(live, moved)))
