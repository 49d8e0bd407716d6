"""The liveness model behind plan.cost.peak_memory_bytes and the memory constraints."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import autoshard
from autoshard.cost_model import MeshCostModel
from autoshard.intra.liveness import live_ranges
from autoshard.intra.memory_points import copy_bytes, copy_bytes_table
from autoshard.ir.trace import trace


def _sgd_step(w, x):
    g = jax.lax.dot_general(x, x, (((0,), (0,)), ((), ())))  # xᵀx: the "gradient", w's shape
    return w - 0.1 * g     # updated in place by XLA: 0.1 * g reuses g, the update reuses that


@pytest.fixture(scope="module")
def program():
    structs = (jax.ShapeDtypeStruct((4, 4), jnp.float32), jax.ShapeDtypeStruct((3, 4), jnp.float32))
    return trace(_sgd_step, structs).program


def test_output_buffer_held_from_the_start_and_its_in_place_chain_is_free(program):
    ranges = live_ranges(program)
    (out,) = program.outvars
    end = len(program.eqns) - 1
    assert ranges[out] == (0, end)  # XLA allocates a non-aliased output for the whole run
    dot, mul = program.eqns[0].outputs[0], program.eqns[1].outputs[0]
    assert program.eqns[0].primitive.name == "dot_general"
    # g and 0.1 * g are overwritten in place on the way to the output: no buffer of their own
    assert dot not in ranges and mul not in ranges
    w, x = program.invars
    assert ranges[w] == (0, end) and ranges[x] == (0, end)  # not donated: held by the caller


def test_donated_argument_hands_its_buffer_to_the_output(program):
    w, x = program.invars
    ranges = live_ranges(program, donated=[w])
    (out,) = program.outvars
    sub = len(program.eqns) - 1
    assert ranges[w] == (0, sub)      # dies at its last read, the update
    assert ranges[out] == (sub, sub)  # the output takes over w's buffer there
    assert program.eqns[0].outputs[0] in ranges  # the gradient has a buffer of its own


@pytest.mark.parametrize("src, dst, expected", [
    # gather the outer dim: one buffer of the full tensor
    (((0,), ()), ((), ()), 512 * 256 * 4),
    # gather an inner dim: XLA gathers it as the major dim, then copies to row-major order
    (((), (0,)), ((), ()), 2 * 512 * 256 * 4),
    # slice a replicated tensor: one buffer of the reader's shard
    (((), ()), ((0,), ()), 64 * 256 * 4),
    (((), ()), ((), ()), 0),
])
def test_copy_bytes(src, dst, expected):
    model = MeshCostModel(autoshard.cluster_preset("host-cpu"), (8,))
    aval = jax.ShapeDtypeStruct((512, 256), jnp.float32)
    assert copy_bytes(model, aval, src, dst) == expected


def test_copy_bytes_table_is_copy_bytes_of_every_pair():
    model = MeshCostModel(autoshard.cluster_preset("host-cpu"), (2, 4))
    aval = jax.ShapeDtypeStruct((8, 1, 16), jnp.bfloat16)
    specs = [((), (), ()), ((0,), (), ()), ((1,), (), (0,)), ((), (), (1, 0)), ((0, 1), (), ()),
             ((), (), (0,)), ((1,), (), ())]
    table = copy_bytes_table(model, aval, specs, specs[::-1])
    assert table.shape == (7, 7) and (table > 0).sum() == 7 * 7 - 7
    for i, src in enumerate(specs):
        for j, dst in enumerate(specs[::-1]):
            assert table[i, j] == copy_bytes(model, aval, src, dst), (src, dst)
