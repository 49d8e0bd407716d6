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

from autoshard.ir.program import Literal, makers, per_program

from .dot_orders import copied_orders
from .fusion import fusion, value_readers
from .layout_copies import transposes_into_dots
from .op_rules import ELEMENTWISE, LOW_PRECISION, fusing_consumer, upcast_operands

#: equations whose result is the operand's buffer reinterpreted (XLA bitcasts them)
_LAYOUT_ONLY = frozenset({"reshape", "squeeze", "expand_dims"})


@dataclasses.dataclass(frozen=True)
class DotOperands:
    """A dot whose operands XLA may copy, or that a backend may run in float32
    (``upcast``: the operands it converts, ``op_rules.upcast_operands``; ``low_precision``: its
    result is bfloat16 or float16): its ``dimension_numbers`` and, per operand, whether
    the copy fuses into the elementwise equation making it (``fusible``: that equation
    writes the copied order, its only buffer), whether an
    operand fusion writes it (``operand_fused``: ``fusion.operand_forms``; its traffic is
    priced with the dot, its buffer is the copy's), and whether its conversion to float32
    is computed where it is made (``converted_where_made``: fusible, operand-fused, or the
    float32 result of another such dot that only this one reads), and whether an earlier
    such dot converted it (``converted_before``: XLA converts a value once for all its
    dots) or a later one reads that conversion (``converted_later``);
    ``result_read_once``: the result has one reader, a fusion that reads it in place of
    its conversion back (a transpose the dot writes is looked through: a weight
    gradient's is read once by its update); ``widened_by``: the index of that one reader
    where it converts the result to float32 and is written (a program output, or read
    where it is not fused), which XLA's float conversion simplifier (excess precision
    allowed) takes to be the dot's own float32 result: no conversion back, nor that one."""

    dimension_numbers: tuple
    fusible: tuple[bool, bool]
    operand_fused: tuple[bool, bool] = (False, False)
    low_precision: bool = False
    upcast: tuple[bool, bool] = (False, False)
    converted_where_made: tuple[bool, bool] = (False, False)
    converted_before: tuple[bool, bool] = (False, False)
    converted_later: tuple[bool, bool] = (False, False)
    result_read_once: bool = False
    widened_by: int | None = None


@per_program
def dot_operands(program) -> dict[int, DotOperands]:
    """Equation index → each ``dot_general`` whose operands XLA copies for some layout
    (at the global shapes: splitting dimensions only ever leaves an operand in place), or
    that a backend may run in float32 (``op_rules.upcast_operands``)."""
    consumers, outputs = value_readers(program)
    analysis = fusion(program)
    operand_fused = analysis.operand_fused
    made = makers(program)
    index = {id(eqn): e for e, eqn in enumerate(program.eqns)}
    folded = transposes_into_dots(program)
    upcasts = {e: upcast_operands(*(program.avals[v] for v in (*eqn.outputs, *eqn.inputs[:2])))
               for e, eqn in enumerate(program.eqns) if eqn.primitive.name == "dot_general"
               and not any(isinstance(atom, Literal) for atom in eqn.inputs[:2])}
    first, last = {}, {}   # converted operand -> the first and last dot reading its copy
    for e, upcast in upcasts.items():
        for atom, up in zip(program.eqns[e].inputs[:2], upcast):
            if up:
                first.setdefault(atom, e)
                last[atom] = e
    found = {}
    for e, upcast in upcasts.items():
        eqn = program.eqns[e]
        operands = eqn.inputs[:2]
        numbers = eqn.params["dimension_numbers"]
        if not any(upcast) and not copied_orders(
                numbers, *(tuple(program.avals[atom].shape) for atom in operands)):
            continue
        fusible = tuple(_fusible(atom, program, made, consumers, outputs) for atom in operands)
        fused = tuple(e in operand_fused.get(atom, ()) for atom in operands)
        if not any(upcast):
            found[e] = DotOperands(numbers, fusible, fused)
            continue
        result, readers = _result_readers(eqn.outputs[0], consumers, index, folded)
        found[e] = DotOperands(
            numbers, fusible, fused, low_precision=_low_precision(program, eqn), upcast=upcast,
            converted_where_made=tuple(
                f or o or _from_low_precision_dot(atom, program, made, consumers, outputs)
                for f, o, atom in zip(fusible, fused, operands)),
            converted_before=tuple(up and first[atom] != e for atom, up in zip(operands, upcast)),
            converted_later=tuple(up and last[atom] != e for atom, up in zip(operands, upcast)),
            result_read_once=result not in outputs and len(readers) == 1
            and all(fusing_consumer(c) for c in readers.values()),
            widened_by=_widened_by(result, readers, outputs, analysis, index))
    return found


