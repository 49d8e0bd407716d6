"""Per-primitive sharding rules, written as loop nests.

Each rule describes a primitive as a set of *loops* (iteration-space dims) and says,
for every operand and output dim, which loop it follows. A strategy then assigns mesh
axes to loops: an operand/output dim is split by the axes of its loop; a loop that no
output follows is a *reduction* loop, and splitting it leaves partial results that need
an all-reduce. This one description covers elementwise ops, broadcasts, reductions,
transposes, reshapes, dots, convolutions, pooling windows, gathers, scatters and random
bits (the XLA auto-sharding / GSPMD view). A rule returns ``None`` when it does not
recognise the equation's form; the planner then runs the equation replicated.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from autoshard.ir.jax_compat import partitionable_random_bits

from .indexed_loops import IndexedLoops
from .linalg_rules import RULES as LINALG_RULES
from .loop_op import LoopOp
from .loop_op import rank_of as _rank
from .loop_op import size_of as _size
from .window_rules import conv, reduce_window, select_and_gather_add, select_and_scatter_add


def _operand_dims(aval, out_aval):
    """Loops of an operand that broadcasts implicitly against the output (size-1 dims)."""
    if aval is None or _rank(aval) == 0:
        return None
    return tuple(d if aval.shape[d] == out_aval.shape[d] else None for d in range(_rank(aval)))


def _broadcastable(aval, out_aval) -> bool:
    return aval is None or _rank(aval) == 0 or (
        _rank(aval) == _rank(out_aval)
        and all(a in (b, 1) for a, b in zip(aval.shape, out_aval.shape)))


def _same_loops(out_aval, in_avals, splittable=None) -> LoopOp:
    """Elementwise: every non-scalar operand follows the output dim for dim."""
    rank = _rank(out_aval)
    in_dims = tuple(_operand_dims(a, out_aval) for a in in_avals)
    return LoopOp(tuple(out_aval.shape), tuple(splittable or (True,) * rank), in_dims,
                  (tuple(range(rank)),), flops=float(_size(out_aval)))


def elementwise(eqn, in_avals, out_avals):
    out = out_avals[0]
    if any(a.shape != out.shape for a in out_avals):
        return None
    if not all(_broadcastable(a, out) for a in in_avals):
        return None
    op = _same_loops(out, in_avals)
    return dataclasses.replace(op, out_dims=(op.out_dims[0],) * len(out_avals))


def broadcast_in_dim(eqn, in_avals, out_avals):
    out, operand = out_avals[0], in_avals[0]
    rank = _rank(out)
    in_dims = [None] * len(in_avals)
    if operand is not None:
        in_dims[0] = tuple(d if operand.shape[j] == out.shape[d] else None
                           for j, d in enumerate(eqn.params["broadcast_dimensions"]))
        if _rank(operand) == 0:
            in_dims[0] = None
    return LoopOp(tuple(out.shape), (True,) * rank, tuple(in_dims), (tuple(range(rank)),),
                  flops=0.0)


_REDUCE_SPLITTABLE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                      "reduce_and", "reduce_or", "reduce_xor"}
#: reductions jax lowers as a reduce of the values and of an iota of their indices; split
#: as (value, index) pairs (``LoopOp.pair_index_bytes``)
INDEXED_REDUCTIONS = frozenset({"argmax", "argmin"})


def reduction(eqn, in_avals, out_avals):
    operand = in_avals[0]
    axes = tuple(eqn.params["axes"])
    rank = _rank(operand)
    kept = tuple(d for d in range(rank) if d not in axes)
    name = eqn.primitive.name
    splittable = tuple(d not in axes or name in _REDUCE_SPLITTABLE or name in INDEXED_REDUCTIONS
                       for d in range(rank))
    pair = np.dtype(eqn.params["index_dtype"]).itemsize if name in INDEXED_REDUCTIONS else 0
    return LoopOp(tuple(operand.shape), splittable, (tuple(range(rank)),), (kept,),
                  flops=float(_size(operand)), pair_index_bytes=pair)


def generic_reduce(eqn, in_avals, out_avals):
    """``lax.reduce`` with its own computation: reduced dims stay whole."""
    n = len(out_avals)
    operand = in_avals[0]
    axes = tuple(eqn.params["dimensions"])
    rank = _rank(operand)
    kept = tuple(d for d in range(rank) if d not in axes)
    ident = tuple(range(rank))
    in_dims = (ident,) * n + (None,) * (len(in_avals) - n)
    return LoopOp(tuple(operand.shape), tuple(d not in axes for d in range(rank)), in_dims,
                  (kept,) * n, flops=float(_size(operand)))


def along_axis(param: str):
    """Ops that scan or sort along one axis: that axis stays whole, the rest is free."""
    def rule(eqn, in_avals, out_avals):
        out = out_avals[0]
        axis = eqn.params[param]
        rank = _rank(out)
        if not all(_broadcastable(a, out) for a in in_avals):
            return None
        op = _same_loops(out, in_avals, splittable=[d != axis for d in range(rank)])
        return dataclasses.replace(op, out_dims=(op.out_dims[0],) * len(out_avals))
    return rule


def top_k(eqn, in_avals, out_avals):
    """``top_k`` (along the last dim) and ``approx_top_k`` (along its
    ``reduction_dimension``): that dim stays whole, every other dim splits."""
    operand = in_avals[0]
    rank = _rank(operand)
    axis = eqn.params.get("reduction_dimension", -1) % rank
    dims = tuple(None if d == axis else d - (d > axis) for d in range(rank))
    sizes = tuple(n for d, n in enumerate(operand.shape) if d != axis)
    return LoopOp(sizes, (True,) * len(sizes), (dims,), (dims, dims), flops=float(_size(operand)))


def transpose(eqn, in_avals, out_avals):
    operand = in_avals[0]
    perm = tuple(eqn.params["permutation"])
    rank = _rank(operand)
    return LoopOp(tuple(operand.shape), (True,) * rank, (tuple(range(rank)),), (perm,))


def squeeze(eqn, in_avals, out_avals):
    operand = in_avals[0]
    dropped = {d % _rank(operand) for d in eqn.params["dimensions"]}
    rank = _rank(operand)
    kept = tuple(d for d in range(rank) if d not in dropped)
    return LoopOp(tuple(operand.shape), (True,) * rank, (tuple(range(rank)),), (kept,))


def reshape(eqn, in_avals, out_avals):
    """Dims grouped by equal running products; the major dims of a group share a loop.

    A split of a merged dim passes through when it divides the leading factor:
    ``[B, S, D] → [B*S, D]`` keeps a split of ``B`` on ``B*S``. With ``dimensions`` (the
    operand is transposed by that permutation first, as in a grouped convolution's
    gradient), the groups are formed over the transposed operand and each loop is
    mapped back to the operand dim it came from.
    """
    perm = eqn.params.get("dimensions")
    if perm is None:
        perm = tuple(range(_rank(in_avals[0])))
    a = tuple(in_avals[0].shape[d] for d in perm)
    b = tuple(out_avals[0].shape)
    in_dims: list = [None] * len(a)
    out_dims: list = [None] * len(b)
    sizes: list[int] = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] == 1:
            i += 1
            continue
        if b[j] == 1:
            j += 1
            continue
        i0, j0, pa, pb = i, j, a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa *= a[i]
                i += 1
            else:
                pb *= b[j]
                j += 1
        in_dims[i0] = out_dims[j0] = len(sizes)
        sizes.append(math.gcd(a[i0], b[j0]))
    operand_dims: list = [None] * len(a)
    for i, d in enumerate(perm):
        operand_dims[d] = in_dims[i]
    return LoopOp(tuple(sizes), (True,) * len(sizes), (tuple(operand_dims),),
                  (tuple(out_dims),))


#: dtypes of the dots some backends run in float32 (``Cluster.low_precision_dots_in_f32``)
LOW_PRECISION = frozenset({"bfloat16", "float16"})


def upcast_operands(out, lhs, rhs) -> tuple[bool, bool]:
    """Per operand of a ``dot_general`` of result ``out`` (avals), whether a backend that
    runs low-precision dots in float32 (``Cluster.low_precision_dots_in_f32``) converts it
    first: every operand of a dot of low-precision result, and a low-precision operand
    beside a float32 one (jax 0.10.2, CPU: bf16 operands of a float32 result are read as
    they are)."""
    if out.dtype.name in LOW_PRECISION:
        return (True, True)
    low = (lhs.dtype.name in LOW_PRECISION, rhs.dtype.name in LOW_PRECISION)
    return low if low[0] != low[1] else (False, False)


def dot_general(eqn, in_avals, out_avals):
    lhs, rhs = in_avals
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lfree = [d for d in range(_rank(lhs)) if d not in lc and d not in lb]
    rfree = [d for d in range(_rank(rhs)) if d not in rc and d not in rb]
    sizes, ldims, rdims, odims = [], [None] * _rank(lhs), [None] * _rank(rhs), []
    for l, r in zip(lb, rb):
        ldims[l] = rdims[r] = len(sizes)
        odims.append(len(sizes))
        sizes.append(lhs.shape[l])
    for l in lfree:
        ldims[l] = len(sizes)
        odims.append(len(sizes))
        sizes.append(lhs.shape[l])
    for r in rfree:
        rdims[r] = len(sizes)
        odims.append(len(sizes))
        sizes.append(rhs.shape[r])
    for l, r in zip(lc, rc):
        ldims[l] = rdims[r] = len(sizes)
        sizes.append(lhs.shape[l])
    return LoopOp(tuple(sizes), (True,) * len(sizes), (tuple(ldims), tuple(rdims)),
                  (tuple(odims),), flops=2.0 * math.prod(sizes), contraction=True,
                  expansion="f32_dot" if any(upcast_operands(out_avals[0], lhs, rhs)) else None)


def ragged_dot(eqn, in_avals, out_avals):
    """``lax.ragged_dot`` and the two its gradient makes, rows [m] grouped in order by
    ``group_sizes`` [g]: each row of ``lhs`` [m, k] times the [k, n] matrix of its group in
    ``rhs`` [g, k, n] (or [g, n, k]: the input gradient), giving [m, n]; or the rows
    contracted group by group, ``lhs`` [m, k] and ``rhs`` [m, n] giving [g, k, n] (the
    weight gradient). The rows split (XLA partitions the ragged rows itself: measured
    exact on 8 devices; contracted, with partial sums), as do k and n; the groups stay
    whole. Flops as XLA's expansion computes them, a dense dot per group of every row
    under a mask (``cost_analysis``). Other forms (ragged batch dims) give None."""
    dn = eqn.params["ragged_dot_dimension_numbers"]
    ((lhs_contract,), (rhs_contract,)), batch = dn.dot_dimension_numbers
    lhs, rhs = in_avals[:2]
    if any(batch) or _rank(lhs) != 2 or tuple(dn.lhs_ragged_dimensions) != (0,):
        return None
    (m, k), g = lhs.shape, in_avals[2].shape[0]
    if tuple(dn.rhs_group_dimensions) == (0,) and _rank(rhs) == 3 and lhs_contract == 1:
        free = 3 - rhs_contract  # rhs's output-feature dim (1 or 2)
        n = rhs.shape[free]
        rhs_dims = [None, None, None]
        rhs_dims[rhs_contract], rhs_dims[free] = 1, 2
        return LoopOp((m, k, n), (True,) * 3, ((0, 1), tuple(rhs_dims), (None,)), ((0, 2),),
                      flops=2.0 * m * k * n * g)
    if not dn.rhs_group_dimensions and _rank(rhs) == 2 and (lhs_contract, rhs_contract) == (0, 0):
        n = rhs.shape[1]
        return LoopOp((m, k, n, g), (True, True, True, False), ((0, 1), (0, 2), (3,)),
                      ((3, 1, 2),), flops=2.0 * m * k * n * g)
    return None


def concatenate(eqn, in_avals, out_avals):
    out = out_avals[0]
    dim = eqn.params["dimension"]
    rank = _rank(out)
    ident = tuple(None if d == dim else d for d in range(rank))
    in_dims = tuple(None if a is None else ident for a in in_avals)
    return LoopOp(tuple(out.shape), tuple(d != dim for d in range(rank)), in_dims,
                  (tuple(range(rank)),))


def stack(eqn, in_avals, out_avals):
    """``jnp.stack``: operand ``k`` is slice ``k`` of the new ``axis``, which stays whole;
    the other dims follow the operands'."""
    out = out_avals[0]
    axis = eqn.params["axis"]
    rank = _rank(out)
    dims = tuple(d for d in range(rank) if d != axis)
    return LoopOp(tuple(out.shape), tuple(d != axis for d in range(rank)),
                  tuple(None if a is None or _rank(a) == 0 else dims for a in in_avals),
                  (tuple(range(rank)),))


