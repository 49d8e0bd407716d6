"""The liveness model behind plan.cost.peak_memory_bytes and the memory constraints."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import autoshard
from autoshard.cost_model import MeshCostModel
from autoshard.intra.liveness import live_ranges, output_births
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


def _made_by(program, name):
    return [e.outputs[0] for e in program.eqns if e.primitive.name == name]


def test_a_fused_value_read_late_keeps_what_it_is_made_from():
    # s = x @ w (materialized by the matmul); m = s * 2 is fused into both of its readers, the
    # forward's sum and the late product with y @ y (the "backward pass"): XLA computes m in
    # each of them from s, so s lives until the late read, as its compiled program holds it
    def step(x, w, y):
        s = x @ w
        m = s * 2.0
        late = y @ y.T
        return m.sum() + (m * late).sum()
    structs = [jax.ShapeDtypeStruct((8, 8), jnp.float32)] * 3
    program = trace(step, structs).program
    ranges = live_ranges(program)
    s, late_matmul = _made_by(program, "dot_general")
    (m,) = [e.outputs[0] for e in program.eqns if e.primitive.name == "mul"
            and s in e.inputs]
    late_read = max(e for e, eqn in enumerate(program.eqns) if m in eqn.inputs)
    assert m not in ranges  # fused: never in memory
    # until the late read's own fusion (the sum it feeds) runs, after the late matmul
    assert ranges[s][1] >= late_read > ranges[late_matmul][0]


def test_a_fused_chain_that_ends_in_an_output_does_not_extend_its_operands():
    # an optimizer-like update: XLA runs each output's fusion as soon as its operands exist,
    # whatever order the program lists the updates in
    def step(w1, w2, x):
        g1, g2 = x.T @ x, x @ x.T
        return w1 - 0.1 * g1.T, w2 - 0.1 * g2.T
    structs = [jax.ShapeDtypeStruct((8, 8), jnp.float32)] * 3
    program = trace(step, structs).program
    ranges = live_ranges(program)
    g1 = _made_by(program, "dot_general")[0]
    (g1_t,) = [e.outputs[0] for e in program.eqns if e.primitive.name == "transpose"
               and g1 in e.inputs]
    assert ranges[g1][1] == next(e for e, eqn in enumerate(program.eqns) if g1 in eqn.inputs)
    assert g1_t not in ranges


@pytest.mark.parametrize("side, written", [(8, False), (64, True)])
def test_a_value_a_large_reduction_shares_with_another_reader_is_written_once(side, written):
    # like a normalization's two sums over x - m: XLA's CPU backend runs a reduction of
    # 4096 elements or more as a library fusion, which takes no producer that something
    # else reads, so x - m is written once and both sums read it; smaller reductions'
    # loop fusions each recompute it
    def step(x, m):
        d = x - m
        return jnp.sum(d ** 2, axis=0) + jnp.sum(d * 2.0, axis=1)
    structs = [jax.ShapeDtypeStruct((side, side), jnp.float32),
               jax.ShapeDtypeStruct((side,), jnp.float32)]
    program = trace(step, structs).program
    (d,) = _made_by(program, "sub")
    assert (d in live_ranges(program)) == written
    # as XLA compiles it: a fusion writes the [side, side] difference only when written once
    hlo = jax.jit(step).lower(*structs).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    assert len(re.findall(rf"= f32\[{side},{side}\]\S* fusion\(", entry)) == int(written)


def test_an_expensive_op_read_twice_is_written_once_not_fused():
    # exp is not duplicated into its two readers (XLA's IsExpensive); an add would be
    def step(x):
        e, a = jnp.exp(x), x + 1.0
        return (e * 2.0).sum() + (e * 3.0).sum() + (a * 2.0).sum() + (a * 3.0).sum()
    program = trace(step, [jax.ShapeDtypeStruct((8, 8), jnp.float32)]).program
    ranges = live_ranges(program)
    (e,) = _made_by(program, "exp")
    (a,) = [eqn.outputs[0] for eqn in program.eqns if eqn.primitive.name == "add"
            and program.invars[0] in eqn.inputs]
    assert e in ranges and a not in ranges


def _embedding_sgd_step(table, w, tokens):
    def loss(table, w):
        return jnp.sum(jnp.tanh(table[tokens] @ w))  # the lookup's gradient: a scatter-add

    g_table, g_w = jax.grad(loss, argnums=(0, 1))(table, w)
    return table - 0.1 * g_table, w - 0.1 * g_w


@pytest.mark.parametrize("donate", [False, True], ids=["kept", "donated"])
def test_an_embedding_gradients_zeros_are_made_before_the_forward_pass(donate):
    # XLA's post-order schedule makes the zeros a scatter-add sums into (its first
    # operand, made from constants) before everything the scatter waits for: the zeroed
    # gradient of the table is held through both passes (measured on the embedding
    # benchmark model: made before the forward pass's first dot).
    structs = (jax.ShapeDtypeStruct((64, 8), jnp.float32),
               jax.ShapeDtypeStruct((8, 8), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.int32))
    program = trace(_embedding_sgd_step, structs).program
    [scatter] = [e for e in program.eqns if e.primitive.name == "scatter-add"]
    zeros = scatter.inputs[0]
    table = program.invars[0]
    ranges = live_ranges(program, donated=[table] if donate else [])
    first_dot = next(e for e, eqn in enumerate(program.eqns) if eqn.primitive.name == "dot_general")
    if donate:  # the new table takes over the old one's buffer: the zeros have their own
        assert ranges[zeros][0] < first_dot
    else:  # the zeros, the scatter and the update share the new table's buffer from there
        assert zeros not in ranges
        births = output_births(program)
        assert births[program.outvars[0]] < first_dot


def _conv_sgd_step(kernel, x):
    def loss(kernel, x):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y) ** 2)
    g_kernel, g_x = jax.grad(loss, argnums=(0, 1))(kernel, x)
    return kernel - 0.1 * g_kernel, g_x


@pytest.mark.parametrize("donate", [False, True], ids=["kept", "donated"])
def test_a_donated_kernels_flip_is_made_before_the_forward_pass(donate):
    # XLA makes the flipped kernel the input gradient reads first of all (measured on the
    # Wide-ResNet benchmark block): donated, on the heap through both passes; kept, in
    # the new kernel's buffer, where the traced order cannot place it, so at its own step
    structs = (jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32),
               jax.ShapeDtypeStruct((2, 8, 8, 8), jnp.float32))
    program = trace(_conv_sgd_step, structs).program
    [(step, flip)] = [(e, eqn.outputs[0]) for e, eqn in enumerate(program.eqns)
                      if eqn.primitive.name == "rev"]
    first_conv = next(e for e, eqn in enumerate(program.eqns)
                      if eqn.primitive.name == "conv_general_dilated")
    ranges = live_ranges(program, donated=[program.invars[0]] if donate else [])
    assert step > first_conv  # traced in the backward pass
    assert ranges[flip][0] == (0 if donate else step)