@per_program
def widened_results(program) -> frozenset[int]:
    """Indices of the conversions to float32 that are a low-precision dot's result as
    XLA:CPU runs it (``DotOperands.widened_by``): they move nothing. jax 0.10.2:
    ``(x @ w).astype(float32)`` of bf16 [256, 512] by [512, 1024] moves 5 times the
    operands' bytes and the float32 result's once (7.602 MB of cost analysis)."""
    return frozenset(dot.widened_by for dot in dot_operands(program).values()
                     if dot.widened_by is not None)


def _widened_by(result, readers, outputs, analysis, index) -> int | None:
    """The index of ``result``'s one reader (of ``readers``, by id) where it converts the
    result to float32 and is written; else None."""
    if result in outputs or len(readers) != 1:
        return None
    (reader,) = readers.values()
    widens = reader.primitive.name == "convert_element_type" and \
        getattr(reader.params.get("new_dtype"), "name", None) == "float32"
    return index[id(reader)] if widens and reader.outputs[0] not in analysis.fused else None


def _result_readers(result, consumers, index, folded) -> tuple[object, dict]:
    """``result`` and its readers (by id), or, where its one reader is a transpose the dot
    writes in place (``transposes_into_dots``: a weight gradient's), that transpose's."""
    readers = {id(c): c for c in consumers.get(result, ())}
    if len(readers) == 1:
        (reader,) = readers.values()
        if index[id(reader)] in folded:
            result = reader.outputs[0]
            readers = {id(c): c for c in consumers.get(result, ())}
    return result, readers


def _low_precision(program, eqn) -> bool:
    return eqn.primitive.name == "dot_general" and \
        program.avals[eqn.outputs[0]].dtype.name in LOW_PRECISION


def _from_low_precision_dot(atom, program, made, consumers, outputs) -> bool:
    """Whether ``atom`` is the result of a low-precision dot that only one equation reads:
    its rounding to the low precision and back to float32 is then one fusion."""
    return atom in made and _low_precision(program, program.eqns[made[atom]]) and \
        atom not in outputs and len({id(c) for c in consumers.get(atom, ())}) == 1


def _fusible(atom, program, made, consumers, outputs) -> bool:
    """Whether the copy of ``atom`` fuses into the elementwise equation making it, or into
    a reshape that writes it: each value from there to the dot (through layout-only
    reshapes) has one reader and is no program output. A reshape of a value in memory
    (a dot's result) is priced as a copy of it, which XLA writes in the dot's order (a
    query's ``transpose_copy_fusion``: one copy, not two)."""
    first = True
    while atom in made and atom not in outputs and \
            len({id(c) for c in consumers.get(atom, ())}) == 1:
        maker = program.eqns[made[atom]]
        if maker.primitive.name in ELEMENTWISE:
            return True
        if maker.primitive.name not in _LAYOUT_ONLY:
            return False
        if first and maker.primitive.name == "reshape" and \
                not isinstance(maker.inputs[0], Literal) and maker.inputs[0] in made and \
                program.eqns[made[maker.inputs[0]]].primitive.name not in ELEMENTWISE:
            return True
        first = False
        atom = maker.inputs[0]
    return False
