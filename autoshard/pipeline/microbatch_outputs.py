"""How each output of a pipelined loss combines over micro-batches into ``jax.jit``'s value.

The loss and its aux leaves are computed per micro-batch (the batch arguments' leading rows
cut into equal parts). A value is recovered exactly from its micro-batches' values only when
it is, over the batch's rows:

* ``"same"``: independent of the batch (a parameter norm): any micro-batch's value;
* ``"mean"``: an affine function of means over the rows (``jnp.mean`` of per-row terms,
  scaled, plus batch-independent values): their average;
* ``"sum"``: a linear function of sums over the rows (a sum, a count, a sum divided by a
  constant such as the whole batch's size): their sum;
* ``"max"`` / ``"min"``: a maximum / minimum over the rows (plus a constant): their max / min;
* ``"rows"``: one value per row, the rows on its first dim (per-example losses, logits):
  their concatenation;
* ``"unverified"``: computed through an op without a loop description (a manual region, a
  callback), which rows cannot be followed through.

A function of such values that is none of these (a ratio of two sums: a masked mean; a
root mean square) is ``"post"`` for :func:`value_kinds`: computed from their totals once
per step (``pipeline.post_reduction``). Anything else is ``None``: a batch statistic fed
back into per-row values (batch normalization), one row picked out. Its micro-batched
value differs from ``jax.jit``'s.

:func:`output_combinations` classifies by abstract interpretation of the loss program (as
traced at the whole batch's shapes), following the batch's rows through each op's loop description
(``intra.op_rules.loop_op``): rows stay rows through an op whose loop over them is
splittable (nothing mixes two rows), and a sum over them is a sum; a cond on a
batch-independent index through each branch, a scan through its body. Whether a sum divided
by a number is a mean (``jnp.mean`` divides by the elements it reduced) or a scaled sum (divided
by a constant) is read off the program traced at micro-batch shapes beside it: a mean's
divisor grows with the batch, a constant does not.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from autoshard.intra.op_rules import loop_op
from autoshard.ir.custom_rules import RULE_PRIMITIVE, is_custom_rule
from autoshard.ir.program import Literal, Program
from autoshard.ir.trace import flatten_open_jaxpr

from .markers import BOUNDARY_PRIMITIVE

MEAN, SUM, SAME, MAX, MIN = "mean", "sum", "same", "max", "min"
#: a function of values combined over the batch that no combination gives (a ratio of two
#: sums): computed once per step from those values (``pipeline.post_reduction``)
POST = "post"
#: a value computed through an op whose loop over the rows is not described (no rule: a
#: manual region, a callback): what it is over the batch is not known
UNVERIFIED = "unverified"
#: a value kind (it holds the batch's rows), and how one holding them on dim 0 combines
ROWS = "rows"
#: ops linear in their one non-constant operand: a sum or mean through them stays one
_LINEAR = frozenset({"reduce_sum", "dot_general", "broadcast_in_dim", "transpose", "slice"})
#: ops that keep every element's value: a sum through them still sums its count
_SHAPE_ONLY = frozenset({"reshape", "squeeze", "expand_dims", "convert_element_type", "copy",
                         "copy_p", "stop_gradient"})
#: identities of several operands: each output is its operand (layer boundaries,
#: rematerialization's barriers)
_PASS_THROUGH = frozenset({BOUNDARY_PRIMITIVE, "optimization_barrier"})
#: reductions over a loop and what they make of the rows they reduce
_REDUCING = {"reduce_sum": SUM, "dot_general": SUM, "conv_general_dilated": SUM,
             "reduce_max": MAX, "reduce_min": MIN}


def output_combinations(program: Program, batch: Sequence[bool], num_microbatches: int,
                        whole: Program | None = None) -> tuple[str | None, ...]:
    """Per output of the loss ``program`` (traced at micro-batch shapes; its inputs that
    ``batch`` marks hold the batch on their leading dim) how its ``num_microbatches``
    values combine into the whole batch's (module doc; ``None``: they cannot). ``whole``:
    the same loss traced at the whole batch's shapes, which is read (a micro-batch of one
    row makes jax write some ops otherwise), its literals compared with ``program``'s to
    tell counts from constants; without it, or where its equations are not
    ``program``'s, a literal equal to the elements a sum reduced is taken for a count, as
    ``jnp.mean`` divides by it."""
    kinds = value_kinds(program, batch, num_microbatches, whole)
    return tuple(combination(SAME_VALUE if isinstance(a, Literal) else kinds[a])
                 for a in program.outvars)


#: the kind of a literal output
SAME_VALUE = (SAME,)


def combination(value) -> str | None:
    """How a value of kind ``value`` (:func:`value_kinds`) combines over the micro-batches:
    ``ROWS`` (their values concatenated) when it holds the batch's rows on its first dim."""
    if value is not None and value[0] == ROWS and value[1] == 0:
        return ROWS
    return None if value is None or value[0] in (ROWS, "sized", POST) else value[0]


