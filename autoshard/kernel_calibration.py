"""``autoshard.calibrate_kernels``: time a program's convolutions at the per-device shapes
its strategies would run them at, so that plans price them as measured.

A roofline prices every kernel at the device's peak rate; backends run some convolutions
far below it (XLA:CPU, jax 0.10: a 3×3 convolution of a [4, 16, 16, 32] batch into 16
channels, with its gradients, 5.6 ms; the same flops into 32 channels from a [2, 16, 16,
32] batch, 1.3 ms). Splitting a tensor changes the shape each device runs, so two plans
of equal flops can differ by that much. ``calibrate_kernels`` lists, for every plain
convolution of the traced program, the per-device operand shapes of each way the planner
may split it, runs each such kernel on every device of the mesh at once (as
``autoshard.calibrate`` measures matmul throughput), and returns the cluster with the
times in ``Cluster.kernel_seconds``.

Dots are not timed: a dot's rate varies little with its shape at equal flops (XLA:CPU, 8
devices: within 10 % from 16 to 128 output columns), and timed alone its time per run
changed 3× with the number of runs per call ([8, 16, 128] × [128, 256]: 0.67 ms once,
0.21 ms per run in a call of 16), so no figure for it could be trusted; planned with such
figures, a GPT on 2×2×2 ran 13 % slower than planned without.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .calibration import _agree, _agree_flag, _local_mesh, _time_alternately, check_measurable
from .cost_model import Cluster, MeshCostModel
from .intra.kernels import local_kernel_key
from .intra.op_rules import loop_op
from .intra.strategies import loop_strategies
from .ir.program import Literal
from .ir.trace import trace
from .mesh import default_cluster

#: the primitives whose kernels ``calibrate_kernels`` times
KERNEL_PRIMITIVES = ("conv_general_dilated",)
#: timed calls per kernel (the best counts), after one warm-up call
KERNEL_CALLS = 7


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """One kernel to time: ``eqn`` run on per-device operands of ``shapes``;
    ``roofline_s`` its roofline price (seconds)."""

    key: str
    eqn: object
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    roofline_s: float


def program_kernels(program, model: MeshCostModel) -> list[list[_Kernel]]:
    """Per equation of ``program`` whose primitive is in ``KERNEL_PRIMITIVES`` and whose
    rule names a kernel: the distinct kernels its strategies on ``model``'s mesh run, the
    equations of most flops first. A kernel two equations run is listed under both, so
    each equation's list is whole (``calibrate_kernels`` times it once)."""
    groups = []
    for eqn in program.eqns:
        if eqn.primitive.name not in KERNEL_PRIMITIVES or \
                any(isinstance(a, Literal) for a in eqn.inputs):
            continue
        in_avals = [program.avals[a] for a in eqn.inputs]
        out_avals = [program.avals[v] for v in eqn.outputs]
        op = loop_op(eqn, in_avals, out_avals)
        if op is None or op.kernel is None:
            continue
        group: dict[str, _Kernel] = {}   # strategies differing in their output share a kernel
        for strategy in loop_strategies(op, in_avals, out_avals, model):
            key = local_kernel_key(op.kernel, in_avals, strategy.in_specs, model)
            if key not in group:
                shapes = tuple(model.shard_shape(tuple(a.shape), s)
                               for a, s in zip(in_avals, strategy.in_specs))
                group[key] = _Kernel(key, eqn, shapes, tuple(str(a.dtype) for a in in_avals),
                                     strategy.compute_s)
        if group:
            groups.append((op.flops, list(group.values())))
    groups.sort(key=lambda g: -g[0])   # stable: equal flops keep program order
    return [group for _, group in groups]


def _kernel_call(kernel: _Kernel, local) -> Callable[[], object]:
    """A call running ``kernel`` on every device of 1-D mesh ``local`` at once."""
    spec = PartitionSpec("devices")

    def body(*operands):
        return kernel.eqn.primitive.bind(*(x[0] for x in operands), **kernel.eqn.params)[None]

    fn = jax.jit(jax.shard_map(body, mesh=local, in_specs=(spec,) * len(kernel.shapes),
                               out_specs=spec, check_vma=False))
    operands = [_operand(local, shape, dtype, seed=k)
                for k, (shape, dtype) in enumerate(zip(kernel.shapes, kernel.dtypes))]
    return lambda: fn(*operands)


