"""Sharding strategies of one equation: specs of its operands and outputs, and their price.

Strategies come from the equation's loop description (``_op_rules``): each mesh
axis (of size > 1) is assigned to one splittable loop or to none. Splitting a
reduction loop leaves partial results: the strategy pays an all-reduce over those
axes, or — a variant — a reduce-scatter that leaves the output split by the axis.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import jax
import numpy as np

from autoshard.cost_model import CollectiveStep, MeshCostModel
from autoshard.ir.specs import Spec, replicated

from .dot_layouts import DotOperands
from .dot_orders import copied_orders
from .expansions import expansion_traffic
from .kernels import local_kernel_key
from .layout_copies import COPY_READS
from .op_rules import LoopOp


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One way to shard an equation (or an input).

    ``in_specs[k]`` is the layout operand ``k`` must have (``None`` for literals);
    ``compute_s`` and ``communication_s`` are per-device seconds (the latter for the
    collectives the strategy itself needs, e.g. the all-reduce of a split contraction).
    ``temp_bytes``: per-device bytes of buffers it needs only while it runs (the
    unreduced partial result an all-reduce or a reduce-scatter reads, plus the full
    all-reduce result on backends that lower a reduce-scatter to all-reduce + slice).
    ``flops`` and ``bytes_accessed``: per device, the arithmetic and memory traffic of
    the op (priced in ``compute_s``) and of its collectives, which read their operands
    and write their results (that part priced in ``communication_s``).
    ``collectives``: the collectives it ends with (an all-reduce of partial sums, or a
    reduce-scatter: as the backend emits it), each priced in ``communication_s``;
    ``scatters``: the strategy reduce-scatters its result (whatever the backend emits).
    ``all_reduce_axes``: the mesh axes of each all-reduce it runs per result, one after
    another (empty when it has none); ``all_reduce_latency_s`` / ``all_reduce_bytes``:
    their latency part of ``communication_s`` and the bytes per device of the results
    they reduce (``_combining`` shares the latency between all-reduces XLA merges).
    """

    name: str
    out_specs: tuple[Spec, ...]
    in_specs: tuple[Spec | None, ...]
    compute_s: float
    communication_s: float
    temp_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    collectives: tuple[CollectiveStep, ...] = ()
    scatters: bool = False
    all_reduce_axes: tuple[tuple[int, ...], ...] = ()
    all_reduce_latency_s: float = 0.0
    all_reduce_bytes: int = 0

    @property
    def cost_s(self) -> float:
        return self.compute_s + self.communication_s


def _itemsize(aval) -> int:
    return aval.dtype.itemsize


def dtype_name(avals) -> str:
    """The first floating dtype of ``avals`` (None entries skipped), else float32: the
    rate an op's arithmetic runs at."""
    for a in avals:
        if a is not None and jax.numpy.issubdtype(a.dtype, np.floating):
            return a.dtype.name
    return "float32"


def _bytes(model: MeshCostModel, aval, spec: Spec | None) -> int:
    if aval is None or spec is None:
        return 0
    return model.bytes_per_device(tuple(aval.shape), _itemsize(aval), spec)


def input_strategies(specs: Sequence[Spec]) -> tuple[Strategy, ...]:
    """An argument or constant: one free strategy per layout it may arrive in."""
    return tuple(Strategy(spec_name(s), (s,), (), 0.0, 0.0) for s in specs)


def held_bytes(model: MeshCostModel, avals, specs) -> int:
    """Bytes per device of ``avals`` laid out as ``specs``, each read or written once
    (None avals or specs: none)."""
    return _traffic(model, avals, specs, ())


def _traffic(model, avals, specs, reads) -> int:
    """Memory bytes per device of reading/writing ``avals`` laid out as ``specs``, each
    ``reads[k]`` times (0: fusion keeps it in registers; missing entries: once)."""
    return int(sum(_bytes(model, a, s) * (reads[k] if k < len(reads) else 1)
                   for k, (a, s) in enumerate(zip(avals, specs))))


