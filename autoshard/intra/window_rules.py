"""Sharding rules of windowed ops: convolutions (plain, grouped, depthwise, and their
gradients) and pooling windows (``reduce_window``, max-pool's gradients). See
``op_rules`` for what a rule is."""
from __future__ import annotations

import dataclasses
import math

from .kernels import kernel_name
from .loop_op import LoopOp
from .loop_op import rank_of as _rank
from .loop_op import size_of as _size


def conv(eqn, in_avals, out_avals):
    """Convolution as three loops; spatial dims stay whole.

    Plain (``feature_group_count == batch_group_count == 1``): batch N (lhs and output
    batch dims), output feature O (rhs and output feature dims), input feature I (lhs and
    rhs feature dims; a reduction loop). All three split.

    ``feature_group_count`` G > 1 (grouped; depthwise when G equals the input features):
    the input features are G contiguous groups of Cg = I/G, the output features G
    contiguous groups of O/G, and output group g reads only input group g. The feature
    loop is the *group* loop, of size G: the output and rhs output-feature dims and the
    lhs feature dim follow it, so a split by n (which must divide G) gives each device
    G/n whole groups: their input features, filters and output features, with no
    communication. The rhs input-feature dim (Cg, summed within a group) follows no
    loop: the lhs feature dim already follows the group loop. Only depthwise
    convolutions (Cg = 1, any channel multiplier) split: XLA's SPMD partitioner (jax
    0.10) runs them as a batched dot, but gathers a grouped convolution with Cg > 1
    whole onto every device however its batch or groups are split, so there both loops
    stay whole and the planner prices the gather.

    ``batch_group_count`` B > 1 (the filter gradient of a grouped convolution): the lhs
    batch dim is B contiguous groups and output feature group b reads only lhs batch
    group b. The group loop (size B) is followed by the lhs batch dim and the rhs and
    output feature dims; the output batch dim (the lhs batch within a group) stays
    whole; the input-feature loop (the gradient's sum over the data batch) is a
    splittable reduction, as in the plain case.
    """
    lhs, rhs = in_avals
    out = out_avals[0]
    dn = eqn.params["dimension_numbers"]
    (lb, lf), (ro, ri), (ob, of) = dn.lhs_spec[:2], dn.rhs_spec[:2], dn.out_spec[:2]
    groups = eqn.params["feature_group_count"]
    batch_groups = eqn.params["batch_group_count"]
    ldims, rdims, odims = [None] * _rank(lhs), [None] * _rank(rhs), [None] * _rank(out)
    if batch_groups > 1:   # loops: group (lhs batch, rhs O, out O), input feature
        ldims[lb] = rdims[ro] = odims[of] = 0
        ldims[lf] = rdims[ri] = 1
        sizes, splittable = (batch_groups, lhs.shape[lf]), (True, True)
    elif groups > 1:       # loops: batch, group (lhs feature, rhs O, out O)
        ldims[lb] = odims[ob] = 0
        ldims[lf] = rdims[ro] = odims[of] = 1
        depthwise = rhs.shape[ri] == 1
        sizes, splittable = (lhs.shape[lb], groups), (depthwise, depthwise)
    else:                  # loops: batch, output feature, input feature
        ldims[lb] = odims[ob] = 0
        rdims[ro] = odims[of] = 1
        ldims[lf] = rdims[ri] = 2
        sizes, splittable = (lhs.shape[lb], rhs.shape[ro], rhs.shape[ri]), (True, True, True)
    taps = math.prod(_valid_taps(eqn.params, lhs.shape[l], rhs.shape[r], out.shape[o], k)
                     for k, (l, r, o) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:],
                                                       dn.out_spec[2:])))
    flops = 2.0 * _size(out) / math.prod(out.shape[d] for d in dn.out_spec[2:]) \
        * rhs.shape[ri] * taps
    return LoopOp(sizes, splittable, (tuple(ldims), tuple(rdims)), (tuple(odims),), flops=flops,
                  kernel=kernel_name(eqn) if groups == batch_groups == 1 else None, contraction=True,
                  expansion="batch_groups" if batch_groups > 1 else None)