def unstack(eqn, in_avals, out_avals):
    """``jnp.unstack``: result ``k`` is slice ``k`` of ``axis``, which stays whole."""
    operand = in_avals[0]
    rank = _rank(operand)
    axis = eqn.params["axis"] % rank
    dims = tuple(d for d in range(rank) if d != axis)
    return LoopOp(tuple(operand.shape), tuple(d != axis for d in range(rank)),
                  (tuple(range(rank)),), (dims,) * len(out_avals))


def identities(eqn, in_avals, out_avals):
    """Ops that hand each operand on as the same-numbered result (``device_put``, of one
    array or of a pytree's leaves): each operand's dims are loops of their own, which its
    result follows."""
    sizes, in_dims = [], []
    for operand, out in zip(in_avals, out_avals, strict=True):
        if operand is None or tuple(operand.shape) != tuple(out.shape):
            return None
        in_dims.append(tuple(range(len(sizes), len(sizes) + _rank(operand))) or None)
        sizes.extend(operand.shape)
    return LoopOp(tuple(sizes), (True,) * len(sizes), tuple(in_dims),
                  tuple(d or () for d in in_dims))


def split(eqn, in_avals, out_avals):
    """``lax.split`` (the transpose of a concatenate): the split axis stays whole."""
    operand = in_avals[0]
    axis = eqn.params["axis"]
    rank = _rank(operand)
    out = tuple(None if d == axis else d for d in range(rank))
    return LoopOp(tuple(operand.shape), tuple(d != axis for d in range(rank)),
                  (tuple(range(rank)),), (out,) * len(out_avals))