def value_kinds(program: Program, batch: Sequence[bool], num_microbatches: int,
                whole: Program | None = None) -> dict:
    """Value id of ``program`` -> what it is over the batch's rows, as a tuple whose first
    item is its kind: a combination (``"mean"``, ``"sum"``, ``"same"``, ``"max"``,
    ``"min"``, ``"unverified"``), ``"rows"`` (it holds rows), ``"post"`` (a function of
    values combined over the batch that no combination gives, such as a ratio of two
    sums: ``pipeline.post_reduction``), or ``None`` (arguments as in
    :func:`output_combinations`)."""
    if whole is not None and (len(whole.invars) != len(program.invars)
                              or len(whole.outvars) != len(program.outvars)):
        whole = None   # another signature: not the same loss
    aligned = whole is not None and len(whole.eqns) == len(program.eqns) and all(
        a.primitive.name == b.primitive.name and len(a.inputs) == len(b.inputs)
        and len(a.outputs) == len(b.outputs) for a, b in zip(program.eqns, whole.eqns))
    base = program if not aligned else whole
    grown = _grown_literals(program, whole, num_microbatches) if aligned else None
    micro = program if aligned else None
    ins = [(ROWS, 0, None) if b and len(base.avals[v].shape) else None if b else (SAME,)
           for v, b in zip(base.invars, batch, strict=True)]
    values = _run(base, ins, grown, micro, num_microbatches, everything=True)
    if base is program:
        return values
    # the same equations at other shapes: value ids matched by position
    kinds = {v: values[w] for v, w in zip(program.invars, base.invars)}
    kinds.update((v, values[w]) for (v, _), (w, _) in zip(program.constants, base.constants))
    for a, b in zip(program.eqns, base.eqns):
        kinds.update((v, values[w]) for v, w in zip(a.outputs, b.outputs))
    return kinds


def unverified_ops(program: Program) -> tuple[str, ...]:
    """The primitives of ``program`` that :func:`output_combinations` cannot follow rows
    through (no loop description: a manual region, a callback), in program order."""
    names = []
    for eqn in program.eqns:
        name = eqn.primitive.name
        if name not in _PASS_THROUGH and name not in ("cond", "scan", RULE_PRIMITIVE) \
                and name not in names \
                and loop_op(eqn, [None if isinstance(a, Literal) else program.avals[a]
                                  for a in eqn.inputs],
                            [program.avals[v] for v in eqn.outputs]) is None:
            names.append(name)
    return tuple(names)


def _run(program: Program, ins: Sequence, grown, micro: Program | None, B: int,
         everything: bool = False):
    """The kinds of ``program``'s outputs given its inputs' kinds ``ins`` (``everything``:
    of every value, by id)."""
    values: dict = dict(zip(program.invars, ins, strict=True))
    for v, _ in program.constants:
        values[v] = (SAME,)
    for e, eqn in enumerate(program.eqns):
        ins = [_literal(e, k, grown) if isinstance(a, Literal) else values[a]
               for k, a in enumerate(eqn.inputs)]
        made = _apply(program, e, eqn, ins, grown)
        if eqn.primitive.name == "reshape" and ins[0] is not None and ins[0][0] == ROWS:
            made = [_reshaped_rows(program, micro, e, ins[0][1], B)]
        elif eqn.primitive.name in ("cond", "scan") and any(
                v is not None and v[0] not in (SAME,) for v in ins):
            made = _control_flow(eqn, ins, B)
        for v, value in zip(eqn.outputs, made, strict=True):
            values[v] = value
    if everything:
        return values
    return [(SAME,) if isinstance(a, Literal) else values[a] for a in program.outvars]


def _body(closed, ins: Sequence, B: int) -> list:
    """The kinds of the outputs of a cond branch or scan body (a closed jaxpr) given its
    inputs' kinds ``ins`` (its own constants are batch-independent)."""
    jaxpr = closed.jaxpr
    n = len(jaxpr.constvars) + len(jaxpr.invars)
    body = flatten_open_jaxpr(jaxpr, tuple(f"in[{k}]" for k in range(n)),
                              tuple(f"out[{k}]" for k in range(len(jaxpr.outvars)))).program
    return _run(body, [(SAME,)] * len(jaxpr.constvars) + list(ins), None, None, B)


