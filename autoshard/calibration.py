"""``autoshard.calibrate``: measure the mesh's devices and links, return a :class:`Cluster`.

Measures, with every device of the mesh busy at once (so devices that share a host's
cores are priced as they really behave):

* matmul throughput per dtype (FLOP/s per device, n×n·n×n products on every device);
* memory bandwidth (an elementwise pass over a large buffer on every device);
* per mesh axis, all-reduce, all-gather, reduce-scatter and all-to-all at a few message
  sizes, each fitted by least squares (``numpy.linalg.lstsq``) to the α–β formula the
  cost model prices it with (:class:`autoshard.cost_model.MeshCostModel`); axes whose
  device groups cross the same boundaries (processes, hosts) share one fit of their
  pooled points when their own fits agree (one link, measured more, and no plan choosing
  an axis for its noise);
* whether a merged all-reduce of several arrays costs one all-reduce or one per array
  (``Cluster.all_reduce_per_operand``; XLA's CPU collectives: one per array).

Collectives are timed as a chain of ``REPEATS`` dependent collectives inside one jitted
``shard_map``, minus the same chain without the collectives, so dispatch overhead is not
counted as latency. The returned cluster keeps ``device_memory`` and the like from the
mesh's default preset. In a multi-process run every process must call ``calibrate``
(the collectives are collective); the figures of process 0 are broadcast so every
process returns the identical cluster (and so plans the same).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .cost_model import COLLECTIVES, Cluster, Link
from .mesh import default_cluster

REPEATS = 8           # collectives chained per timed call
_MIN_SECONDS = 1e-9


class CalibrationError(RuntimeError):
    """The measurements were too noisy to fit; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Fit:
    """An α–β fit: ``latency`` (α, s), ``bandwidth`` (β, bytes/s), and its worst relative
    error over the measured points."""

    latency: float
    bandwidth: float
    max_rel_error: float

    def __repr__(self):
        return (f"Fit(α={self.latency * 1e6:.1f} µs, β={self.bandwidth / 1e9:.3g} GB/s, "
                f"max error {self.max_rel_error:.0%})")


def fit_alpha_beta(alpha_coef: Sequence[float], byte_coef: Sequence[float],
                   seconds: Sequence[float], latency: float | None = None) -> Fit:
    """Least squares ``seconds ≈ alpha_coef·α + byte_coef/β`` with α ≥ 0 and β > 0
    (``latency``: α given, only β fitted, to the points that took longer than α alone).

    ``alpha_coef``: how many latencies each measurement pays; ``byte_coef``: how many
    bytes it moves per device (the cost model's formula, e.g. 2(n−1)/n·nbytes for an
    all-reduce). Residuals are relative (each row divided by its time), so message sizes
    spanning orders of magnitude all count and small messages pin the latency. When the
    unconstrained solution has α < 0 the fit is redone with α = 0; when it has no
    positive byte term, β is the fastest rate any point achieved.
    """
    a = np.asarray(alpha_coef, np.float64)
    b = np.asarray(byte_coef, np.float64)
    t = np.asarray(seconds, np.float64)
    if not (len(a) == len(b) == len(t) >= 2) or np.any(t <= 0) or np.any(b <= 0):
        raise ValueError(f"fit_alpha_beta needs ≥ 2 points with positive times and bytes, got "
                         f"{len(t)} points")
    wa, wb, ones = a / t, b / t, np.ones_like(t)
    if latency is not None:   # β from the points slower than their latency alone
        slower = a * latency < t
        if slower.any():
            wa, wb, ones = wa[slower], wb[slower], ones[slower]
        alpha, inv_beta = float(latency), float(wb @ (ones - wa * latency) / (wb @ wb))
    else:
        (alpha, inv_beta), *_ = np.linalg.lstsq(np.stack([wa, wb], axis=1), ones, rcond=None)
    if alpha < 0:
        alpha, inv_beta = 0.0, float(wb @ ones / (wb @ wb))
    if inv_beta <= 0:
        inv_beta = float(np.min(t / b))
        alpha = max(0.0, float(wa @ (ones - wb * inv_beta) / (wa @ wa)))
    predicted = a * alpha + b * inv_beta
    return Fit(float(alpha), float(1.0 / inv_beta), float(np.max(np.abs(predicted - t) / t)))