def pad(eqn, in_avals, out_avals):
    out = out_avals[0]
    rank = _rank(out)
    whole = [tuple(c) != (0, 0, 0) for c in eqn.params["padding_config"]]
    dims = tuple(None if whole[d] else d for d in range(rank))
    return LoopOp(tuple(out.shape), tuple(not w for w in whole), (dims, None),
                  (tuple(range(rank)),))


def slice_rule(eqn, in_avals, out_avals):
    operand, out = in_avals[0], out_avals[0]
    rank = _rank(out)
    strides = eqn.params.get("strides") or (1,) * rank
    full = [eqn.params["start_indices"][d] == 0 and operand.shape[d] == out.shape[d]
            and strides[d] == 1 for d in range(rank)]
    dims = tuple(d if full[d] else None for d in range(rank))
    return LoopOp(tuple(out.shape), tuple(full), (dims,), (tuple(range(rank)),))


def dynamic_slice(eqn, in_avals, out_avals):
    operand, out = in_avals[0], out_avals[0]
    rank = _rank(out)
    full = [operand.shape[d] == out.shape[d] for d in range(rank)]
    dims = tuple(d if full[d] else None for d in range(rank))
    return LoopOp(tuple(out.shape), tuple(full), (dims,) + (None,) * (len(in_avals) - 1),
                  (tuple(range(rank)),))