def _control_flow(eqn, ins: Sequence, B: int) -> list:
    """A cond (on a batch-independent index: each branch followed, and all must agree) or a
    scan (its carry followed to a fixed point; the scanned-over inputs lose their leading
    dim, the stacked outputs gain one) reading rows, sums or means."""
    n_out = len(eqn.outputs)
    if any(v is None for v in ins):
        return [None] * n_out
    if eqn.primitive.name == "cond":
        if ins[0][0] != SAME:
            return [None] * n_out
        outs = [_body(branch, ins[1:], B) for branch in eqn.params["branches"]]
        return [o[0] if all(_same(o[0], x) for x in o[1:]) else None for o in zip(*outs)]
    consts, carry = eqn.params["num_consts"], eqn.params["num_carry"]
    xs = []
    for value in ins[consts + carry:]:
        if value[0] == ROWS:
            if value[1] == 0:
                return [None] * n_out   # scanning over the rows
            value = (ROWS, value[1] - 1, None)
        xs.append(value)
    carried = list(ins[consts:consts + carry])
    for _ in range(4):
        outs = _body(eqn.params["jaxpr"], list(ins[:consts]) + carried + xs, B)
        joined = [c if _same(c, o) else None for c, o in zip(carried, outs[:carry])]
        if joined == carried:
            break
        carried = joined
    else:
        return [None] * n_out
    ys = [(ROWS, v[1] + 1, None) if v is not None and v[0] == ROWS else v
          for v in outs[carry:]]
    return carried + ys


def _same(a, b) -> bool:
    """Whether two values have one kind (and, for rows, one dim)."""
    if a is None or b is None:
        return False
    return a[0] == b[0] and (a[0] != ROWS or a[1] == b[1])


def _grown_literals(program: Program, whole: Program | None, B: int):
    """``(equation, operand) -> ratio`` of each literal's value at the whole batch's shapes
    to its value at micro-batch shapes (``None`` where they differ by other than ``B`` or
    ``1 / B``); ``None`` without ``whole``."""
    if whole is None:
        return None
    grown = {}
    for e, (a, b) in enumerate(zip(program.eqns, whole.eqns)):
        for k, (x, y) in enumerate(zip(a.inputs, b.inputs)):
            if isinstance(x, Literal) and isinstance(y, Literal) and np.ndim(x.value) == 0:
                small, large = float(np.asarray(x.value)), float(np.asarray(y.value))
                if small == large:
                    continue
                ratio = large / small if small else math.inf
                grown[(e, k)] = B if math.isclose(ratio, B) else \
                    1 / B if math.isclose(ratio, 1 / B) else None
    return grown


def _literal(e: int, k: int, grown):
    """A literal operand: batch-independent, or ``("sized", ratio)`` when it grows with the
    batch (known only from the trace at the whole batch's shapes)."""
    if grown is not None and (e, k) in grown:
        return ("sized", grown[(e, k)])
    return (SAME,)


def _apply(program: Program, e: int, eqn, ins, grown) -> list:
    n_out = len(eqn.outputs)
    if is_custom_rule(eqn):   # its results are its inlined body's
        return list(ins[:n_out])
    if eqn.primitive.name in _PASS_THROUGH and n_out == len(ins):
        return list(ins)
    if any(v is None for v in ins):
        return [None] * n_out
    if any(v[0] == UNVERIFIED for v in ins):
        return [(UNVERIFIED,)] * n_out
    kinds = {v[0] for v in ins}
    if kinds <= {SAME}:
        return [(SAME,)] * n_out
    if kinds <= {SAME, "sized"}:   # computed from a size: its value follows the batch
        return [("sized", None)] * n_out
    if POST in kinds or kinds & {SUM, MEAN, MAX, MIN}:
        made = [_reduced_through(program, e, eqn, ins, grown) if n_out == 1 and POST not in kinds
                else None] * n_out
        if kinds <= {SAME, POST, SUM, MEAN, MAX, MIN}:  # rows and sizes aside: a function of
            made = [m if m is not None else (POST,) for m in made]  # combined values
        return made
    if "sized" in kinds:
        return [None] * n_out
    return _rows_through(program, eqn, ins)


def _reshaped_rows(program: Program, micro: Program | None, e: int, dim: int, B: int):
    """Rows on ``dim`` through reshape ``e``: on the same dim of the output when the dims
    before it are the operand's, so that the rows stay that dim's major factor (``[n, S,
    D] -> [n * S, D]``), and, where ``micro`` (the loss at micro-batch shapes, beside
    ``program`` at the whole batch's) has this reshape of the same rank, that dim alone
    is ``B`` times larger here (a size written into the step, ``x.reshape(2, -1)``, is
    not). Followed by shapes, not loops: a dim of one row has no loop."""
    eqn = program.eqns[e]
    if eqn.params.get("dimensions") is not None:
        return None
    before = program.avals[eqn.inputs[0]].shape
    after = program.avals[eqn.outputs[0]].shape
    if dim >= len(after) or tuple(after[:dim]) != tuple(before[:dim]):
        return None
    if micro is not None:
        small = micro.avals[micro.eqns[e].outputs[0]].shape
        if len(small) == len(after) and any(
                a != (B * s if d == dim else s) for d, (a, s) in enumerate(zip(after, small))):
            return None
    return (ROWS, dim, None)


