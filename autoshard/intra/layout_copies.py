"""XLA's layout assignment as the cost model sees it: the copies it inserts so that a
convolution reads and writes its tensors in the one dimension order it implements.

XLA's CPU backend runs a convolution with the input and output in (batch, spatial...,
feature) order and the kernel in (spatial..., input feature, output feature) order. A
tensor whose row-major order differs (the filter gradient's input, output cotangent and
result; the input gradient's kernel, its input and output features swapped) is copied into
that order first, or out of it after: one more read and one more write of it (measured with
``cost_analysis`` on jax 0.10: the filter gradient of an NHWC/HWIO convolution reads
``x + ct + w`` and moves ``2·x + 2·ct + 2·w`` more). A copy fuses into the single
elementwise equation that makes the operand (or into the elementwise readers of the result)
and then costs nothing more: that equation writes the copied order directly. Priced for every
cluster: a GPU's layout assignment prefers its own orders (cuDNN's), which this does not model.
"""
from __future__ import annotations

from autoshard.ir.program import Literal, makers, per_program

from .fusion import fusion, value_readers
from .op_rules import FUSIBLE, FUSING_CONSUMERS, fusible

#: extra memory traffic of a copied tensor, in multiples of its bytes (read it, write it)
COPY_READS = 2


def canonical_orders(dimension_numbers) -> tuple[tuple[int, ...], ...]:
    """(lhs, rhs, out) dimension orders the convolution runs in, from jax's
    ``ConvDimensionNumbers`` (``lhs_spec = (batch, feature, spatial...)``, ``rhs_spec =
    (out feature, in feature, spatial...)``, ``out_spec`` like ``lhs_spec``)."""
    lhs, rhs, out = dimension_numbers.lhs_spec, dimension_numbers.rhs_spec, \
        dimension_numbers.out_spec
    return ((lhs[0], *lhs[2:], lhs[1]), (*rhs[2:], rhs[1], rhs[0]), (out[0], *out[2:], out[1]))


@per_program
def layout_copy_reads(program) -> dict[int, tuple[int, ...]]:
    """Equation index → extra reads per operand then per output (in multiples of that
    tensor's bytes) for the convolutions whose tensors XLA copies; other equations are
    absent."""
    consumers, outputs = value_readers(program)
    made = makers(program)
    extra = {}
    for e, eqn in enumerate(program.eqns):
        if eqn.primitive.name != "conv_general_dilated":
            continue
        orders = canonical_orders(eqn.params["dimension_numbers"])
        reads = []
        for atom, order in zip(eqn.inputs, orders[:2]):
            copied = order != tuple(range(len(order)))
            if copied and not isinstance(atom, Literal):
                fused_in_maker = (atom in made and program.eqns[made[atom]].primitive.name in FUSIBLE
                                  and len(consumers[atom]) == 1)
                copied = not fused_in_maker
            reads.append(COPY_READS if copied else 0)
        v = eqn.outputs[0]
        copied = orders[2] != tuple(range(len(orders[2])))
        if copied and v not in outputs and consumers.get(v) and \
                all(c.primitive.name in FUSING_CONSUMERS for c in consumers[v]):
            copied = False  # the copy fuses into its elementwise readers
        reads.append(COPY_READS if copied else 0)
        if any(reads):
            extra[e] = tuple(reads)
    return extra


@per_program
def transposes_into_dots(program) -> frozenset[int]:
    """Indices of the ``transpose`` equations XLA folds into the dot that makes their
    operand, writing the dot's result in the transposed order (a layout choice): the
    transpose moves nothing. It does so when only the transpose reads that result and the
    transpose swaps the dot's two non-batch dims, keeping its batch dims in place: a weight
    gradient's ``dot_general`` then ``transpose`` (measured with ``cost_analysis`` on jax
    0.10: ``(a @ b).T`` moves the bytes ``a @ b`` does; a transpose that moves a batch dim,
    or of a result something else reads too, is a copy)."""
    consumers, outputs = value_readers(program)
    made = makers(program)
    folded = set()
    for e, eqn in enumerate(program.eqns):
        if eqn.primitive.name != "transpose" or isinstance(eqn.inputs[0], Literal) or \
                eqn.inputs[0] not in made:
            continue
        dot = program.eqns[made[eqn.inputs[0]]]
        if dot.primitive.name != "dot_general" or fusible(dot) or \
                eqn.inputs[0] in outputs or len(consumers[eqn.inputs[0]]) != 1:
            continue  # (an outer product fuses)
        batch = len(dot.params["dimension_numbers"][1][0])
        perm = tuple(eqn.params["permutation"])
        if len(perm) == batch + 2 and perm == (*range(batch), batch + 1, batch):
            folded.add(e)
    return frozenset(folded)