# ------------------------------------------------------------------ timing
def _time(fn, *args, repeats: int) -> float:
    """Best of ``repeats`` timed calls after one warm-up (which also compiles)."""
    return _time_alternately([lambda: fn(*args)], repeats=repeats)[0]


def _time_alternately(calls: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Per call of ``calls``, the best of ``repeats`` timed calls after one warm-up each
    (which also compiles), the calls taken in turn: a busy spell of the host slows all."""
    for call in calls:
        jax.block_until_ready(call())
    best = [math.inf] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            jax.block_until_ready(call())
            best[i] = min(best[i], time.perf_counter() - start)
    return [max(seconds, _MIN_SECONDS) for seconds in best]


def _local_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """A 1-D mesh of this process's devices of ``mesh`` (local work needs no peers)."""
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return jax.sharding.Mesh(np.array(devices), ("devices",))


def _per_device(mesh, shape, dtype, key=0):
    """A [devices, *shape] array with one slice on every device of 1-D ``mesh``."""
    n = mesh.devices.size
    sharding = NamedSharding(mesh, PartitionSpec("devices"))
    return jax.jit(lambda k: jax.random.normal(k, (n, *shape), jnp.float32).astype(dtype),
                   out_shardings=sharding)(jax.random.key(key))


def measure_matmul(mesh, dtype: str, budget_s: float) -> float:
    """FLOP/s per device for ``dtype`` with all of this process's devices multiplying."""
    local = _local_mesh(mesh)
    spec = NamedSharding(local, PartitionSpec("devices"))
    mm = jax.jit(lambda x, y: jnp.einsum("dij,djk->dik", x, y), out_shardings=spec)
    deadline = time.perf_counter() + budget_s
    n, rate = 128, 0.0
    while True:
        x = _per_device(local, (n, n), dtype, 1)
        y = _per_device(local, (n, n), dtype, 2)
        seconds = _time(mm, x, y, repeats=3)
        rate = max(rate, 2.0 * n ** 3 / seconds)
        # Larger products until one call takes ≥ 50 ms (overheads amortised) or time runs out.
        if seconds >= 0.05 or n >= 4096 or time.perf_counter() + 8 * 4 * seconds > deadline:
            break
        n *= 2
    # The rest of the budget: more calls at the final size. The best one is the rate when
    # nothing else competes for the host (a shared machine slows calls, never speeds them).
    while time.perf_counter() + seconds < deadline:
        start = time.perf_counter()
        jax.block_until_ready(mm(x, y))
        rate = max(rate, 2.0 * n ** 3 / (time.perf_counter() - start))
    return rate


def measure_memory_bandwidth(mesh, budget_s: float) -> float:
    """Bytes/s per device of a read-modify-write pass, all of this process's devices at once."""
    local = _local_mesh(mesh)
    spec = NamedSharding(local, PartitionSpec("devices"))
    axpy = jax.jit(lambda x: x * 1.0001 + 1.0, out_shardings=spec)
    elements = 1 << 20
    best = 0.0
    deadline = time.perf_counter() + budget_s
    while True:
        x = _per_device(local, (elements,), jnp.float32)
        seconds = _time(axpy, x, repeats=3)
        best = max(best, 2 * 4 * elements / seconds)
        if seconds >= 0.02 or elements >= 1 << 25 or time.perf_counter() + 8 * 4 * seconds > deadline:
            break
        elements *= 4
    while time.perf_counter() + seconds < deadline:   # as in measure_matmul
        start = time.perf_counter()
        jax.block_until_ready(axpy(x))
        best = max(best, 2 * 4 * elements / (time.perf_counter() - start))
    return best


def _chain(kind: str, axis: str, n: int, repeats: int):
    """The per-shard body: ``repeats`` dependent ``kind`` collectives over ``axis``, or
    (kind None) the same chain's local work only."""
    def body(x):
        for _ in range(repeats):
            if kind == "all-reduce":
                x = jax.lax.psum(x, axis) * (1.0 / n)
            elif kind == "all-gather":
                x = jax.lax.all_gather(x, axis, tiled=True)[: x.shape[0]] * 0.5
            elif kind == "reduce-scatter":
                x = jnp.tile(jax.lax.psum_scatter(x, axis, tiled=True), n) * (1.0 / n)
            elif kind == "all-to-all":
                x = jax.lax.all_to_all(x, axis, 0, 0, tiled=True) * 0.5
            else:
                x = x * 0.5
        return x
    return body


def _model_terms(kind: str, n: int, buffer_bytes: float) -> tuple[float, float]:
    """(latency count, bytes over β) of one ``kind`` on a group of ``n`` devices, each
    holding a ``buffer_bytes`` input, in the cost model's conventions."""
    if kind == "all-reduce":
        return 2 * (n - 1) + 1, 2 * (n - 1) / n * buffer_bytes
    if kind == "all-gather":   # priced by the gathered output: n × the input
        return n, (n - 1) / n * n * buffer_bytes
    return n, (n - 1) / n * buffer_bytes   # reduce-scatter (input), all-to-all (buffer)


#: per collective kind, measured points (latency count, bytes over β, seconds): the terms
#: of one collective in the cost model's formula (``_model_terms``) and its measured time
Points = dict[str, list[tuple[float, float, float]]]


def collective_points(mesh, axis: str, sizes: Sequence[int], repeats: int = 3,
                      deadline: float = math.inf) -> Points:
    """Each collective timed over mesh axis ``axis`` (``sizes``: bytes per device, in
    increasing order), as points for :func:`fit_collectives`. After the first two sizes,
    larger ones are measured only while ``time.perf_counter() < deadline`` — as process 0
    sees it, so that every process of a multi-process run measures the same collectives."""
    n = dict(zip(mesh.axis_names, mesh.axis_sizes))[axis]
    spec = PartitionSpec(tuple(mesh.axis_names))
    sharding = NamedSharding(mesh, spec)
    calls = {kind: jax.jit(jax.shard_map(_chain(kind, axis, n, REPEATS), mesh=mesh,
                                         in_specs=spec, out_specs=spec, check_vma=False))
             for kind in (None,) + COLLECTIVES}
    points: Points = {kind: [] for kind in COLLECTIVES}
    for i, size in enumerate(sizes):
        if i >= 2 and not _agree_flag(time.perf_counter() < deadline):
            break
        elements = max(n, size // 4 // n * n)        # float32, divisible by the axis size
        x = jax.make_array_from_callback(
            (elements * mesh.size,), sharding,
            lambda index: np.ones(elements, np.float32))
        # Small messages are cheap and noisy in one process; across processes they are
        # slow enough (network or gloo latency) that the plain count suffices.
        small = size <= 64 << 10 and jax.process_count() == 1
        reps = repeats * 3 if small else repeats
        base = _time(calls[None], x, repeats=reps)
        for kind in COLLECTIVES:
            seconds = (_time(calls[kind], x, repeats=reps) - base) / REPEATS
            points[kind].append((*_model_terms(kind, n, 4 * elements), seconds))
    return points


def fit_collectives(points: Points, axes: Sequence[str]) -> dict[str, Fit]:
    """α–β fit per collective kind of ``points`` (measured over ``axes``: one axis, or
    axes of one link class pooled), every kind of ``COLLECTIVES`` given one."""
    fits, kept = {}, {}
    for kind, rows in points.items():
        # A point whose collective did not measure slower than the chain without it is
        # noise (a loaded host), not a free collective: leave it out.
        rows = [r for r in rows if r[2] > _MIN_SECONDS]
        if len(rows) >= 2:
            kept[kind] = [np.array(col) for col in zip(*rows)]
            fits[kind] = fit_alpha_beta(*kept[kind])
    if not fits:
        raise CalibrationError(
            f"no collective over mesh axis {' or '.join(map(repr, axes))} measured above the "
            f"timing noise; the host is probably busy: calibrate again with a larger budget_s")
    # The kinds' latencies (per step of their formulas) are one link's: a kind whose
    # points leave it under a tenth of the kinds' median (noise made its small messages
    # look nearly free) takes the median, its bandwidth fitted to it. A plan priced with
    # a free collective splits into many small ones (measured: an all-gather fitted at 0
    # on each axis of a 2x2x2 CPU mesh, the all-reduce at 8.5 µs; the MoE's plan for it ran
    # 23 collectives where the one for a cluster of 9.7 µs ran 6, and measured 1.78x the
    # hand-written layout's step time, not 0.99x).
    median = sorted(fit.latency for fit in fits.values())[len(fits) // 2]
    for kind, fit in fits.items():
        if fit.latency < median / 10:
            fits[kind] = fit_alpha_beta(*kept[kind], latency=median)
    # Kinds left without a fit borrow the best-fitting kind's link on this axis.
    best = min(fits.values(), key=lambda f: f.max_rel_error)
    return {kind: fits.get(kind, best) for kind in COLLECTIVES}


#: axes of one link class share one fit when, for every collective, each axis's own fit
#: prices its largest measured message within this factor of the pooled fit. On a
#: 2x2x2 CPU mesh (8 devices, 2 cores, one link), five calibrations of budget 20 s gave
#: per-axis fits whose latencies spread up to 3x between runs and 2.7x between the axes
#: of one run (their bandwidths 1.5x and 1.35x), so the plan's choice of axis followed the
#: noise; NVLink against PCIe or the network differ by 5x or more and stay apart.
POOL_WITHIN = 2.0


def pooled_fits(points: Mapping[str, Points], classes: Sequence[Sequence[str]]
                ) -> dict[str, dict[str, Fit]]:
    """Per axis of ``points``, its collectives' fits: one fit of the pooled points of the
    axes of each of ``classes`` (axes whose device groups cross the same boundaries: see
    :func:`link_classes`) when every axis's own fit agrees with it within ``POOL_WITHIN``
    (more points, one figure for one link); else each axis's own."""
    own = {axis: fit_collectives(p, [axis]) for axis, p in points.items()}
    fits = dict(own)
    for axes in classes:
        if len(axes) < 2:
            continue
        merged: Points = {kind: [r for axis in axes for r in points[axis][kind]]
                          for kind in COLLECTIVES}
        pooled = fit_collectives(merged, axes)
        if all(_agrees(own[axis][kind], pooled[kind], points[axis][kind])
               for axis in axes for kind in COLLECTIVES):
            fits.update({axis: pooled for axis in axes})
    return fits


def _agrees(own: Fit, pooled: Fit, rows) -> bool:
    """Whether ``own`` and ``pooled`` price the largest message of ``rows`` within
    ``POOL_WITHIN`` of each other."""
    a, b, _ = max(rows, key=lambda r: r[1])
    mine = a * own.latency + b / own.bandwidth
    theirs = a * pooled.latency + b / pooled.bandwidth
    return max(mine, theirs) <= POOL_WITHIN * min(mine, theirs)


def link_classes(mesh, hosts: Sequence[int] | None = None) -> tuple[tuple[str, ...], ...]:
    """``mesh``'s axes (of more than one device) grouped by their size and the boundaries
    their device groups cross: whether a group spans several processes, and several hosts
    (``hosts``: a host id per process; by default every process's hostname, gathered).
    Axes of one class are taken for one link (and pooled when their measurements agree:
    :func:`pooled_fits`). Axes of different sizes stay apart: on the 8 CPU devices of a
    2x4 mesh, the 2-device axis's collectives measured 1.3-1.7x slower per byte than the
    4-device axis's in each of three calibrations, beyond what the formula's group size
    accounts for."""
    if hosts is None:
        hosts = _process_hosts()
    devices = mesh.devices
    classes: dict[tuple[int, bool, bool], list[str]] = {}
    for k, (axis, size) in enumerate(zip(mesh.axis_names, mesh.axis_sizes)):
        if size < 2:
            continue
        groups = np.moveaxis(devices, k, -1).reshape(-1, size)
        processes = [{d.process_index for d in group} for group in groups]
        key = (size, any(len(p) > 1 for p in processes),
               any(len({hosts[i] for i in p}) > 1 for p in processes))
        classes.setdefault(key, []).append(axis)
    return tuple(tuple(axes) for axes in classes.values())


def _process_hosts() -> list[int]:
    """A host id per process (a hash of its hostname), the same list in every process."""
    if jax.process_count() == 1:
        return [0]
    import socket
    import zlib

    from jax.experimental import multihost_utils
    mine = np.array([zlib.crc32(socket.gethostname().encode())], np.int64)
    return [int(h) for h in np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)]


#: arrays in the merged all-reduce that ``all_reduce_per_operand`` times against one
MERGED_ARRAYS = 64


def all_reduce_per_operand(mesh, axis: str, repeats: int = 9) -> bool:
    """Whether an all-reduce of ``MERGED_ARRAYS`` arrays over ``axis`` (one collective,
    as XLA's combiner merges independent all-reduces) costs more than twice one
    all-reduce of the same bytes in one array: the backend then runs it array by array,
    and merging saves no latency. XLA's CPU collectives, jax 0.10.2, 4 devices of a 2x4
    mesh, 128 KB per device: one array 0.43 ms; as 16 arrays 1.8 ms, as 64 arrays 6.4 ms
    (4.5 ms with two busy processes beside it: still 7.5x). 16 arrays once came out under
    2x in a busy test run, hence 64. The two are timed in alternate calls (best of
    ``repeats`` each), so that a busy spell of the host slows both."""
    spec = PartitionSpec(tuple(mesh.axis_names))
    sharding = NamedSharding(mesh, spec)
    elements = 512   # 2 KB per array and device, 128 KB merged

    def call(arrays: int) -> Callable[[], object]:
        specs = (spec,) * arrays
        merged = jax.jit(jax.shard_map(
            lambda *xs: jax.lax.psum(tuple(x * 0.5 for x in xs), axis), mesh=mesh,
            in_specs=specs, out_specs=specs, check_vma=False))
        size = elements * MERGED_ARRAYS // arrays
        xs = [jax.make_array_from_callback((size * mesh.size,), sharding,
                                           lambda index, size=size: np.ones(size, np.float32))
              for _ in range(arrays)]
        return lambda: merged(*xs)

    merged_s, one_s = _time_alternately([call(MERGED_ARRAYS), call(1)], repeats=repeats)
    return _agree_flag(merged_s > 2 * one_s)


def _sizes(budget_s: float) -> tuple[int, ...]:
    """Message sizes (bytes per device): a function of the budget only, so every process
    of a multi-process run runs the same collectives."""
    if budget_s < 6:
        return (16 << 10, 256 << 10, 2 << 20)
    return (4 << 10, 64 << 10, 512 << 10, 4 << 20)


# ------------------------------------------------------------------ the cluster
def calibrate(mesh: jax.sharding.Mesh, *, budget_s: float = 20.0,
              dtypes: Sequence[str] = ("float32", "bfloat16"), name: str | None = None,
              base: Cluster | None = None, verbose: bool = False) -> Cluster:
    """Measure ``mesh``'s devices and links (about ``budget_s`` seconds) → a :class:`Cluster`.

    ``dtypes``: matmul rates to measure (must include "float32"). ``base``: the cluster
    whose memory size and node layout are kept (default: the mesh's default preset).
    The result has ``axis_links`` (per mesh axis; the all-gather fit, the one-pass
    collective the other fits are compared with) and ``collective_links`` (per
    collective and axis), and round-trips through ``to_json``/``Cluster.from_json``.
    Use it as ``parallelize(..., cluster=...)`` or save it for ``autoshard plan
    --cluster FILE``. Every process of a multi-process run must call it.
    """
    check_measurable("calibrate", mesh, budget_s)
    dtypes = tuple(dtypes)
    if "float32" not in dtypes:
        raise ValueError(f"calibrate: dtypes must include 'float32' (the fallback rate), got "
                         f"{list(dtypes)}")
    base = default_cluster(mesh) if base is None else base
    log = print if verbose and jax.process_index() == 0 else (lambda *a: None)
    compute_budget = 0.3 * budget_s / (len(dtypes) + 1)
    flops = {}
    for dtype in dtypes:
        flops[dtype] = measure_matmul(mesh, dtype, compute_budget)
        log(f"matmul {dtype}: {flops[dtype] / 1e9:.2f} GFLOP/s per device")
    bandwidth = measure_memory_bandwidth(mesh, compute_budget)
    log(f"memory: {bandwidth / 1e9:.2f} GB/s per device")
    points = {}
    axes = [(axis, size) for axis, size in zip(mesh.axis_names, mesh.axis_sizes) if size > 1]
    start = time.perf_counter()
    for k, (axis, _) in enumerate(axes):
        # Axis k measures larger messages until (k+1)/len(axes) of the collectives' share
        # of the budget has gone.
        deadline = start + (0.65 * budget_s) * (k + 1) / len(axes)
        points[axis] = collective_points(mesh, axis, _sizes(budget_s),
                                         repeats=3 if budget_s < 6 else 5, deadline=deadline)
    fits = pooled_fits(points, link_classes(mesh))
    for axis in fits:
        shared = [a for a in fits if a != axis and fits[a] is fits[axis]]
        for kind, fit in fits[axis].items():
            log(f"axis {axis} {kind}: {fit!r}" + (f" (pooled with {', '.join(shared)})"
                                                   if shared else ""))
    per_operand = bool(axes) and all_reduce_per_operand(mesh, axes[-1][0])
    log(f"a merged all-reduce runs {'array by array' if per_operand else 'as one'}")
    figures = _agree(np.array(
        [flops[d] for d in dtypes] + [bandwidth] +
        [v for axis in fits for kind in COLLECTIVES
         for v in (fits[axis][kind].latency, fits[axis][kind].bandwidth)], np.float64))
    flops = dict(zip(dtypes, figures[:len(dtypes)]))
    bandwidth = figures[len(dtypes)]
    measured = iter(figures[len(dtypes) + 1:].reshape(-1, 2))
    per_kind: dict[str, list[Link]] = {kind: [] for kind in COLLECTIVES}
    for axis, size in zip(mesh.axis_names, mesh.axis_sizes):
        for kind in COLLECTIVES:
            if size > 1:
                latency, bw = next(measured)
                per_kind[kind].append(Link(bandwidth=float(bw), latency=float(latency)))
            else:  # a size-1 axis carries no traffic; any link will do
                per_kind[kind].append(base.intra_node)
    axis_links = tuple(per_kind["all-gather"])
    inner = axis_links[-1]
    outer = axis_links[0]
    platform = mesh.devices.flat[0].platform
    # Dtypes not measured keep the base cluster's ratio to float32.
    scale = float(flops["float32"]) / base.flops_rate("float32")
    rates = {d: r * scale for d, r in base.flops}
    rates.update({d: float(r) for d, r in flops.items()})
    return dataclasses.replace(
        base, name=name or f"calibrated-{platform}-{'x'.join(map(str, mesh.axis_sizes))}",
        flops=tuple(rates.items()), memory_bandwidth=float(bandwidth),
        devices_per_node=jax.local_device_count(), intra_node=inner, inter_node=outer,
        axis_links=axis_links,
        collective_links=tuple((kind, tuple(links)) for kind, links in per_kind.items()),
        all_reduce_per_operand=per_operand)


def check_measurable(caller: str, mesh, budget_s: float) -> None:
    """``caller``'s checks of its arguments: a mesh of real devices, a positive budget."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"{caller} needs a mesh of real devices (autoshard.make_mesh), got "
                        f"{type(mesh).__name__}; an abstract mesh has nothing to measure")
    if not budget_s > 0:
        raise ValueError(f"{caller}: budget_s must be positive, got {budget_s!r}")


def _agree_flag(flag: bool) -> bool:
    """Process 0's ``flag`` in every process (a no-op in a single process)."""
    return bool(_agree(np.array([float(flag)]))[0])


def _agree(figures: np.ndarray) -> np.ndarray:
    """Process 0's figures in every process (a no-op in a single process)."""
    if jax.process_count() == 1:
        return figures
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(figures), np.float64)
