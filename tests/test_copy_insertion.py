"""Donated arguments XLA copies before the step writes over them (intra/copy_insertion)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from autoshard.intra.copy_insertion import copied_arguments
from autoshard.ir.trace import trace


def _sgd_step(params, x):
    def loss(params):
        h = x
        for w in params:
            h = jnp.tanh(h @ w)
        return jnp.sum(h ** 2)

    grads = jax.grad(loss)(params)
    return [w - 0.1 * g for w, g in zip(params, grads)]


@pytest.fixture(scope="module")
def structs():
    return ([jax.ShapeDtypeStruct((64, 64), jnp.float32)] * 3,
            jax.ShapeDtypeStruct((16, 64), jnp.float32))


def test_weights_read_for_an_input_gradient_are_copied(structs):
    # w1 is read by the forward product alone, which its gradient xᵀ·dy depends on; w2
    # and w3 are also read for the input gradient dy·wᵀ that their own updates do not
    # wait for: XLA copies them so that the update may be written first
    program = trace(_sgd_step, structs).program
    w1, w2, w3, _ = program.invars
    assert copied_arguments(program, donated=[w1, w2, w3]) == {w2, w3}
    assert copied_arguments(program, donated=[w1]) == set()
    assert copied_arguments(program, donated=()) == set()


def test_a_merged_gradient_all_reduce_orders_every_read(structs):
    # merged, every update waits for every gradient, hence for the whole backward pass
    program = trace(_sgd_step, structs).program
    gradients = {eqn.outputs[0] for eqn in program.eqns if eqn.primitive.name == "dot_general"
                 and tuple(program.avals[eqn.outputs[0]].shape) == (64, 64)}
    assert len(gradients) == 3
    assert copied_arguments(program, program.invars[:3], merged=gradients) == set()


def test_xla_copies_the_same_arguments(structs):
    text = jax.jit(_sgd_step, donate_argnums=0).lower(*structs).compile().as_text()
    entry = text[text.index("ENTRY"):]
    number = dict(re.findall(r"(%[\w.]+) = \S+ parameter\((\d+)\)", entry))
    copied = {int(number[operand]) for operand in re.findall(r"= \S+ copy\((%[\w.]+)\)", entry)
              if operand in number}
    assert copied == {1, 2}