@per_program
def transposes_into_dot_operands(program) -> frozenset[int]:
    """Indices of the ``transpose`` equations XLA folds into the dots that read their
    result (its ``TransposeFolding``): the dots read the operand in place, so the
    transpose moves nothing. It does so when every reader of the transpose is a dot that
    keeps its batch dims of it where the transpose leaves them, and the transpose's own
    operand is in memory (a transpose of an elementwise result is written by that
    result's fusion).
    Measured with ``cost_analysis`` on jax 0.10 (CPU): ``x @ w.T``,
    ``q @ swapaxes(k, -1, -2)`` and ``x.T @ dy`` move the bytes of their dots alone (priced
    as copies, 2.14x, 1.50x and 1.29x); ``tanh(x).T @ dy`` and a transposed value a
    second equation reads (also through another ``x.T``: XLA computes it once) are
    copies."""
    consumers, outputs = value_readers(program)
    fused = fusion(program).fused
    same: dict[tuple, list[int]] = {}   # XLA's CSE makes one transpose of each (operand, order)
    for e, eqn in enumerate(program.eqns):
        if eqn.primitive.name == "transpose" and not isinstance(eqn.inputs[0], Literal) and \
                eqn.inputs[0] not in fused:
            same.setdefault((eqn.inputs[0], tuple(eqn.params["permutation"])), []).append(e)
    folded = set()
    for (_, perm), twins in same.items():
        values = {program.eqns[e].outputs[0] for e in twins}
        readers = {id(c): c for v in values for c in consumers.get(v, ())}
        if readers and not values & outputs and all(
                _folds(perm, dot, values) for dot in readers.values()):
            folded.update(twins)
    return frozenset(folded)


def _folds(perm, dot, values) -> bool:
    """Whether ``dot`` reads one of ``values`` (a transpose's result by ``perm``) as one
    operand, with its batch dims of it where the transpose leaves them."""
    operands = list(dot.inputs[:2])
    found = [k for k, a in enumerate(operands) if not isinstance(a, Literal) and a in values]
    if dot.primitive.name != "dot_general" or len(found) != 1:
        return False
    return all(perm[d] == d for d in dot.params["dimension_numbers"][1][found[0]])


@per_program
def transposes_undone(program) -> tuple[frozenset[int], frozenset[int]]:
    """(indices of the ``transpose`` equations that put back the order of the transpose
    they read, indices of the transposes only those read): XLA's simplifier composes the
    two into the identity, so neither moves anything (an undoing transpose fused into its
    readers still stands for their read of the original). A weight ``w`` used as
    ``x @ w.T`` gets its gradient transposed and transposed back (measured with
    ``cost_analysis`` on jax 0.10: the gradient step of ``tanh(x @ w.T)`` moves no copy of
    ``w``; priced as two, 1.64x)."""
    consumers, outputs = value_readers(program)
    made = makers(program)
    index = {id(eqn): e for e, eqn in enumerate(program.eqns)}
    transposes = {e for e, eqn in enumerate(program.eqns) if eqn.primitive.name == "transpose"}
    undone = set()
    for e in transposes:
        operand = program.eqns[e].inputs[0]
        inner = None if isinstance(operand, Literal) else made.get(operand)
        if inner in transposes:
            outer, first = (program.eqns[k].params["permutation"] for k in (e, inner))
            if all(first[p] == i for i, p in enumerate(outer)):
                undone.add(e)
    dead = frozenset(t for t in transposes if (v := program.eqns[t].outputs[0]) not in outputs
                     and consumers.get(v) and all(index[id(c)] in undone for c in consumers[v]))
    return frozenset(undone), dead