def _rows_through(program: Program, eqn, ins) -> list:
    """The outputs of an op reading rows (and batch-independent values): rows where its loop
    over them is splittable and kept, a sum / max / min where it reduces them."""
    in_avals = [None if isinstance(a, Literal) else program.avals[a] for a in eqn.inputs]
    op = loop_op(eqn, in_avals, [program.avals[v] for v in eqn.outputs])
    n_out = len(eqn.outputs)
    if op is None:
        return [(UNVERIFIED,)] * n_out
    loops = set()
    for k, value in enumerate(ins):
        if value[0] == ROWS:
            dims = op.in_dims[k]
            if dims is None or value[1] >= len(dims) or dims[value[1]] is None:
                return [None] * n_out
            loops.add(dims[value[1]])
    (loop,) = loops if len(loops) == 1 else (None,)
    if loop is None or not op.splittable[loop]:
        return [None] * n_out
    out = []
    for dims in op.out_dims:
        kind = _REDUCING.get(eqn.primitive.name)
        if loop in dims:
            out.append((ROWS, list(dims).index(loop), None))
        elif kind is None:
            out.append(None)
        else:
            out.append((kind, math.prod(op.sizes[l] for l in op.reduction_loops)))
    return out


def _reduced_through(program: Program, e: int, eqn, ins, grown):
    """The output of an op reading a sum, mean, max or min over the rows and
    batch-independent values (rows besides them: a batch statistic per row, none)."""
    name = eqn.primitive.name
    if any(v[0] == ROWS for v in ins):
        return None
    reduced = [(k, v) for k, v in enumerate(ins) if v[0] in (SUM, MEAN, MAX, MIN)]
    kinds = {v[0] for _, v in reduced}
    if len(kinds) != 1:
        return None
    (kind,) = kinds
    if any(v[0] == "sized" for v in ins) and name not in ("mul", "div"):
        return None
    if name in ("add", "sub", "add_any"):
        if kind == MEAN or (kind == SUM and len(reduced) == len(ins)):
            return (kind, None)   # a mean plus a constant or a mean; a sum plus a sum
        if kind in (MAX, MIN) and len(reduced) == 1 and (name != "sub" or reduced[0][0] == 0):
            return (kind, None)
        return None
    if name == "concatenate":   # means side by side, or sums (a constant part would add up)
        return (kind, None) if kind != SUM or len(reduced) == len(ins) else None
    if len(reduced) != 1:
        return None
    (k, value), = reduced
    if name == "neg":
        return ({MAX: MIN, MIN: MAX}.get(kind, kind), None)
    if kind in (MAX, MIN):
        return (kind, None) if name in _SHAPE_ONLY | {"broadcast_in_dim", "reduce_" + kind} \
            else None
    if name in ("mul", "div"):
        if name == "div" and k != 0:
            return None
        scale = _scale(eqn.inputs[1 - k], ins[1 - k], value[1], kind, name, grown)
        if scale == 1:
            return (kind, None)
        if (kind, scale) == (SUM, "count"):
            return (MEAN, None)
        return (SUM, None) if (kind, scale) == (MEAN, "rows") else None
    if name in _SHAPE_ONLY:
        return (kind, value[1])
    return (kind, None) if name in _LINEAR else None


def _scale(atom, value, count, kind: str, name: str, grown):
    """How a sum's or mean's scale (``atom``, multiplied or divided by) relates to the rows:
    1 (a constant), ``"count"`` (it divides by the number of rows: a sum becomes a mean),
    ``"rows"`` (it multiplies by it: a mean becomes a sum) or ``None``. Without ``grown``
    (no trace at the whole batch's shapes), a literal equal to the elements a sum reduced
    is a count, and a mean's literal scale cannot be told from a count: ``None``."""
    if value[0] == SAME:
        if grown is None and isinstance(atom, Literal) and np.ndim(atom.value) == 0:
            if kind == MEAN:
                return 1 if float(np.asarray(atom.value)) == 1.0 else None
            want = float(count or 0) if name == "div" else 1.0 / count if count else math.nan
            if math.isclose(float(np.asarray(atom.value)), want, rel_tol=1e-6):
                return "count"
        return 1
    ratio = value[1]   # the whole batch's literal over the micro-batch's: B or 1 / B
    if ratio is None:
        return None
    return "count" if (ratio > 1) == (name == "div") else "rows"