def replicated_strategy(in_avals, out_avals, model: MeshCostModel, flops: float = 0.0,
                        reads: Sequence[float] = ()) -> Strategy:
    """Everything whole on every device. ``reads``: per operand then per output, how many
    times it is memory traffic (see ``loop_strategies``)."""
    in_specs = tuple(None if a is None else replicated(len(a.shape)) for a in in_avals)
    out_specs = tuple(replicated(len(a.shape)) for a in out_avals)
    n = len(in_avals)
    nbytes = _traffic(model, in_avals, in_specs, tuple(reads[:n]))
    nbytes += _traffic(model, out_avals, out_specs, tuple(reads[n:]))
    compute = model.compute(flops, nbytes, dtype_name(list(in_avals) + list(out_avals)))
    return Strategy("replicated", out_specs, in_specs, compute, 0.0, flops=flops,
                    bytes_accessed=nbytes)


def loop_strategies(op: LoopOp, in_avals, out_avals, model: MeshCostModel,
                    reads: Sequence[float] = (), dot: DotOperands | None = None
                    ) -> tuple[Strategy, ...]:
    """Every valid assignment of mesh axes to the loops of ``op``, priced.

    Compute is a roofline over the op's flops and the bytes it reads and writes;
    ``reads`` (per operand, then per output) says how many times each is memory traffic:
    0 for values XLA's fusion keeps in registers, more than once for the operands of an
    op that XLA duplicates into several consumer fusions (``fusion.fusion_fanout``).
    ``dot``: a ``dot_general`` whose operands XLA copies into the order it runs in at
    some layouts (``dot_layouts``); each strategy moves those copies' bytes too."""
    mesh_shape = model.mesh_shape
    axes = [a for a, n in enumerate(mesh_shape) if n > 1]
    options = [None] + [l for l, ok in enumerate(op.splittable) if ok]
    dtype = dtype_name(list(in_avals) + list(out_avals))
    reductions = op.reduction_loops
    tensors = [(dims, a) for dims, a in zip(op.in_dims, in_avals)] + \
              [(dims, a) for dims, a in zip(op.out_dims, out_avals)]
    seen: dict = {}
    for assignment in itertools.product(options, repeat=len(axes)):
        groups: dict[int, list[int]] = {}
        for axis, loop in zip(axes, assignment):
            if loop is not None:
                groups.setdefault(loop, []).append(axis)
        if not _divides(op, groups, tensors, mesh_shape):
            continue
        # Axes sharing a loop split it in mesh order (major axis first), as specs do.
        loop_axes = {loop: tuple(group) for loop, group in groups.items()}
        if op.indexing is not None and op.indexing.permutes(loop_axes, axes):
            continue   # XLA adds collective-permutes no price here names: left out
        for strategy in _priced(op, loop_axes, in_avals, out_avals, reductions, model, dtype,
                                tuple(reads), dot):
            key = (strategy.out_specs, strategy.in_specs)
            if key not in seen or strategy.cost_s < seen[key].cost_s:
                seen[key] = strategy
    return tuple(seen.values())


def _divides(op, groups, tensors, mesh_shape) -> bool:
    for loop, group in groups.items():
        n = math.prod(mesh_shape[a] for a in group)
        if op.sizes[loop] % n:
            return False
        for dims, aval in tensors:
            if dims is None or aval is None:
                continue
            for l, size in zip(dims, aval.shape):
                if l == loop and size % n:
                    return False
    return True


def _tensor_spec(dims, loop_axes) -> Spec | None:
    if dims is None:
        return None
    return tuple(tuple(loop_axes.get(l, ())) if l is not None else () for l in dims)


def _dot_copies(model: MeshCostModel, dot: DotOperands | None, in_avals, in_specs
                ) -> tuple[int, ...]:
    """The operands XLA copies (at these layouts) into the order a dot runs them in, each
    copy reading the operand and writing it again, where it does not fuse into the
    elementwise equation making the operand (``DotOperands.fusible``). Measured with
    ``cost_analysis`` on jax 0.10 (CPU): a GPT's attention einsums copy their query, key,
    value and probabilities so (12 % of a 2-layer GPT's bytes accessed)."""
    if dot is None:
        return ()
    local = [model.shard_shape(tuple(a.shape), s) for a, s in zip(in_avals[:2], in_specs[:2])]
    return tuple(k for k, _ in copied_orders(dot.dimension_numbers, *local)
                 if not dot.fusible[k] and not dot.operand_fused[k])