def dynamic_update_slice(eqn, in_avals, out_avals):
    operand, update = in_avals[0], in_avals[1]
    rank = _rank(operand)
    full = [operand.shape[d] == update.shape[d] for d in range(rank)]
    dims = tuple(d if full[d] else None for d in range(rank))
    ident = tuple(range(rank))
    return LoopOp(tuple(operand.shape), tuple(full),
                  (ident, dims) + (None,) * (len(in_avals) - 2), (ident,))


def tile(eqn, in_avals, out_avals):
    """Every dim splits: a dim tiled more than once reads its operand dim whole."""
    operand, out = in_avals[0], out_avals[0]
    rank = _rank(out)
    dims = tuple(d if operand.shape[d] == out.shape[d] else None for d in range(rank))
    return LoopOp(tuple(out.shape), (True,) * rank, (dims,), (tuple(range(rank)),))


def fft(eqn, in_avals, out_avals):
    """Whole: XLA's SPMD partitioner (jax 0.10) gathers an FFT's operand onto every device
    (measured: a batch-split ``rfft``, its ``irfft`` and their gradient each all-gathered
    their operand), so a split is none of its strategies. The rule prices it as it runs:
    flops as XLA's ``cost_analysis`` counts them, 8 per operand element per factor of 2
    in each transform length."""
    operand, out = in_avals[0], out_avals[0]
    lengths = eqn.params["fft_lengths"]
    batch = _rank(out) - len(lengths)
    sizes = (*out.shape[:batch], *operand.shape[batch:], *out.shape[batch:])
    transformed = len(lengths)
    in_dims = (*range(batch), *range(batch, batch + transformed))
    out_dims = (*range(batch), *range(batch + transformed, batch + 2 * transformed))
    factors = math.prod(max(int(n).bit_length() - 1, 0) for n in lengths)
    return LoopOp(sizes, (False,) * (batch + 2 * transformed), (in_dims,),
                  (out_dims,), flops=8.0 * factors * _size(operand))


