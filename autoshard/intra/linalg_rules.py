"""Sharding rules of linear algebra on the trailing dims of batched operands (factorizations,
eigen- and Schur decompositions, triangular and tridiagonal solves): the batch dims that
lead every operand and result split freely, the matrix dims stay whole. See ``op_rules``
for what a rule is."""
from __future__ import annotations

import math

from .loop_op import LoopOp
from .loop_op import rank_of as _rank

#: trailing dims of the widest operand that are one problem's own (the rest are batch
#: dims): a matrix's two, or a permutation's one
CORE_DIMS = {
    "cholesky": 2, "eigh": 2, "qr": 2, "svd": 2, "lu": 2, "triangular_solve": 2,
    "eig": 2, "schur": 2, "hessenberg": 2, "householder_product": 2,
    "tridiagonal_solve": 2, "lu_pivots_to_permutation": 1, "tridiagonal": 2,
    "symmetric_product": 2, "ormqr": 2, "cholesky_update": 2,
}


def matrix_batched(eqn, in_avals, out_avals):
    """A linear-algebra op on the trailing dims of its operands (``CORE_DIMS`` of the
    widest one: a ``tridiagonal_solve``'s right-hand sides, not its diagonals): the batch
    dims before them, which lead every operand and result, split freely; every other dim
    stays whole. XLA keeps such a batch split, with no collective (each op compiled alone
    on 8 and 2x4 devices: ``test_op_rules``). No flops, as XLA's ``cost_analysis`` counts
    none for these library calls (LAPACK on the CPU), but a ``symmetric_product``'s."""
    operands = [a for a in in_avals if a is not None and _rank(a) > 0]
    core = CORE_DIMS[eqn.primitive.name]
    if not operands or max(map(_rank, operands)) < core:
        return None
    widest = max(operands, key=_rank)
    batch = tuple(widest.shape[:_rank(widest) - core])
    sizes, splittable = list(batch), [True] * len(batch)

    def dims(aval):
        if aval is None or tuple(aval.shape[:len(batch)]) != batch:
            return None
        own = range(len(sizes), len(sizes) + _rank(aval) - len(batch))
        sizes.extend(aval.shape[len(batch):])
        splittable.extend(False for _ in own)
        return (*range(len(batch)), *own)

    in_dims, out_dims = [dims(a) for a in in_avals], [dims(a) for a in out_avals]
    if any(d is None for d in out_dims) or any(
            d is None and a is not None and _rank(a) > 0 for d, a in zip(in_dims, in_avals)):
        return None
    flops = 0.0
    if eqn.primitive.name == "symmetric_product":  # a BLAS syrk, which XLA counts: 2·m²·n
        *_, m, n = in_avals[0].shape
        flops = 2.0 * math.prod(batch) * m * m * n
    return LoopOp(tuple(sizes), tuple(splittable), tuple(in_dims), tuple(out_dims), flops=flops)


RULES = {name: matrix_batched for name in CORE_DIMS}