def _priced(op, loop_axes, in_avals, out_avals, reductions, model, dtype, reads, dot=None):
    in_specs = tuple(_tensor_spec(d, loop_axes) for d in op.in_dims)
    in_specs = tuple(None if a is None else (s if s is not None else replicated(len(a.shape)))
                     for s, a in zip(in_specs, in_avals))
    out_specs = tuple(_tensor_spec(d, loop_axes) for d in op.out_dims)
    split = math.prod(model.mesh_shape[a] for axes in loop_axes.values() for a in axes)
    n = len(in_avals)
    traffic = _traffic(model, in_avals, in_specs, reads[:n])
    traffic += _traffic(model, out_avals, out_specs, reads[n:])
    copied = _dot_copies(model, dot, in_avals, in_specs)
    traffic += sum(COPY_READS * _bytes(model, in_avals[k], in_specs[k]) for k in copied)
    out_bytes = [_bytes(model, a, s) for a, s in zip(out_avals, out_specs)]
    expanded, temporary, more_flops = (0, 0, 1) if op.expansion is None else expansion_traffic(
        op, model.cluster, [_bytes(model, a, s) for a, s in zip(in_avals, in_specs)], out_bytes,
        reads, math.prod(model.mesh_shape[a] for a in loop_axes.get(0, ())), dot, copied)
    traffic += expanded
    flops = op.flops / split * more_flops
    measured = None if op.kernel is None or not model.cluster.kernel_seconds else \
        model.kernel_seconds(local_kernel_key(op.kernel, in_avals, in_specs, model))
    compute = model.compute(flops, traffic, dtype) if measured is None else measured
    work = dict(flops=flops, bytes_accessed=traffic)
    # one all-reduce per reduced loop, over the axes that split it: XLA's partitioner sums
    # a contraction split over two mesh axes in two dims (batch over "data", sequence over
    # "model") over one axis, then the other (measured on jax 0.10: two all-reduces of the
    # whole result); over two axes in one dim, in one all-reduce over both
    groups = tuple(tuple(sorted(axes)) for l, axes in sorted(loop_axes.items())
                   if l in reductions and axes)
    name = _assignment_name(loop_axes, reductions)
    if not groups:
        yield Strategy(name, out_specs, in_specs, compute, 0.0, **work, temp_bytes=temporary)
        return
    if op.pair_index_bytes:
        yield _pairs_gathered(name, op, out_specs, in_specs, in_avals, out_avals, groups,
                              compute, work, temporary, model)
        return
    all_reduces = tuple(CollectiveStep("all-reduce", axes, b, model.all_reduce(b, axes))
                        for b in out_bytes for axes in groups)
    comm = sum(s.seconds for s in all_reduces)
    moved = 2 * sum(s.nbytes for s in all_reduces)  # each reads its operand, writes its result
    work["bytes_accessed"] = traffic + moved
    # the unreduced partial result lives beside the all-reduce's result
    yield Strategy(name + " all-reduce", out_specs, in_specs,
                   compute, comm + moved / model.cluster.memory_bandwidth, **work,
                   temp_bytes=int(sum(out_bytes)) + temporary, collectives=all_reduces,
                   all_reduce_axes=groups,
                   all_reduce_latency_s=len(out_bytes) * sum(map(model.all_reduce_latency, groups)),
                   all_reduce_bytes=int(sum(out_bytes)))
    if len(out_avals) != 1:
        return
    # Reduce-scatter variant: one reduced axis also splits an output dim afterwards.
    out_aval, out_spec = out_avals[0], out_specs[0]

    def scattered(label: str, spec: Spec, steps: tuple[CollectiveStep, ...]) -> Strategy:
        # the unreduced partial, and where the backend emits an all-reduce then a slice,
        # that all-reduce's full-size result beside it
        temp = out_bytes[0] * (2 if model.cluster.reduce_scatter_as_all_reduce else 1) + \
            temporary
        moved = int(out_bytes[0] + sum(s.nbytes for s in steps))  # partial read, results written
        return Strategy(f"{name} reduce-scatter({label})", (spec,), in_specs, compute,
                        sum(s.seconds for s in steps) + moved / model.cluster.memory_bandwidth,
                        temp_bytes=temp, **dict(work, bytes_accessed=traffic + moved),
                        collectives=steps, scatters=True)

    # XLA's partitioner sums a dot or convolution over the scattering axis first when
    # every mesh axis splits one of its loops and the scattered dim is split by no other
    every_axis = op.contraction and {a for axes in loop_axes.values() for a in axes} >= \
        {a for a, n in enumerate(model.mesh_shape) if n > 1}
    for axis in sorted(a for axes in groups for a in axes):
        for d, size in enumerate(out_aval.shape):
            n = math.prod(model.mesh_shape[a] for a in out_spec[d]) * model.mesh_shape[axis]
            if size % n:
                continue
            yield scattered(f"dim {d}", out_spec[:d] + (out_spec[d] + (axis,),) + out_spec[d + 1:],
                            _scatter_steps(model, all_reduces, axis,
                                           two_passes=every_axis and not out_spec[d]))
    if len(groups) == 1 and len(groups[0]) > 1:
        for label, spec, steps in _scattered_over_group(model, out_aval.shape, out_spec,
                                                        out_bytes[0], all_reduces[0]):
            yield scattered(label, spec, steps)