def rev(eqn, in_avals, out_avals):
    out = out_avals[0]
    rank = _rank(out)
    flipped = set(eqn.params["dimensions"])
    return _same_loops(out, in_avals, splittable=[d not in flipped for d in range(rank)])


def iota(eqn, in_avals, out_avals):
    out = out_avals[0]
    rank = _rank(out)
    return LoopOp(tuple(out.shape), (True,) * rank, tuple(None for _ in in_avals),
                  (tuple(range(rank)),))


def gather(eqn, in_avals, out_avals):
    """Embedding-style gathers: indexed operand dim (e.g. vocab) as a reduction loop,
    full-slice operand dims pass through, index batch dims map to output batch dims."""
    operand, indices = in_avals[0], in_avals[1]
    out = out_avals[0]
    dn = eqn.params["dimension_numbers"]
    slice_sizes = eqn.params["slice_sizes"]
    if indices is None:
        return None
    sizes, odims = [], [None] * _rank(out)
    op_dims, idx_dims = [None] * _rank(operand), [None] * _rank(indices)
    splittable = []
    offset_operand_dims = [d for d in range(_rank(operand)) if d not in dn.collapsed_slice_dims]
    for out_d, op_d in zip(dn.offset_dims, offset_operand_dims):
        if slice_sizes[op_d] == operand.shape[op_d] and op_d not in dn.start_index_map:
            op_dims[op_d] = odims[out_d] = len(sizes)
            sizes.append(operand.shape[op_d])
            splittable.append(True)
    batch_out = [d for d in range(_rank(out)) if d not in dn.offset_dims]
    for k, out_d in enumerate(batch_out):  # index vector dim is the last dim of indices
        idx_dims[k] = odims[out_d] = len(sizes)
        if k in dn.start_indices_batching_dims:  # operand batch dim runs with it
            op_dims[dn.operand_batching_dims[dn.start_indices_batching_dims.index(k)]] = len(sizes)
        sizes.append(out.shape[out_d])
        splittable.append(True)
    indexed = [d for d in dn.start_index_map if d in dn.collapsed_slice_dims]
    loops = None
    if len(indexed) == 1 and len(dn.start_index_map) == 1:
        if not dn.operand_batching_dims:   # offset loops: the operand's loops so far
            loops = IndexedLoops(len(sizes), tuple(idx_dims[:len(batch_out)]),
                                 tuple(l for l in op_dims if l is not None))
        op_dims[indexed[0]] = len(sizes)
        sizes.append(operand.shape[indexed[0]])
        splittable.append(True)
    return LoopOp(tuple(sizes), tuple(splittable), (tuple(op_dims), tuple(idx_dims)),
                  (tuple(odims),), indexing=loops)


