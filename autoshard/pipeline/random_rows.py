"""Random numbers inside a pipelined loss, drawn as ``jax.jit`` draws them for the whole batch.

With jax's default PRNG (threefry2x32 with ``jax_threefry_partitionable``, the default
since jax 0.5), element ``i`` (row-major flat index) of ``random_bits(key, shape)`` is the
threefry hash of ``key`` and the 64-bit counter ``i``, whatever the rest of the shape. A
micro-batch runs the loss at ``(b, ...)`` and so would draw counters ``0 .. b·s − 1``
(``s`` elements per row) in every micro-batch: the whole batch's first rows, again and
again. Micro-batch ``m`` holds rows ``m·b .. m·b + b − 1`` of the batch, whose counters are
``(m·b + r)·s + j``. So every ``random_bits`` and ``random_split`` of one key whose leading
dimension follows the batch (``b`` per micro-batch, ``B·b`` for the whole batch: seen by
comparing the loss traced at both sizes) is replaced with the threefry hash of those
counters: bit for bit ``jax.jit``'s dropout masks, per-example keys and noise. The row
offsets ``(m·b + r)·s`` come from a per-row table, an input of the loss split into
micro-batches like the batch (:func:`row_table`); the in-row index ``j`` is an iota, added
with carry.

What cannot be reproduced that way (another PRNG implementation, the flag off, a batch
dimension that is not the leading one) is reported so that the caller can warn.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry2x32_p

from autoshard.ir.custom_rules import (
    BRANCH_CALLS,
    CUSTOM_RULE_CALLS,
    REMAT_CALLS,
    is_user_rule,
    with_dissolved,
)
from autoshard.ir.jax_compat import bind
from autoshard.ir.program import Equation, Literal, Program
from autoshard.ir.trace import TracedFunction, trace

RANDOM_PRIMITIVES = frozenset({"random_bits", "random_split"})
_THREEFRY = "threefry2x32"
_UINT = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}


@dataclasses.dataclass(frozen=True)
class RandomRows:
    """The loss with batch-shaped random draws made per micro-batch as for the whole batch.

    ``forward``: the rewritten loss; its last ``len(strides)`` inputs are the row tables
    (:func:`row_table` of each stride, split into micro-batches). ``problems``: one line per
    batch-shaped draw left as it was (it differs from ``jax.jit``'s)."""

    forward: TracedFunction
    strides: tuple[int, ...] = ()
    problems: tuple[str, ...] = ()


def row_table(rows: int, stride: int) -> np.ndarray:
    """``(rows, 2)`` uint32: the high and low words of ``r · stride`` for each row ``r``."""
    offsets = [r * stride for r in range(rows)]
    return np.array([[o >> 32, o & 0xFFFFFFFF] for o in offsets], dtype=np.uint32)


def _counters(table, shape):
    """The 64-bit threefry counters (high, low words) of a micro-batch's rows."""
    stride = math.prod(shape[1:])
    j = jnp.zeros(shape, jnp.uint32)
    for d in range(1, len(shape)):
        j = j + lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(math.prod(shape[d + 1:]))
    assert stride < 2 ** 32
    row = (shape[0],) + (1,) * (len(shape) - 1)
    hi = jnp.broadcast_to(table[:, 0].reshape(row), shape)
    lo = jnp.broadcast_to(table[:, 1].reshape(row), shape)
    low = lo + j
    return hi + (low < lo).astype(jnp.uint32), low


def _bits(key, table, bit_width: int, shape):
    """``jax.random.bits`` of the whole batch, this micro-batch's rows (as
    ``_threefry_random_bits_partitionable``)."""
    data = jax.random.key_data(key)
    hi, lo = _counters(table, shape)
    bits1, bits2 = threefry2x32_p.bind(data[0], data[1], hi, lo)
    dtype = _UINT[bit_width]
    if bit_width == 64:
        return lax.shift_left(bits1.astype(dtype), jnp.asarray(32, dtype)) | bits2.astype(dtype)
    if bit_width == 32:
        return bits1 ^ bits2
    return (bits1 ^ bits2).astype(dtype)


def _split(key, table, shape):
    """``jax.random.split(key, whole batch shape)``, this micro-batch's rows (as
    ``_threefry_split_foldlike``)."""
    data = jax.random.key_data(key)
    hi, lo = _counters(table, shape)
    bits1, bits2 = threefry2x32_p.bind(data[0], data[1], hi, lo)
    data = lax.concatenate([bits1[..., None], bits2[..., None]], bits1.ndim)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


@dataclasses.dataclass(frozen=True)
class _Draw:
    """A random draw in a program: equation ``eqn`` itself, or one inside equation ``eqn``
    (a loop or branch that was not unrolled: ``within`` names it)."""

    eqn: int
    name: str
    shape: tuple
    within: str | None = None


def _jaxprs(value):
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _jaxprs(item)


def _nested(params):
    for value in params.values():
        for jaxpr in _jaxprs(value):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name in RANDOM_PRIMITIVES:
                    yield eqn.primitive.name, tuple(eqn.params["shape"])
                else:
                    yield from _nested(eqn.params)


def _draws(program: Program) -> list[_Draw]:
    out = []
    for e, eqn in enumerate(program.eqns):
        if eqn.primitive.name in RANDOM_PRIMITIVES:
            out.append(_Draw(e, eqn.primitive.name, tuple(eqn.params["shape"])))
        elif is_user_rule(eqn):  # the user's call, run again where it is differentiated
            out += [_Draw(e, name, shape, eqn.params["call_primitive"].name)
                    for name, shape in _nested(eqn.params["call_params"])]
        else:
            out += [_Draw(e, name, shape, eqn.primitive.name)
                    for name, shape in _nested(eqn.params)]
    return out


def _where(forward: TracedFunction, draw: _Draw) -> str:
    source = forward.sources[draw.eqn]
    inside = f" inside a {draw.within}" if draw.within else ""
    return f"{draw.name} of shape {draw.shape}{inside}{f' at {source}' if source else ''}"


def has_random_draws(program: Program) -> bool:
    return bool(_draws(program))


def reproduce_random_rows(forward: TracedFunction, full: Program | None,
                          num_microbatches: int, micro_rows: int | None) -> RandomRows:
    """``forward`` (the loss at one micro-batch, ``micro_rows`` rows) with its batch-shaped
    random draws made as for the whole batch; ``full``: the same loss traced with the whole
    batch (``None`` if that failed, or ``micro_rows`` is ``None``, the batch arguments'
    leading dimensions differing: then draws whose leading dimension is ``micro_rows``, or
    all draws, are reported, since they cannot be told apart from others)."""
    F = forward.program
    mine = _draws(F)
    if not mine or num_microbatches == 1:
        return RandomRows(forward)
    theirs = _draws(full) if full is not None and micro_rows else None
    if theirs is None or [(d.name, d.within) for d in mine] != \
            [(d.name, d.within) for d in theirs]:
        suspects = tuple(f"{_where(forward, d)} (it cannot be matched with the whole "
                         f"batch's draws)"
                         for d in mine if micro_rows is None or d.shape[:1] == (micro_rows,))
        return RandomRows(forward, (), suspects)
    rewrites: dict[int, int] = {}
    problems = []
    for d, whole in zip(mine, theirs):
        shape, whole = d.shape, whole.shape
        if shape == whole:
            continue   # does not follow the batch: the same in every micro-batch, as in jit
        key = F.eqns[d.eqn].inputs[0]
        reason = None
        if d.within in CUSTOM_RULE_CALLS:
            reason = (f"its shape is {whole} for the whole batch, and the function with a "
                      f"custom gradient ({d.within}) runs whole, as jax runs it, to apply "
                      f"its rule")
        elif d.within:
            reason = (f"its shape is {whole} for the whole batch, and the {d.within} is "
                      f"not unrolled")
        elif isinstance(key, Literal) or F.avals[key].shape != ():
            reason = "it draws from an array of keys"
        elif not shape or whole != (shape[0] * num_microbatches,) + shape[1:]:
            reason = (f"its shape is {whole} for the whole batch: only a leading batch "
                      f"dimension is reproduced")
        elif not jax.config.jax_threefry_partitionable:
            reason = "jax_threefry_partitionable is off"
        elif math.prod(shape) >= 2 ** 32 or math.prod(shape[1:]) >= 2 ** 32:
            reason = "a micro-batch draws 2**32 or more values"
        if reason is None:
            rewrites[d.eqn] = math.prod(shape[1:])
        else:
            problems.append(f"{_where(forward, d)} ({reason})")
    if not rewrites:
        return RandomRows(forward, (), tuple(problems))
    snippets = {}
    for e, stride in rewrites.items():
        snippet, impl = _snippet(F.eqns[e], F.avals[F.eqns[e].inputs[0]], micro_rows)
        if impl == _THREEFRY:
            snippets[e] = (snippet, stride)
        else:
            draw = _Draw(e, F.eqns[e].primitive.name, tuple(F.eqns[e].params["shape"]))
            problems.append(f"{_where(forward, draw)} (its key's PRNG is {impl}, not "
                            f"{_THREEFRY})")
    if not snippets:
        return RandomRows(forward, (), tuple(problems))
    strides = tuple(sorted({stride for _, stride in snippets.values()}))
    # a jax.checkpoint or cond drawing these is differentiated as it is (its call run
    # again would draw them as the user's call does, at the micro-batch's shape)
    eqns = with_dissolved(F.eqns, REMAT_CALLS | BRANCH_CALLS,
                          lambda m, inside: not any(e in snippets for e in inside))
    forward = dataclasses.replace(forward, program=dataclasses.replace(F, eqns=eqns))
    return RandomRows(_splice(forward, snippets, strides), strides, tuple(problems))


def _snippet(eqn, key_aval, micro_rows: int) -> tuple[TracedFunction, str]:
    """``eqn`` (a random draw) redone by :func:`_bits` / :func:`_split` as a program of
    (key, row table), and the key's PRNG implementation."""
    shape = tuple(eqn.params["shape"])
    impl = []

    def redo(key, table):
        impl.append(str(jax.random.key_impl(key)))
        if impl[-1] != _THREEFRY:   # left as it is
            return bind(eqn.primitive, eqn.params, [key])[0]
        if eqn.primitive.name == "random_bits":
            return _bits(key, table, eqn.params["bit_width"], shape)
        return _split(key, table, shape)

    traced = trace(redo, [jax.ShapeDtypeStruct((), key_aval.dtype),
                          jax.ShapeDtypeStruct((micro_rows, 2), jnp.uint32)])
    return traced, impl[0]


def _splice(forward: TracedFunction, snippets, strides) -> TracedFunction:
    """``forward`` with each equation ``e`` in ``snippets`` replaced by its snippet's
    equations (keeping ``e``'s source), one row-table input per stride appended; value ids
    renumbered in program order."""
    F = forward.program
    avals = list(F.avals)
    constants = list(F.constants)

    def new_value(aval) -> int:
        avals.append(aval)
        return len(avals) - 1

    tables = {}
    for stride in strides:
        snippet = next(t for t, s in snippets.values() if s == stride)
        tables[stride] = new_value(snippet.program.avals[snippet.program.invars[1]])
    eqns, sources = [], []
    for e, eqn in enumerate(F.eqns):
        if e not in snippets:
            eqns.append(eqn)
            sources.append(forward.sources[e])
            continue
        snippet, stride = snippets[e]
        P = snippet.program
        ids = {P.invars[0]: eqn.inputs[0], P.invars[1]: tables[stride]}
        out = P.outvars[0]
        assert isinstance(out, int) and out not in ids
        ids[out] = eqn.outputs[0]
        for v, c in P.constants:
            ids[v] = new_value(P.avals[v])
            constants.append((ids[v], c))

        def local(atom, P=P, ids=ids):
            if isinstance(atom, Literal):
                return atom
            if atom not in ids:
                ids[atom] = new_value(P.avals[atom])
            return ids[atom]

        for peqn in P.eqns:
            eqns.append(Equation(peqn.primitive, peqn.params,
                                 tuple(local(a) for a in peqn.inputs),
                                 tuple(local(v) for v in peqn.outputs), peqn.source_info))
            sources.append(forward.sources[e])
    invars = tuple(F.invars) + tuple(tables[s] for s in strides)
    # renumber: inputs, constants, then each equation's outputs in order
    order = list(invars) + [v for v, _ in constants] + [v for q in eqns for v in q.outputs]
    new = {v: k for k, v in enumerate(order)}
    rename = lambda a: a if isinstance(a, Literal) else new[a]  # noqa: E731
    program = Program(tuple(avals[v] for v in order), tuple(new[v] for v in invars),
                      tuple(rename(a) for a in F.outvars),
                      tuple(Equation(q.primitive, q.params, tuple(rename(a) for a in q.inputs),
                                     tuple(new[v] for v in q.outputs), q.source_info)
                            for q in eqns),
                      tuple((new[v], c) for v, c in constants))
    n = len(invars)
    return dataclasses.replace(
        forward, program=program, in_tree=jax.tree_util.tree_structure((0,) * n),
        in_paths=forward.in_paths + tuple(f"random_rows[{s}]" for s in strides),
        sources=tuple(sources))