def _pairs_gathered(name, op, out_specs, in_specs, in_avals, out_avals, groups, compute,
                    work, temporary, model: MeshCostModel) -> Strategy:
    """An ``argmax`` / ``argmin`` split over its reduced loop (the axes ``groups``): each
    device reduces its shard to a (value, index) pair per result, the pairs are
    all-gathered over those axes (the values' and the indices' arrays), and every device
    reduces them again (``LoopOp.pair_index_bytes``)."""
    local = _bytes(model, out_avals[0], out_specs[0]) // out_avals[0].dtype.itemsize
    steps = []
    for axes in groups:
        shards = math.prod(model.mesh_shape[a] for a in axes)
        for itemsize in (in_avals[0].dtype.itemsize, op.pair_index_bytes):
            nbytes = int(local * shards * itemsize)
            steps.append(CollectiveStep("all-gather", axes, nbytes,
                                        model.all_gather(nbytes, axes)))
    moved = 2 * sum(s.nbytes for s in steps)   # each gather writes its pairs, then read
    return Strategy(name + " pairs all-gathered", out_specs, in_specs, compute,
                    sum(s.seconds for s in steps) + moved / model.cluster.memory_bandwidth,
                    **dict(work, bytes_accessed=work["bytes_accessed"] + moved),
                    temp_bytes=sum(s.nbytes for s in steps) + temporary, collectives=tuple(steps))


def _scattered_over_group(model: MeshCostModel, shape: Sequence[int], out_spec: Spec,
                          nbytes: int, all_reduce: CollectiveStep):
    """(label, layout, collectives) of each variant of a strategy summing one loop over
    several mesh axes whose result is left split over all of them, in one dim (as XLA's
    partitioner slices a weight gradient contracted over a batch split over
    ``(data, model)`` into the weight's layout split the same way): one reduce-scatter
    over the axes, or on a backend without (the CPU) the all-reduce of the whole result,
    then a slice (measured on jax 0.10, CPU, 2x4: one all-reduce over both axes of each
    [1024, 1024] gradient)."""
    axes = all_reduce.axes
    split = math.prod(model.mesh_shape[a] for a in axes)
    for d, size in enumerate(shape):
        if out_spec[d] or size % split:
            continue
        if model.cluster.reduce_scatter_as_all_reduce:
            steps = (all_reduce,)
        else:
            steps = (CollectiveStep("reduce-scatter", axes, nbytes // split,
                                    model.reduce_scatter(nbytes, axes)),)
        yield (f"dim {d} over {'+'.join(map(str, axes))}",
               out_spec[:d] + (axes,) + out_spec[d + 1:], steps)


