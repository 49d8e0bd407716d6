"""Peak bytes as XLA's buffer assignment places a program's values (intra/buffer_assignment)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from autoshard.intra.buffer_assignment import assigned_peak_bytes
from autoshard.intra.liveness import live_bytes, live_ranges, output_births
from autoshard.ir.trace import trace

BLOCK = 8 * 8 * 4  # bytes of every value of the program below


def _chain(x):
    y = x @ x      # step 0
    u = y @ y      # step 1
    return u @ u   # step 2: the output z


@pytest.fixture(scope="module")
def program():
    return trace(_chain, (jax.ShapeDtypeStruct((8, 8), jnp.float32),)).program


def _peaks(program, temps, donated=()):
    """(assigned peak, every value its own buffer) with ``temps`` {negative id: (span,
    bytes)} added to the program's values, each BLOCK bytes."""
    ranges = dict(live_ranges(program, donated))
    sizes = dict.fromkeys(ranges, BLOCK)
    for t, (span, nbytes) in temps.items():
        ranges[t], sizes[t] = span, nbytes
    every = int(max(live_bytes(ranges, sizes, len(program.eqns))))
    return assigned_peak_bytes(program, ranges, sizes, donated), every


def test_the_output_is_first_written_at_its_own_step(program):
    (z,) = program.outvars
    assert output_births(program) == {z: 2}


def test_a_temporary_sits_in_the_output_buffer_until_the_output_is_written(program):
    # Largest first, outputs first among equals: z gets an allocation (written at step
    # 2); y (steps 0-1) fits in it before z is written; u (1-2) overlaps z and goes to the
    # heap, as does the one-block temporary at step 0 (y holds z's allocation then). x
    # (argument, whole run) + z's allocation + the heap's largest moment (1 block): 3
    # blocks. Each value its own buffer: z from step 0, so step 0 holds x, z, y and the
    # temporary: 4. The temporary at step 1 instead: the heap holds it and u, 4 blocks
    # against x, z, y, u and it: 5.
    assert _peaks(program, {-1: ((0, 0), BLOCK)}) == (3 * BLOCK, 4 * BLOCK)
    assert _peaks(program, {-1: ((1, 1), BLOCK)}) == (4 * BLOCK, 5 * BLOCK)


def test_a_temporary_larger_than_every_allocation_goes_to_the_heap(program):
    # two blocks at step 1: no allocation is that large; the heap holds it and u (3
    # blocks), y sits in z's allocation: x + z + 3 = 5 blocks (each value alone: 6)
    assert _peaks(program, {-1: ((1, 1), 2 * BLOCK)}) == (5 * BLOCK, 6 * BLOCK)


def test_a_donated_argument_keeps_its_allocation_for_the_output(program):
    (x,) = program.invars
    # x is last read at step 0 and z takes its buffer over at step 2; step 1's one-block
    # temporary sits in that allocation between them: the allocation (1 block) and the
    # heap's y + u at step 1 (2 blocks) make 3, as counting each value alone (y, u and
    # the temporary at step 1).
    assert _peaks(program, {-1: ((1, 1), BLOCK)}, donated=[x]) == (3 * BLOCK, 3 * BLOCK)
    # a two-block temporary does not fit there: the allocation stays reserved (XLA
    # frees no argument's buffer) while counting each value alone frees it: 5 against 4
    assert _peaks(program, {-1: ((1, 1), 2 * BLOCK)}, donated=[x]) == (5 * BLOCK, 4 * BLOCK)