def _valid_taps(params, size: int, window: int, out_size: int, k: int) -> int:
    """(output position, window position) pairs of spatial dim ``k`` of a convolution that
    read an input element, not padding or a hole of the input's dilation: XLA's
    ``cost_analysis`` counts a multiply-add only for those (a transposed convolution's
    input dilated by 2 has a quarter of a 3x3 window's taps in 2-D)."""
    stride = params["window_strides"][k]
    low = params["padding"][k][0]
    dilation = (params.get("lhs_dilation") or (1,) * (k + 1))[k]
    rhs_dilation = (params.get("rhs_dilation") or (1,) * (k + 1))[k]
    span = (size - 1) * dilation + 1
    return sum(1 for o in range(out_size) for w in range(window)
               if 0 <= (p := o * stride + w * rhs_dilation - low) < span and p % dilation == 0)


def _window_free(params, rank: int) -> tuple[bool, ...]:
    """Per dim, whether a windowed op leaves it alone: window 1, stride 1, no padding and
    no dilation, so output element ``i`` of that dim reads only operand element ``i``."""
    ones = (1,) * rank
    return tuple(params["window_dimensions"][d] == 1 and params["window_strides"][d] == 1
                 and tuple(params["padding"][d]) == (0, 0)
                 and (params.get("base_dilation") or ones)[d] == 1
                 and (params.get("window_dilation") or ones)[d] == 1
                 for d in range(rank))


def _windowed(eqn, out, windowed_avals, whole_avals, num_outputs: int = 1) -> LoopOp:
    """A windowed op as one loop per dim of ``out``: dims the window leaves alone (see
    ``_window_free``) split freely, the rest stay whole. ``windowed_avals``: operands on
    the other side of the window from ``out`` (their windowed dims follow no loop);
    ``whole_avals``: operands shaped like ``out`` (every dim follows its loop), or scalars
    and literals (init values: no loop)."""
    rank = _rank(out)
    free = _window_free(eqn.params, rank)
    dims = tuple(d if free[d] else None for d in range(rank))
    ident = tuple(range(rank))
    in_dims = tuple(dims for _ in windowed_avals) + tuple(
        None if a is None or _rank(a) == 0 else ident for a in whole_avals)
    window = math.prod(eqn.params["window_dimensions"])
    return LoopOp(tuple(out.shape), free, in_dims, (ident,) * num_outputs,
                  flops=float(_size(out) * window))


def reduce_window(eqn, in_avals, out_avals):
    """Pooling (``reduce_window_max/min/sum``, and ``reduce_window`` with its own
    computation: n operands then n init values → n outputs): loops over the output dims;
    batch and channel dims (window 1, stride 1, unpadded) split, windowed dims stay
    whole."""
    n = len(out_avals)
    return _windowed(eqn, out_avals[0], in_avals[:n], in_avals[n:], num_outputs=n)


def select_and_scatter_add(eqn, in_avals, out_avals):
    """Max-pool's gradient (source: the cotangent of the pooled value; operand: the
    pool's input; output shaped like the operand): loops over the output dims; dims the
    window leaves alone split, windowed dims stay whole."""
    source, operand = in_avals
    padded = math.prod(size + lo + hi for size, (lo, hi) in zip(operand.shape, eqn.params["padding"]))
    return dataclasses.replace(_windowed(eqn, out_avals[0], (source,), (operand,)),
                               expansion="select_and_scatter", padded=padded)


def select_and_gather_add(eqn, in_avals, out_avals):
    """Max-pool's forward-mode derivative (tangents and operand shaped like the input,
    output like the pooled value): loops over the output dims; dims the window leaves
    alone split, windowed dims stay whole."""
    return _windowed(eqn, out_avals[0], in_avals, ())