def _scatter_steps(model: MeshCostModel, all_reduces: tuple[CollectiveStep, ...], axis: int,
                   two_passes: bool) -> tuple[CollectiveStep, ...]:
    """The collectives that reduce a partial result over its reduction groups (one
    all-reduce of the whole result per group: ``all_reduces``) and leave it split by
    ``axis`` (a member of the group ``own``), as XLA's partitioner emits them.

    ``two_passes`` (a dot or convolution every mesh axis splits a loop of, scattered on a
    dim no axis splits yet): XLA sums over ``axis`` first (the whole partial), slices, then
    over every other reduced axis at once (the slice). Measured on jax 0.10 (CPU): a
    weight gradient contracted over both axes of 2x4, in one dim or two, and scattered
    over either compiles to an all-reduce over that axis of the whole result and one over
    the other of the slice; on 2x2x2, contracted over all three axes (or over two, the
    third splitting another dim), to one over the scattering axis of the whole result and
    one over the other two (or the other one) of the slice. A backend with reduce-scatters
    (``reduce_scatter_as_all_reduce`` off) runs the first as one. Otherwise, on the CPU,
    the groups are all-reduced whole and the slice follows (a reduce_sum, or a dot
    scattered on a dim already split, compiles so); elsewhere the rest of the groups are
    all-reduced, then reduce-scattered."""
    own = next(step for step in all_reduces if axis in step.axes)
    nbytes, rest = own.nbytes, tuple(a for a in own.axes if a != axis)
    sliced = nbytes // model.mesh_shape[axis]
    others = tuple(sorted(a for step in all_reduces for a in step.axes if a != axis))
    if model.cluster.reduce_scatter_as_all_reduce:
        if not (two_passes and others):
            return all_reduces
        first = CollectiveStep("all-reduce", (axis,), nbytes, model.all_reduce(nbytes, (axis,)))
    else:
        first = CollectiveStep("reduce-scatter", (axis,), sliced,
                               model.reduce_scatter(nbytes, (axis,)))
        if not two_passes:  # each group's all-reduce, own's without the axis
            return tuple(step if step is not own else CollectiveStep(
                "all-reduce", rest, nbytes, model.all_reduce(nbytes, rest))
                for step in all_reduces if step is not own or rest) + (first,)
        if not others:
            return (first,)
    return first, CollectiveStep("all-reduce", others, sliced, model.all_reduce(sliced, others))


def _assignment_name(loop_axes, reductions) -> str:
    if not loop_axes:
        return "replicated"
    parts = []
    for loop in sorted(loop_axes):
        tag = "r" if loop in reductions else "l"
        parts.append(f"{tag}{loop}:{'+'.join(map(str, loop_axes[loop]))}")
    return " ".join(parts)


def axis_labels(strategies: Sequence[Strategy], mesh_shape) -> np.ndarray:
    """Integers (strategies × mesh axes of size > 1): what each axis does under each
    strategy, numbered per call, equal exactly when the axis splits the same dim of every
    operand and result in both (the ILP searches very large problems one axis move at a
    time: ``ilp._neighbourhood``)."""
    axes = [a for a, n in enumerate(mesh_shape) if n > 1]
    numbers: dict = {}
    rows = []
    for s in strategies:
        specs = [spec for spec in s.in_specs if spec is not None] + list(s.out_specs)
        rows.append([numbers.setdefault(
            (a, tuple(next((d for d, dim in enumerate(spec) if a in dim), -1) for spec in specs)),
            len(numbers)) for a in axes])
    return np.array(rows, dtype=np.int64).reshape(len(strategies), len(axes))


def spec_name(spec: Spec) -> str:
    return "[" + ", ".join("+".join(map(str, axes)) if axes else "-" for axes in spec) + "]"