def _operand(local, shape, dtype: str, seed: int) -> jax.Array:
    """A [devices, *shape] array of normal numbers, one slice per device of ``local``,
    made on the host (a jitted random number generator would compile once per shape)."""
    values = np.random.default_rng(seed).standard_normal((local.devices.size, *shape),
                                                         np.float32)
    return jax.device_put(values.astype(jnp.dtype(dtype)),
                          NamedSharding(local, PartitionSpec("devices")))


def _dispatch_seconds(local) -> float:
    """Seconds a call costs that does next to nothing on every device of ``local`` (a
    ``shard_map`` as the kernels' calls are): the overhead each timed call also pays."""
    spec = PartitionSpec("devices")
    fn = jax.jit(jax.shard_map(lambda x: x * 2.0, mesh=local, in_specs=spec, out_specs=spec,
                               check_vma=False))
    x = _operand(local, (1,), "float32", seed=0)
    return _time_alternately([lambda: fn(x)], repeats=4 * KERNEL_CALLS)[0]


def calibrate_kernels(fun: Callable, args: Sequence = (), kwargs: dict | None = None, *,
                      mesh: jax.sharding.Mesh, cluster: Cluster | None = None,
                      budget_s: float = 30.0, static_argnums: Sequence[int] = (),
                      verbose: bool = False) -> Cluster:
    """``cluster`` with the measured seconds of ``fun(*args, **kwargs)``'s kernels on
    ``mesh`` added to its ``kernel_seconds`` (about ``budget_s`` seconds).

    Every plain convolution of the traced program (not grouped: a split changes a grouped
    one's parameters) is timed at each per-device shape a split of it over ``mesh`` gives,
    with every device of the mesh running it at once, minus the dispatch overhead of a
    call; one whose roofline is shorter than that overhead is not (its noise would swamp
    it). The equations of most flops go first; when the budget runs out the rest keep
    their roofline price (an equation's kernels are timed all or none, so its strategies
    are priced alike). ``cluster`` defaults to the mesh's preset; pass
    ``autoshard.calibrate(mesh)``'s result so the other figures are measured too. Plan
    with the result (``parallelize(..., cluster=...)``) on the same mesh shape; it
    round-trips through ``Cluster.to_json``.
    Every process of a multi-process run must call it (process 0's times are used).
    """
    check_measurable("calibrate_kernels", mesh, budget_s)
    cluster = default_cluster(mesh) if cluster is None else cluster
    log = print if verbose and jax.process_index() == 0 else (lambda *a: None)
    call = functools.partial(fun, **kwargs) if kwargs else fun
    program = trace(call, tuple(args), static_argnums, step_limit=True).program  # as planned
    # the roofline's strategies: the same splits, whatever was measured before
    model = MeshCostModel(dataclasses.replace(cluster, kernel_seconds=()), mesh.axis_sizes)
    groups = program_kernels(program, model)
    known = dict(cluster.kernel_seconds)
    local = _local_mesh(mesh)
    deadline = time.perf_counter() + budget_s
    # process 0's overhead: every process must skip and time the same kernels
    overhead = float(_agree(np.array([_dispatch_seconds(local)]))[0])
    timed: list[_Kernel] = []
    timed_keys: set[str] = set()
    seconds: list[float] = []
    skipped = 0
    for done, group in enumerate(groups):
        if not _agree_flag(time.perf_counter() < deadline):
            log(f"budget spent: {len(groups) - done} of {len(groups)} equations keep the "
                f"roofline")
            break
        if min(k.roofline_s for k in group) < overhead:
            # shorter than a call's overhead, its noise would swamp the kernel: every
            # split of the equation keeps the roofline (all are priced alike)
            skipped += 1
            continue
        todo = [k for k in group if k.key not in known and k.key not in timed_keys]
        # the kernels of one equation timed in turn, so a busy spell of the host slows all
        best = _time_alternately([_kernel_call(k, local) for k in todo], repeats=KERNEL_CALLS)
        for kernel, call_s in zip(todo, best):
            timed.append(kernel)
            timed_keys.add(kernel.key)
            # a call no slower than an empty one: priced at a hundredth of one
            seconds.append(max(call_s - overhead, 0.01 * overhead))
            log(f"{kernel.key}: {seconds[-1] * 1e6:.1f} µs")
    if skipped:
        log(f"{skipped} equations' kernels are shorter than a call's overhead "
            f"({overhead * 1e6:.0f} µs): they keep the roofline")
    figures = _agree(np.array(seconds, np.float64)) if seconds else np.zeros(0)
    known.update((k.key, float(s)) for k, s in zip(timed, figures))
    return dataclasses.replace(cluster, kernel_seconds=tuple(known.items()))