def scatter(eqn, in_avals, out_avals):
    """Scatter(-add) as used by embedding gradients: indexed operand dim splits with no
    communication, window dims pass through to updates, and for scatter-add the
    update batch dims are reduction loops (partial sums → all-reduce)."""
    operand, indices, updates = in_avals[:3]
    if operand is None or indices is None or updates is None:
        return None
    dn = eqn.params["dimension_numbers"]
    is_add = eqn.primitive.name == "scatter-add"
    rank = _rank(operand)
    sizes, splittable = [], []
    op_dims = [None] * rank
    upd_dims, idx_dims = [None] * _rank(updates), [None] * _rank(indices)
    window_operand_dims = [d for d in range(rank) if d not in dn.inserted_window_dims
                           and d not in dn.operand_batching_dims]
    for upd_d, op_d in zip(dn.update_window_dims, window_operand_dims):
        op_dims[op_d] = len(sizes)
        if updates.shape[upd_d] == operand.shape[op_d]:
            upd_dims[upd_d] = len(sizes)
        sizes.append(operand.shape[op_d])
        splittable.append(updates.shape[upd_d] == operand.shape[op_d]
                          and op_d not in dn.scatter_dims_to_operand_dims)
    indexed = [d for d in dn.scatter_dims_to_operand_dims if d in dn.inserted_window_dims]
    scatter_upd = [d for d in range(_rank(updates)) if d not in dn.update_window_dims]
    for k, upd_d in enumerate(scatter_upd):
        upd_dims[upd_d] = idx_dims[k] = len(sizes)
        if k in dn.scatter_indices_batching_dims:
            # a batch dim: operand rows receive only their own updates — no reduction
            op_dims[dn.operand_batching_dims[dn.scatter_indices_batching_dims.index(k)]] = \
                len(sizes)
            splittable.append(True)
        else:
            splittable.append(is_add)
        sizes.append(updates.shape[upd_d])
    windows = tuple(l for l in op_dims if l is not None)
    single = len(indexed) == 1 and len(dn.scatter_dims_to_operand_dims) == 1
    for d in range(rank):
        if op_dims[d] is None:
            op_dims[d] = len(sizes)
            sizes.append(operand.shape[d])
            splittable.append(d in indexed and single)
    loops = None if not single or dn.operand_batching_dims else \
        IndexedLoops(op_dims[indexed[0]], tuple(idx_dims[:len(scatter_upd)]), windows)
    ident = tuple(op_dims)
    return LoopOp(tuple(sizes), tuple(splittable),
                  (ident, tuple(idx_dims), tuple(upd_dims)), (ident,),
                  flops=float(_size(updates)), indexing=loops)



# Integer operations per random element of one threefry2x32 block: 20 rounds of add,
# rotate (two shifts and an or) and xor on two words, plus five key injections.
_THREEFRY_OPS = 120


def random_bits(eqn, in_avals, out_avals):
    """Random bits of threefry keys (output shape: the key array's shape, then ``shape``):
    one loop per output dim, all splittable; the key's dims (a batch of keys) follow the
    leading loops, a single key stays whole. With ``jax_threefry_partitionable`` (the
    default) each element's bits depend only on its key and its position, so every device
    computes just its own part and gets exactly the replicated numbers. Other key kinds
    (``rbg``: XLA's RngBitGenerator, which XLA does not split) and the flag off give
    ``None`` (run replicated)."""
    key, out = in_avals[0], out_avals[0]
    if not partitionable_random_bits(key.dtype):
        return None
    rank = _rank(out)
    return LoopOp(tuple(out.shape), (True,) * rank, (tuple(range(_rank(key))),),
                  (tuple(range(rank)),), flops=float(_THREEFRY_OPS * _size(out)), expansion="threefry")


ELEMENTWISE = frozenset("""
abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e
bitcast_convert_type cbrt ceil clamp
clz complex conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2
eq_to expm1 floor ge gt igamma igamma_grad_a igammac imag integer_pow is_finite le le_to lgamma log
log1p logistic lt lt_to max min
mul mulhi ne neg nextafter not or polygamma population_count pow random_gamma_grad real
reduce_precision regularized_incomplete_beta rem round rsqrt
select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square stop_gradient
sub tan tanh xor zeta optimization_barrier sharding_constraint reshard name
""".split())

