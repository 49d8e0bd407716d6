"""XLA's dot canonicalisation as the memory model sees it: the dot operands it copies into
another dimension order before the dot runs.

XLA runs a dot with its batch dimensions outermost and at most one contracting and one
free dimension per operand. A ``dot_general`` outside that form has its operands
transposed to (batch, free, contracting) order (the left one) or (batch, contracting,
free) order (the right one), then reshaped (XLA's DotDecomposer); a transpose that is not
the identity is a copy of the operand, one buffer of its size. Measured with jax 0.10 on
the CPU (``tests/test_dot_layouts.py``): ``einsum("gsec,egcd->gsd")`` copies both operands,
``"bqhd,bkhd->bhqk"`` both, ``"sgc,gsd->gcd"`` the left one, ``"bsd,df->bsf"`` and
``"gsc,gsd->gcd"`` neither. A copy fuses into the elementwise equation making the operand
when the dot is its only reader (through layout-only reshapes): that equation then
writes the copied order directly, and no second buffer exists.
"""
from __future__ import annotations

import dataclasses

from autoshard.ir.program import Literal, per_program

from .fusion import value_readers
from .op_rules import ELEMENTWISE

#: equations whose result is the operand's buffer reinterpreted (XLA bitcasts them)
_LAYOUT_ONLY = frozenset({"reshape", "squeeze", "expand_dims"})


@dataclasses.dataclass(frozen=True)
class DotOperands:
    """A dot whose operands XLA may copy: its ``dimension_numbers`` and, per operand,
    whether the copy fuses into the elementwise equation making it (``fusible``)."""

    dimension_numbers: tuple
    fusible: tuple[bool, bool]


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


@per_program
def dot_operands(program) -> dict[int, DotOperands]:
    """Equation index → each ``dot_general`` whose operands XLA copies for some layout
    (at the global shapes: splitting dimensions only ever leaves an operand in place)."""
    consumers, outputs = value_readers(program)
    producer = {v: eqn for eqn in program.eqns for v in eqn.outputs}
    found = {}
    for e, eqn in enumerate(program.eqns):
        if eqn.primitive.name != "dot_general" or \
                any(isinstance(atom, Literal) for atom in eqn.inputs[:2]):
            continue
        shapes = [tuple(program.avals[atom].shape) for atom in eqn.inputs[:2]]
        numbers = eqn.params["dimension_numbers"]
        if copied_orders(numbers, *shapes):
            found[e] = DotOperands(numbers, tuple(_fusible(atom, producer, consumers, outputs)
                                                  for atom in eqn.inputs[:2]))
    return found


def _fusible(atom, producer, consumers, outputs) -> bool:
    """Whether the copy of ``atom`` fuses into the elementwise equation making it: each
    value from there to the dot (through layout-only reshapes) has one reader and is no
    program output."""
    while atom in producer and atom not in outputs and \
            len({id(c) for c in consumers.get(atom, ())}) == 1:
        maker = producer[atom]
        if maker.primitive.name in ELEMENTWISE:
            return True
        if maker.primitive.name not in _LAYOUT_ONLY:
            return False
        atom = maker.inputs[0]
    return False
