"""Costs on one device mesh: collectives (α–β ring model), compute (roofline),
per-device memory of sharded tensors, and resharding between specs.

A spec (``Spec``) has one entry per tensor dim listing the mesh-axis indices that split
that dim, major to minor; ``()`` leaves the dim whole. A mesh axis appears at most once
per spec. All times are seconds, all sizes bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ._cluster import Cluster, Link
from ._resharding_route import Route, resharding_route

Spec = tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class CollectiveStep:
    """One collective a plan runs: ``kind`` (one of ``COLLECTIVES``, or
    ``"collective-permute"``) over mesh ``axes``, ``nbytes`` its result per device
    (all-reduce, all-gather, all-to-all, collective-permute: the output; reduce-scatter:
    the scattered output), ``seconds`` its price."""

    kind: str
    axes: tuple[int, ...]
    nbytes: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class MeshCostModel:
    """Prices work on a mesh of shape ``mesh_shape`` built from ``cluster``'s devices."""

    cluster: Cluster
    mesh_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        mesh_shape = tuple(int(size) for size in self.mesh_shape)
        if any(size < 1 for size in mesh_shape):
            raise ValueError(f"mesh_shape sizes must be ≥ 1, got {self.mesh_shape!r}")
        object.__setattr__(self, "mesh_shape", mesh_shape)
        # (axes, collective) -> _group's answer; axes -> devices they span. Not fields:
        # pure functions of the fields, kept because resharding matrices ask millions of times
        object.__setattr__(self, "_groups", {})
        object.__setattr__(self, "_splits", {})
        object.__setattr__(self, "_checked", {})  # (shape, spec) -> both checked, normalised
        object.__setattr__(self, "_shards", {})  # (shape, spec) -> per-device shape
        object.__setattr__(self, "_kernels", dict(self.cluster.kernel_seconds))

    # ------------------------------------------------------------------ topology

    @property
    def links(self) -> tuple[Link, ...]:
        """One Link per mesh axis (``cluster.links_for_mesh(mesh_shape)``)."""
        return self.cluster.links_for_mesh(self.mesh_shape)

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape)

    # ------------------------------------------------------------------ collectives
    # Ring algorithms over the n devices spanned by ``axes``; α is the slowest axis'
    # latency and β the smallest axis bandwidth (axes of size 1 carry no traffic and are
    # ignored). nbytes conventions follow the brief in each docstring. Every collective
    # also pays one α of launch overhead, so two collectives never price the same as
    # one that does their joint job (reduce-scatter + all-gather vs all-reduce).

    def all_reduce(self, nbytes: float, axes: Sequence[int]) -> float:
        """All-reduce of a buffer of ``nbytes`` held by every device:
        (2(n−1) + 1)·α + 2(n−1)/n·nbytes/β (ring reduce-scatter then all-gather)."""
        n, bandwidth, latency = self._group(axes, "all-reduce")
        if n == 1:
            return 0.0
        return (2 * (n - 1) + 1) * latency + 2 * (n - 1) / n * _check_nbytes(nbytes) / bandwidth

    def all_reduce_latency(self, axes: Sequence[int]) -> float:
        """The latency part of ``all_reduce`` over ``axes``: (2(n−1) + 1)·α seconds."""
        n, _, latency = self._group(axes, "all-reduce")
        return 0.0 if n == 1 else (2 * (n - 1) + 1) * latency

    def all_gather(self, nbytes: float, axes: Sequence[int]) -> float:
        """All-gather producing ``nbytes`` (the gathered output) on every device:
        n·α + (n−1)/n·nbytes/β."""
        return self._one_pass(nbytes, axes, "all-gather")

    def reduce_scatter(self, nbytes: float, axes: Sequence[int]) -> float:
        """Reduce-scatter of an ``nbytes`` input buffer on every device:
        n·α + (n−1)/n·nbytes/β; ``all_reduce(nbytes, axes)`` when the cluster's backend
        lowers it to an all-reduce plus a local slice (``reduce_scatter_as_all_reduce``)."""
        if self.cluster.reduce_scatter_as_all_reduce:
            return self.all_reduce(nbytes, axes)
        return self._one_pass(nbytes, axes, "reduce-scatter")

    def all_to_all(self, nbytes: float, axes: Sequence[int]) -> float:
        """All-to-all of an ``nbytes`` buffer on every device: n·α + (n−1)/n·nbytes/β.

        Each device keeps 1/n of its buffer and sends the rest as n−1 messages; we price
        it like one ring pass (same volume as an all-gather), which is what pairwise
        exchange costs on a full-bisection network.
        """
        return self._one_pass(nbytes, axes, "all-to-all")

    def collective_permute(self, nbytes: float, axes: Sequence[int]) -> float:
        """Every device sends its ``nbytes`` buffer whole to one other device of the group
        spanned by ``axes`` (a permutation of the devices): α + nbytes/β."""
        n, bandwidth, latency = self._group(axes, "collective-permute")
        if n == 1:
            return 0.0
        return latency + _check_nbytes(nbytes) / bandwidth

    # ------------------------------------------------------------------ compute

    def compute(self, flops: float, bytes_accessed: float, dtype: str) -> float:
        """Seconds of arithmetic plus memory traffic, not overlapped:
        flops / flops_rate(dtype) + bytes_accessed / memory_bandwidth. (Summed over a
        program this is what its compiled ``cost_analysis`` gives at the same rates.)"""
        return (float(flops) / self.cluster.flops_rate(dtype)
                + float(bytes_accessed) / self.cluster.memory_bandwidth)

    def kernel_seconds(self, key: str) -> float | None:
        """The measured seconds of kernel ``key`` (``kernel_key``) in the cluster's
        ``kernel_seconds``, or ``None`` when it was not measured."""
        return self._kernels.get(key)

    # ------------------------------------------------------------------ memory

    def shard_shape(self, shape: Sequence[int], spec: Spec) -> tuple[int, ...]:
        """Per-device shape of a ``shape`` tensor laid out as ``spec`` (ceil division);
        worked out once per (shape, spec) given as tuples (a deep model asks again for every
        repeated layer)."""
        try:
            return self._shards[(shape, spec)]
        except (KeyError, TypeError):  # TypeError: lists, not tuples
            pass
        checked_shape, checked_spec = self._check_spec(shape, spec)
        local = tuple(-(-size // self._split(axes)) for size, axes in zip(checked_shape, checked_spec))
        if isinstance(shape, tuple) and isinstance(spec, tuple):
            self._shards[(shape, spec)] = local
        return local

    def bytes_per_device(self, shape: Sequence[int], itemsize: int, spec: Spec) -> int:
        """Bytes one device holds of a ``shape`` tensor of ``itemsize``-byte elements."""
        return int(itemsize) * math.prod(self.shard_shape(shape, spec))

    def is_valid_spec(self, shape: Sequence[int], spec: Spec) -> bool:
        """True iff ``spec`` has one entry per dim, valid mesh axes, no axis twice, and
        every split dim is divisible by the product of its axes' sizes."""
        try:
            shape, spec = self._check_spec(shape, spec)
        except (ValueError, TypeError):
            return False
        return all(size % self._split(axes) == 0 for size, axes in zip(shape, spec))

    # ------------------------------------------------------------------ resharding

    def resharding(self, shape: Sequence[int], itemsize: int, src: Spec, dst: Spec) -> float:
        """Time to turn a tensor laid out as ``src`` into ``dst``.

        When ``dst`` splits every dim as much as ``src`` with the same mesh axes, only in
        another order or between other dims (a data/model swap on a square mesh), every
        device's block goes whole to one other device: one collective-permute over the
        axes along which its sends run (``permute_axes``), its operand and result read and
        written once (as XLA compiles it). So too when ``dst`` splits every dim into a
        multiple of src's parts, but not behind src's own axes: each device's dst block
        lies inside one other device's src block (a slice there, then one
        collective-permute). Otherwise, per dim, the longest common prefix of ``src[d]``
        and ``dst[d]`` stays put. Then:
        1. axes that ``dst`` adds and ``src`` does not use are sliced locally (free), first,
           so later collectives move less data;
        2. each axis that leaves its place in ``src`` but is used by ``dst`` (moved to
           another dim, or reordered within one) costs an all-to-all over that axis on
           the current per-device buffer (its operand read once more per peer on a
           backend that sends it as slices: ``Cluster.all_to_all_as_slices``); when
           every axis stays in use and they are exchanged among the split dims (a swap
           of unequal axes; two split dims' axes into one of them), one all-to-all and
           one collective-permute of the shard, as XLA compiles it (the shard read once
           per peer on a slicing backend, and the blocks put together by a kernel of
           their own before the permute; a
           collective-permute also follows axes that arrive in another order than
           ``dst``'s, and an axis that leaves a dim from in front of one that stays, whose
           all-to-all runs over the dim's minor-most axes); axes of one dim going to
           several, or of several dims going to one, are all-gathered (one all-gather per
           dim they leave, the last dim first, moved first behind any axis that stays in
           front of them by a collective-permute) and sliced; an exchange XLA does not
           run as one all-to-all (two dims' parts fall while a split dim's rise, or both
           falling dims stay split; and the mirror cases) runs as two exchanges, pinned
           halfway;
        3. the axes ``src`` uses and ``dst`` does not cost one all-gather per dim over
           every axis that dim drops (output = the intermediate after un-splitting them),
           the dim of the last mesh axis first;
        4. axes left in another order than ``dst``'s are put in order by one
           collective-permute.
        Steps add up, plus the memory traffic of the copies they make
        (``resharding_traffic`` / memory bandwidth). Result is ≥ 0 and 0 exactly when the
        layouts agree (``src == dst`` up to size-1 axes).
        """
        return _resharding_time(self, *self._checked_pair(shape, src, dst, itemsize))

    def resharding_traffic(self, shape: Sequence[int], itemsize: int, src: Spec, dst: Spec
                           ) -> int:
        """Bytes per device the copies of ``resharding`` read and write: a local slice reads
        and writes the kept part, every collective reads its operand and writes its
        result, and gathering a dimension that is not the outermost one relayouts the
        gathered buffer (read and write), as XLA does."""
        return _resharding_traffic(self, *self._checked_pair(shape, src, dst, itemsize))

    def resharding_steps(self, shape: Sequence[int], itemsize: int, src: Spec, dst: Spec
                         ) -> tuple[CollectiveStep, ...]:
        """The collectives ``resharding`` prices, in order (none that moves nothing)."""
        return _resharding_steps(self, *self._checked_pair(shape, src, dst, itemsize))

    def resharding_waypoints(self, shape: Sequence[int], src: Spec, dst: Spec
                             ) -> tuple[Spec, ...]:
        """The layouts ``resharding`` passes through from ``src`` to ``dst``, in order
        (``Route.waypoints``): pinning a value to each in turn makes XLA run the priced
        collectives."""
        shape, _, src, dst = self._checked_pair(shape, src, dst, 1)
        return resharding_route(self.mesh_shape, src, dst).waypoints

    def resharding_matrix(
        self, shape: Sequence[int], itemsize: int, srcs: Sequence[Spec], dsts: Sequence[Spec]
    ) -> np.ndarray:
        """float64 array [len(srcs), len(dsts)] of ``resharding`` times (memoised; a fresh
        writable copy is returned on every call). A leading dim no layout splits (a loop's
        stacked steps) is priced as part of the next one: the same collectives on the same
        bytes, and the routes of layouts of one rank less, found once for both."""
        shape = _as_shape(shape)
        key_srcs = tuple(self._check_spec(shape, spec)[1] for spec in srcs)
        key_dsts = tuple(self._check_spec(shape, spec)[1] for spec in dsts)
        while len(shape) > 1 and not any(spec[0] for spec in key_srcs + key_dsts) and all(
                shape[1] % self._split(spec[1]) == 0 for spec in key_srcs + key_dsts):
            shape = (shape[0] * shape[1], *shape[2:])
            key_srcs = tuple(spec[1:] for spec in key_srcs)
            key_dsts = tuple(spec[1:] for spec in key_dsts)
        return _resharding_matrix(self, shape, int(itemsize), key_srcs, key_dsts).copy()

    def collective_matrix(self, shape: Sequence[int], srcs: Sequence[Spec],
                          dsts: Sequence[Spec]) -> np.ndarray:
        """bool array [len(srcs), len(dsts)]: True where ``resharding`` runs a collective
        (``resharding_steps`` is not empty), False where it is a local slice or nothing
        (memoised; a fresh writable copy is returned on every call)."""
        shape = _as_shape(shape)
        key_srcs = tuple(self._check_spec(shape, spec)[1] for spec in srcs)
        key_dsts = tuple(self._check_spec(shape, spec)[1] for spec in dsts)
        return _collective_matrix(self.mesh_shape, key_srcs, key_dsts).copy()

    # ------------------------------------------------------------------ helpers

    def _checked_pair(self, shape, src: Spec, dst: Spec, itemsize: int):
        """(shape, itemsize, src, dst) normalised, after checking both specs."""
        shape = _as_shape(shape)
        return shape, int(itemsize), self._check_spec(shape, src)[1], \
            self._check_spec(shape, dst)[1]

    def _split(self, axes: Sequence[int]) -> int:
        try:
            return self._splits[axes]
        except (KeyError, TypeError):  # TypeError: a list, not a tuple
            n = math.prod(self.mesh_shape[a] for a in axes)
            if isinstance(axes, tuple):
                self._splits[axes] = n
            return n

    def _check_axes(self, axes: Sequence[int] | int) -> tuple[int, ...]:
        if isinstance(axes, (int, np.integer)):
            axes = (axes,)
        axes = tuple(int(a) for a in axes)
        rank = len(self.mesh_shape)
        for a in axes:
            if not 0 <= a < rank:
                raise ValueError(f"mesh axis {a} out of range for mesh_shape {self.mesh_shape}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"mesh axes must be distinct, got {axes}")
        return axes

    def _group(self, axes: Sequence[int], collective: str | None = None) -> tuple[int, float, float]:
        """(group size, bottleneck bandwidth, worst latency) over ``axes``, with the links
        calibrated for ``collective`` when the cluster has them."""
        key = (tuple(axes) if not isinstance(axes, (int, np.integer)) else (int(axes),),
               collective)
        found = self._groups.get(key)
        if found is None:
            found = self._groups[key] = self._new_group(*key)
        return found

    def _new_group(self, axes: tuple[int, ...], collective: str | None
                   ) -> tuple[int, float, float]:
        axes = tuple(a for a in self._check_axes(axes) if self.mesh_shape[a] > 1)
        if not axes:
            return 1, math.inf, 0.0
        links = self.cluster.links_for_mesh(self.mesh_shape, collective)
        return (
            self._split(axes),
            min(links[a].bandwidth for a in axes),
            max(links[a].latency for a in axes),
        )

    def _one_pass(self, nbytes: float, axes: Sequence[int], collective: str) -> float:
        n, bandwidth, latency = self._group(axes, collective)
        if n == 1:
            return 0.0
        return n * latency + (n - 1) / n * _check_nbytes(nbytes) / bandwidth

    def _check_spec(self, shape: Sequence[int], spec: Spec) -> tuple[tuple[int, ...], Spec]:
        try:
            return self._checked[(shape, spec)]
        except (KeyError, TypeError):  # TypeError: lists, not tuples
            pass
        checked = self._new_check_spec(shape, spec)
        if isinstance(shape, tuple) and isinstance(spec, tuple):
            self._checked[(shape, spec)] = checked
        return checked

    def _new_check_spec(self, shape: Sequence[int], spec: Spec) -> tuple[tuple[int, ...], Spec]:
        shape, spec = _as_shape(shape), _as_spec(spec)
        if len(spec) != len(shape):
            raise ValueError(f"spec {spec} has {len(spec)} entries but the tensor has rank {len(shape)}")
        used = [a for axes in spec for a in axes]
        self._check_axes(used)
        return shape, spec

    def _shard_bytes(self, shape: tuple[int, ...], itemsize: int, layout: Sequence[Sequence[int]]) -> int:
        nbytes = itemsize
        for size, axes in zip(shape, layout):  # (a plain loop: resharding walks call this a lot)
            nbytes *= -(-size // self._split(tuple(axes)))
        return nbytes


def _as_shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(size) for size in shape)


def _as_spec(spec: Spec) -> Spec:
    return tuple(tuple(int(a) for a in axes) for axes in spec)


def _check_nbytes(nbytes: float) -> float:
    if nbytes < 0:
        raise ValueError(f"nbytes must be non-negative, got {nbytes!r}")
    return float(nbytes)


@functools.lru_cache(maxsize=1 << 16)
def _resharding_time(model: MeshCostModel, shape: tuple[int, ...], itemsize: int, src: Spec, dst: Spec) -> float:
    """Pure implementation of ``MeshCostModel.resharding`` (see its docstring)."""
    steps, traffic = _resharding_walk(model, shape, itemsize, src, dst)
    return _seconds(model, (step.seconds for step in steps), traffic)


def _seconds(model: MeshCostModel, step_seconds: Iterable[float], traffic: int) -> float:
    """A resharding's seconds: its collectives' ``step_seconds`` summed in order, plus its
    copies' ``traffic`` bytes at memory bandwidth."""
    return sum(step_seconds) + traffic / model.cluster.memory_bandwidth


def _resharding_steps(model, shape, itemsize, src, dst) -> tuple[CollectiveStep, ...]:
    return _resharding_walk(model, shape, itemsize, src, dst)[0]


def _resharding_traffic(model, shape, itemsize, src, dst) -> int:
    return _resharding_walk(model, shape, itemsize, src, dst)[1]


@functools.lru_cache(maxsize=1 << 16)
def _resharding_walk(model: MeshCostModel, shape: tuple[int, ...], itemsize: int, src: Spec,
                     dst: Spec) -> tuple[tuple[CollectiveStep, ...], int]:
    """The collectives of ``MeshCostModel.resharding`` in order (none that moves nothing),
    and the bytes per device its copies read and write (``resharding_traffic``): the
    shape-free route (``_resharding_route``) priced for ``shape`` and ``itemsize``. The
    specs are checked by the callers (once per spec for a matrix)."""
    return _priced_route(model, shape, resharding_route(model.mesh_shape, src, dst),
                         _shard_bytes_of(model, shape, itemsize))


#: the price of each collective a route runs (``MeshCostModel`` method: model, nbytes, axes)
_PRICE = {"all-gather": MeshCostModel.all_gather, "all-to-all": MeshCostModel.all_to_all,
          "collective-permute": MeshCostModel.collective_permute}


def _shard_bytes_of(model: MeshCostModel, shape: tuple[int, ...], itemsize: int
                    ) -> Callable[[Spec], int]:
    """A layout's shard bytes for one ``shape`` and ``itemsize``, each layout's computed once."""
    shard_bytes: dict[Spec, int] = {}

    def nbytes(layout: Spec) -> int:
        found = shard_bytes.get(layout)
        if found is None:
            found = shard_bytes[layout] = model._shard_bytes(shape, itemsize, layout)
        return found
    return nbytes


def _priced_route(model: MeshCostModel, shape: tuple[int, ...], route: Route,
                  nbytes: Callable[[Spec], int]) -> tuple[tuple[CollectiveStep, ...], int]:
    """``route``'s collectives and copy traffic (bytes per device) for one ``shape``
    (``nbytes``: a layout's shard bytes, ``_shard_bytes_of``)."""
    steps = tuple(CollectiveStep(step.kind, step.axes, n, _PRICE[step.kind](model, n, step.axes))
                  for step in route.steps for n in (nbytes(step.layout),))
    return steps, _route_traffic(model, shape, route, nbytes)


def _route_traffic(model: MeshCostModel, shape: tuple[int, ...], route: Route,
                   nbytes: Callable[[Spec], int]) -> int:
    """Bytes per device ``route``'s copies read and write (``nbytes``: a layout's shard)."""
    traffic = 0
    for term in route.traffic:
        if term.sliced_all_to_all and not model.cluster.all_to_all_as_slices:
            continue
        if term.before_dim is not None and math.prod(
                -(-n // model._split(axes)) for n, axes in zip(shape[:term.before_dim], term.layout)) <= 1:
            continue
        traffic += term.factor * (nbytes(term.layout) // term.divisor)
    return traffic


@functools.lru_cache(maxsize=4096)
def _resharding_matrix(
    model: MeshCostModel, shape: tuple[int, ...], itemsize: int, srcs: tuple[Spec, ...], dsts: tuple[Spec, ...]
) -> np.ndarray:
    """``_resharding_time`` of every (src, dst) route, its collectives priced once per (kind,
    axes, bytes) and each layout's shard bytes once: the same sums, in the same order."""
    nbytes = _shard_bytes_of(model, shape, itemsize)
    prices: dict[tuple, float] = {}

    def price(kind: str, axes: tuple[int, ...], n: int) -> float:
        found = prices.get((kind, axes, n))
        if found is None:
            found = prices[(kind, axes, n)] = _PRICE[kind](model, n, axes)
        return found

    cells = []
    for src in srcs:
        for dst in dsts:
            route = resharding_route(model.mesh_shape, src, dst)
            cells.append(_seconds(model, (price(step.kind, step.axes, nbytes(step.layout))
                                          for step in route.steps),
                                  _route_traffic(model, shape, route, nbytes)))
    matrix = np.array(cells, dtype=np.float64).reshape(len(srcs), len(dsts))
    matrix.flags.writeable = False
    return matrix


@functools.lru_cache(maxsize=4096)
def _collective_matrix(mesh_shape: tuple[int, ...], srcs: tuple[Spec, ...],
                       dsts: tuple[Spec, ...]) -> np.ndarray:
    """``MeshCostModel.collective_matrix`` of checked specs (routes are shape-free)."""
    matrix = np.array([[bool(resharding_route(mesh_shape, src, dst).steps) for dst in dsts]
                       for src in srcs], dtype=bool).reshape(len(srcs), len(dsts))
    matrix.flags.writeable = False
    return matrix