RULES: dict[str, Callable] = {name: elementwise for name in ELEMENTWISE}
RULES.update({
    "broadcast_in_dim": broadcast_in_dim,
    "reduce_sum": reduction, "reduce_max": reduction, "reduce_min": reduction,
    "reduce_prod": reduction, "reduce_and": reduction, "reduce_or": reduction,
    "reduce_xor": reduction, "argmax": reduction, "argmin": reduction,
    "reduce": generic_reduce,
    "cumsum": along_axis("axis"), "cumprod": along_axis("axis"), "cummax": along_axis("axis"),
    "cummin": along_axis("axis"), "cumlogsumexp": along_axis("axis"),
    "sort": along_axis("dimension"), "top_k": top_k, "approx_top_k": top_k,
    "transpose": transpose, "squeeze": squeeze, "reshape": reshape, "rev": rev, "iota": iota,
    # the placeholders a differentiated cond makes for the residuals of the branch not taken
    "empty": iota, "empty2": iota,
    "tile": tile, "fft": fft,
    **LINALG_RULES,
    "dot_general": dot_general, "ragged_dot_general": ragged_dot, "conv_general_dilated": conv,
    "concatenate": concatenate, "stack": stack, "unstack": unstack, "split": split,
    "device_put": identities, "pad": pad, "slice": slice_rule,
    "dynamic_slice": dynamic_slice, "dynamic_update_slice": dynamic_update_slice,
    "gather": gather, "scatter-add": scatter, "scatter": scatter, "scatter-mul": scatter,
    "scatter-min": scatter, "scatter-max": scatter, "scatter-sub": scatter,
    "reduce_window_max": reduce_window, "reduce_window_min": reduce_window,
    "reduce_window_sum": reduce_window, "reduce_window": reduce_window,
    "select_and_scatter_add": select_and_scatter_add,
    "select_and_gather_add": select_and_gather_add,
    "random_bits": random_bits,
    "threefry2x32": elementwise,
})

# Primitives XLA fuses into the loop of their consumer (elementwise, broadcast and layout
# ops), and consumers that take such a producer into their own loop (those, reductions as
# input fusions, and gathers, which compute it at the elements they take: a cross
# entropy's log-probabilities, measured on jax 0.10). A value made by the first for
# consumers all of the second kind lives in registers, never in memory: see
# ``fusion.fused_values``.
# ``random_bits``: jax lowers threefry to elementwise integer ops that XLA fuses into the
# bits' readers (on the CPU, the last of its rounds, after a loop: ``Cluster.threefry_in_loops``)
FUSIBLE = ELEMENTWISE | frozenset({"broadcast_in_dim", "reshape", "squeeze", "transpose", "rev",
                                   "iota", "concatenate", "stack", "random_bits", "pad"})
FUSING_CONSUMERS = FUSIBLE | frozenset({"reduce_sum", "reduce_max", "reduce_min",
                                        "reduce_prod", "argmax", "argmin", "gather"})


def fusible(eqn) -> bool:
    """Whether XLA fuses ``eqn`` into the loops of its readers: a ``FUSIBLE`` primitive, or
    a ``dot_general`` that contracts nothing (an outer product, such as a per-example
    weight gradient, which XLA's simplifier rewrites as a broadcast multiply; measured on
    jax 0.10: ``einsum("bi,bj->bij")`` into a sum compiles to one loop fusion)."""
    name = eqn.primitive.name
    return name in FUSIBLE or name == "dot_general" and not eqn.params["dimension_numbers"][0][0]


def fusing_consumer(eqn) -> bool:
    """Whether ``eqn`` takes a fusible producer into its own loop (``FUSING_CONSUMERS``)."""
    return eqn.primitive.name in FUSING_CONSUMERS or fusible(eqn)

# Primitives that run replicated on purpose (no warning): RNG plumbing and the like,
# ``random_bits`` where its rule declines (keys other than partitionable threefry),
# host callbacks (host code: jax runs them on one device; ``graph.HOST_CALLBACKS``),
# ``platform_index`` (the scalar a ``lax.platform_dependent`` branches on) and
# ``random_gamma`` (rejection sampling in a loop: split, XLA all-reduces the loop's
# condition every iteration, a count no price knows; measured on 8 devices).
REPLICATED_QUIETLY = frozenset("""
random_bits random_seed random_wrap random_unwrap random_fold_in random_split
rng_bit_generator rng_uniform debug_callback debug_print pure_callback io_callback
platform_index random_gamma
""".split())

# Control flow: a single node with conservative (replicated) strategies and a warning.
CONTROL_FLOW = frozenset({"scan", "while", "cond"})


def loop_op(eqn, in_avals: Sequence, out_avals: Sequence) -> LoopOp | None:
    """The loop description of ``eqn``, or ``None`` when it must run replicated."""
    rule = RULES.get(eqn.primitive.name)
    if rule is None:
        return None
    try:
        op = rule(eqn, in_avals, out_avals)
    except (KeyError, AttributeError, IndexError, TypeError, ValueError):
        return None
    return op

