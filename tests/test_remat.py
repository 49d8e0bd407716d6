"""A user's ``jax.checkpoint`` survives planning: the backward pass recomputes what the
user asked not to store, in the traced program and in the compiled plan."""
from __future__ import annotations

import jax
import jax.numpy as jnp

import autoshard
from autoshard.ir.trace import trace
from examples.models import gpt
from tests.trees import assert_trees_allclose


def _checkpointed_loss(ws, x):
    for w in ws:
        x = jax.checkpoint(lambda w, x: jnp.tanh(x @ w))(w, x)
    return x.sum()


def test_recomputation_reads_its_operands_through_barriers():
    ws = [jnp.ones((4, 4)), jnp.ones((4, 4))]
    traced = trace(jax.grad(_checkpointed_loss), (ws, jnp.ones((2, 4))), ())
    eqns = traced.program.eqns
    names = [e.primitive.name for e in eqns]
    made_by = {v: e for e in eqns for v in e.outputs}
    # forward: 2 matmuls; backward: each block recomputes its matmul, then 2 gradient
    # matmuls (the first block's input gradient is not needed): 2 + 2 * 1 + 3 = 7
    assert names.count("dot_general") == 7
    # every recomputed tanh reads a matmul of barrier outputs only (3 operands per block:
    # its weight, its input and the incoming cotangent)
    assert names.count("optimization_barrier") == 6
    tanhs = [e for e in eqns if e.primitive.name == "tanh"]
    forward, recomputed = tanhs[:2], tanhs[2:]
    assert len(recomputed) == 2
    for tanh in recomputed:
        matmul = made_by[tanh.inputs[0]]
        assert all(made_by[a].primitive.name == "optimization_barrier" for a in matmul.inputs)
    for tanh in forward:
        matmul = made_by.get(tanh.inputs[0])
        assert all(a not in made_by or made_by[a].primitive.name != "optimization_barrier"
                   for a in matmul.inputs)


def test_user_checkpoint_is_recomputed_in_the_compiled_plan():
    # one mesh: (8,) plans in ~1 s; (2, 4) gave the same answer after a 136k-variable LP
    mesh = autoshard.make_mesh((8,), ("devices",))
    flops = {}
    for remat in (False, True):
        w = gpt(num_layers=2, d_model=64, heads=4, seq=32, batch=16, remat=remat)
        step = autoshard.parallelize(w.fn, mesh=mesh, batch_argnums=w.batch_argnums)
        compiled = step.lower(*w.args).compile()
        flops[remat] = compiled.cost_analysis()["flops"]
        reference = jax.jit(w.fn)
        flops[("jit", remat)] = reference.lower(*w.args).compile().cost_analysis()["flops"]
        assert_trees_allclose(step(*w.args), reference(*w.args))
    # jax.jit recomputes the blocks' forward in the backward pass; so must the plan (before
    # the barriers, XLA merged the recomputation with the forward pass: equal flops)
    jit_extra = flops[("jit", True)] / flops[("jit", False)] - 1
    assert jit_extra > 0.1
    assert flops[True] / flops[False] - 1 > 0.5 * jit_extra
