"""The dimension orders XLA runs a dot's operands in (its DotDecomposer's canonical form):
which operands it copies into another order before the dot runs (``dot_layouts`` prices
those copies; ``fusion`` names the operand fusions that write them)."""
from __future__ import annotations


def in_place(rank: int, batch, contract) -> bool:
    """Whether XLA reads a dot operand of ``rank`` dimensions as it is laid out: its batch
    dimensions outermost, in order, then its one contracting dimension and its free
    dimensions (merged into one in place) either way round (the CPU's matrix multiply
    reads a matrix transposed as cheaply). Measured on jax 0.10: ``"gsd,gsec->gdec"``
    reads ``gsd`` as it is (contracting ``s`` before the free ``d``)."""
    n = len(batch)
    if tuple(batch) != tuple(range(n)) or len(contract) > 1:
        return False
    return not contract or contract[0] in (n, rank - 1)


def copied_orders(dimension_numbers, lhs_shape, rhs_shape
                  ) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(operand, dimension order) of each operand XLA copies, for operands of these
    (per-device) shapes: dimensions of size 1 are dropped first, as XLA's simplifier
    drops them (an expert dimension split over as many devices as experts)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    kept = [[d for d, size in enumerate(shape) if size != 1] for shape in (lhs_shape, rhs_shape)]

    def renumbered(dims, side):
        position = {d: i for i, d in enumerate(kept[side])}
        return tuple(position[d] for d in dims if d in position)

    numbers = ((renumbered(lhs_contract, 0), renumbered(rhs_contract, 1)),
               (renumbered(lhs_batch, 0), renumbered(rhs_batch, 1)))
    ranks = len(kept[0]), len(kept[1])
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = numbers

    def free(rank, batch, contract):
        return tuple(d for d in range(rank) if d not in batch and d not in contract)

    orders = ((*lhs_batch, *free(ranks[0], lhs_batch, lhs_contract), *lhs_contract),
              (*rhs_batch, *rhs_contract, *free(ranks[1], rhs_batch, rhs_contract)))
    kept_in_place = (in_place(ranks[0], lhs_batch, lhs_contract),
                     in_place(ranks[1], rhs_batch, rhs_contract))
    return tuple((i, order) for i, order in enumerate(orders)
                 if not kept_in_place[i] and order != tuple(range(len(order))))
