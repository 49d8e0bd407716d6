"""intra.dot_layouts: the dot operands XLA copies into another dimension order."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from autoshard.intra.dot_layouts import dot_operands
from autoshard.intra.dot_orders import copied_orders
from autoshard.ir.trace import trace

# (einsum, lhs shape, rhs shape, operands XLA copies), measured on the CPU with jax 0.10
EINSUMS = [
    ("gsec,egcd->gsd", (16, 8, 8, 4), (8, 16, 4, 32), 2),  # MoE combine: batch g not outermost
    ("gsd,egcd->gsec", (16, 8, 32), (8, 16, 4, 32), 1),    # its gradient: only the rhs moves
    ("bqhd,bkhd->bhqk", (2, 8, 4, 16), (2, 8, 4, 16), 2),  # attention scores
    ("sgc,gsd->gcd", (8, 4, 32), (4, 8, 16), 1),
    ("bsd,df->bsf", (2, 8, 16), (16, 32), 0),              # free dims (b, s) merge in place
    ("gsc,gsd->gcd", (4, 8, 32), (4, 8, 16), 0),           # canonical: one of each, batch first
    ("gcs,gsd->gcd", (4, 32, 8), (4, 8, 16), 0),
    ("egcd,edf->egcf", (8, 4, 4, 16), (8, 16, 32), 0),
    ("bsf,bsd->fd", (2, 8, 32), (2, 8, 16), 1),            # a weight gradient: lhs to (f, bs)
    ("gsd,gsec->gdec", (16, 8, 32), (16, 8, 8, 4), 0),     # MoE dispatch: s, then d, read so
    ("bhqk,bkhd->bhqd", (2, 4, 8, 8), (2, 8, 4, 16), 1),   # attention values: only v moves
]


def _copies_in_hlo(fn, *args) -> int:
    """Instructions of the compiled entry computation that copy or transpose a buffer."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    names = re.findall(r"^\s*(?:ROOT )?%(\S+) = ", entry, flags=re.MULTILINE)
    return sum("copy" in name or "transpose" in name for name in names)


@pytest.mark.parametrize("spec,lhs,rhs,copied", EINSUMS, ids=[e[0] for e in EINSUMS])
def test_copied_operands_are_those_xla_copies(spec, lhs, rhs, copied):
    # The operands are arguments, so no copy can fuse into the equation making them: the
    # compiled program holds exactly one copy per operand the model says XLA moves.
    def fn(x, y):
        return jnp.einsum(spec, x, y)

    x, y = jnp.ones(lhs), jnp.ones(rhs)
    program = trace(fn, (x, y)).program
    [dot] = [e for e in program.eqns if e.primitive.name == "dot_general"]
    assert len(copied_orders(dot.params["dimension_numbers"], lhs, rhs)) == copied
    assert _copies_in_hlo(fn, x, y) == copied


def test_dimensions_of_size_one_do_not_count():
    # The MoE dispatch on its expert-split layout: with one expert per device the free
    # dims (e, c) of the dispatch mask are one, and the dot is canonical.
    numbers = (((3, 2), (2, 0)), ((0,), (1,)))  # gsec,egcd->gsd as jax writes it
    assert [i for i, _ in copied_orders(numbers, (16, 8, 8, 4), (8, 16, 4, 32))] == [0, 1]
    assert copied_orders(numbers, (16, 8, 1, 4), (1, 16, 4, 32)) == ()


def test_a_copy_fuses_into_the_elementwise_equation_making_its_only_operand():
    def fn(x, y):
        return jnp.einsum("bqhd,bkhd->bhqk", jnp.tanh(x), y)

    x = y = jnp.ones((2, 8, 4, 16))
    program = trace(fn, (x, y)).program
    [found] = dot_operands(program).values()
    assert found.fusible == (True, False)  # tanh(x) writes the copied order; y is an argument
    # compiled: tanh and its transpose are one fusion, y's copy another, then the dot
    text = jax.jit(fn).lower(x, y).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    made = re.findall(r"^\s*(?:ROOT )?%\S+ = \S+ (\w+)\(", entry, flags=re.MULTILINE)
    assert [op for op in made if op != "parameter"] == ["fusion", "fusion", "fusion"]
