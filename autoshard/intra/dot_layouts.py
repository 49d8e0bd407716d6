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

from .dot_orders import copied_orders
from .fusion import fusion, value_readers
from .op_rules import ELEMENTWISE

#: equations whose result is the operand's buffer reinterpreted (XLA bitcasts them)
_LAYOUT_ONLY = frozenset({"reshape", "squeeze", "expand_dims"})


@dataclasses.dataclass(frozen=True)
class DotOperands:
    """A dot whose operands XLA may copy: its ``dimension_numbers`` and, per operand,
    whether the copy fuses into the elementwise equation making it (``fusible``: that
    equation writes the copied order, its only buffer), and whether an operand fusion
    writes it (``operand_fused``: ``fusion.operand_forms``; its traffic is priced with the
    dot, its buffer is the copy's)."""

    dimension_numbers: tuple
    fusible: tuple[bool, bool]
    operand_fused: tuple[bool, bool] = (False, False)


@per_program
def dot_operands(program) -> dict[int, DotOperands]:
    """Equation index → each ``dot_general`` whose operands XLA copies for some layout
    (at the global shapes: splitting dimensions only ever leaves an operand in place)."""
    consumers, outputs = value_readers(program)
    operand_fused = fusion(program).operand_fused
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
                                                  for atom in eqn.inputs[:2]),
                                   tuple(e in operand_fused.get(atom, ())
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
