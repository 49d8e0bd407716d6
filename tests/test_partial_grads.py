"""Gradients reduced once per step in a data-parallel pipeline stage
(autoshard/pipeline/partial_grads.py): the backward keeps per-device partial sums, the
runtime accumulates them over micro-batches, one reduction program sums them per step."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.ir.hlo import collective_stats
from autoshard.ir.trace import trace
from autoshard.pipeline import build, planner
from autoshard.pipeline.partial_grads import deferred_backward, partial_gradients
from autoshard.runtime import evaluate_program
from tests.trees import assert_trees_allclose

H100 = autoshard.cluster_preset("h100-80gb")


def _mlp_step(width=128, batch=4096, shared=False):
    """A 4-layer tanh MLP trained with adamw, the loss closing over the batch. ``shared``:
    layers 1 and 2 use one weight (its gradient is the sum of two contractions)."""
    keys = jax.random.split(jax.random.key(0), 6)
    params = [{"w": jax.random.normal(k, (width, width)) / width ** 0.5, "b": jnp.zeros(width)}
              for k in keys[:4]]
    x = jax.random.normal(keys[4], (batch, width))
    y = jax.random.normal(keys[5], (batch, width))
    opt = optax.adamw(1e-3)

    def step(params, opt_state, x, y):
        def loss(ps):
            h = x
            for i in range(4):
                p = ps[1] if shared and i == 2 else ps[i]
                h = jnp.tanh(h @ p["w"] + p["b"])
            return jnp.mean((h - y) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step, (params, opt.init(params), x, y)


def _pipelined(step, num_microbatches, num_layers=4):
    method = autoshard.PipeshardParallel(num_microbatches=num_microbatches, num_stages=2,
                                         num_layers=num_layers)
    return autoshard.parallelize(step, mesh=autoshard.make_mesh((8,), ("data",)),
                                 method=method, cluster=H100)


def _gradient_all_reduces(compiled) -> tuple[int, int]:
    """(count, bytes) of the all-reduces one step runs outside the forward programs (the
    forwards' all-reduce is the loss's mean)."""
    count = nbytes = 0
    for name in compiled.names:
        if "forward" in name:
            continue
        stats = collective_stats(compiled[name].as_text())["all-reduce"]
        count += compiled.runs_per_step[name] * stats["count"]
        nbytes += compiled.runs_per_step[name] * stats["bytes"]
    return count, nbytes


def test_gradient_all_reduces_per_step_do_not_grow_with_microbatches():
    step, args = _mlp_step()
    expected = jax.jit(step)(*args)
    per_step = {}
    for B in (1, 4):
        pipelined = _pipelined(step, B)
        compiled = pipelined.lower(*args).compile()
        per_step[B] = _gradient_all_reduces(compiled)
        if B > 1:   # the data-parallel stage's backward reduces nothing per micro-batch
            assert any("gradient reduction" in n for n in compiled.names)
            for name in compiled.names:
                if "backward" in name:
                    assert collective_stats(compiled[name].as_text())["all-reduce"]["count"] == 0
        assert_trees_allclose(pipelined(*args), expected)
    assert per_step[1][0] > 0
    assert per_step[4] == per_step[1]


def test_deferring_is_priced_and_compiled_as_once_per_step(monkeypatch):
    # The same pipeline with the rewrite switched off all-reduces the gradients in every
    # micro-batch's backward: 4x the bytes at B = 4, and a higher modelled cost. (Two
    # layers, two stages: one slicing, whatever the stage costs.)
    step, args = _mlp_step(batch=8192)
    on = _pipelined(step, 4, num_layers=2)
    plan_on, bytes_on = on.plan(*args), _gradient_all_reduces(on.lower(*args).compile())[1]
    reductions = [c for c in plan_on.collectives if "gradient reduction once per step" in c.op]
    assert reductions and all(c.kind == "all-reduce" for c in reductions)
    for module in (planner, build):
        monkeypatch.setattr(module, "stage_partial_gradients", lambda *a, **k: ())
    off = _pipelined(step, 4, num_layers=2)
    plan_off, bytes_off = off.plan(*args), _gradient_all_reduces(off.lower(*args).compile())[1]
    assert bytes_on > 0 and bytes_off == 4 * bytes_on
    assert plan_on.cost.communication_s < plan_off.cost.communication_s
    assert plan_on.cost.total_s < plan_off.cost.total_s


def test_a_weight_shared_by_two_layers_and_a_saved_plan():
    step, args = _mlp_step(shared=True)
    pipelined = _pipelined(step, 4)
    plan = pipelined.plan(*args)
    expected = jax.jit(step)(*args)
    assert_trees_allclose(pipelined(*args), expected)
    again = autoshard.parallelize(step, mesh=autoshard.make_mesh((8,), ("data",)),
                                  plan=autoshard.Plan.from_json(plan.to_json()))
    compiled = again.lower(*args).compile()
    assert any("gradient reduction" in n for n in compiled.names)
    assert_trees_allclose(again(*args), expected)


# --------------------------------------------------------------------------- the rewrite
# A contraction over a batch of 8 rows split over a mesh axis "data" of 4 devices.
SIZES = (("data",), (4,))


def _contraction(rows=8, also_read=False):
    def grads(x, c):
        g = jax.lax.dot_general(x, c, (((0,), (0,)), ((), ())))
        bias = jnp.sum(c, axis=0)
        return [g.T.astype(jnp.float16), bias] + ([g * 2.0] if also_read else [])

    x = jax.ShapeDtypeStruct((rows, 3), jnp.float32)
    c = jax.ShapeDtypeStruct((rows, 5), jnp.float32)
    return trace(grads, [x, c]).program


def _specs(program, value_specs=()):
    return types.SimpleNamespace(flat_in_specs=(P("data"), P("data")),
                                 value_specs=tuple(value_specs), operand_specs=())


def _found(program, specs):
    return partial_gradients(program, program, range(len(program.eqns)),
                             range(len(program.outvars)), specs, *SIZES)


def test_a_contraction_reduced_over_the_batch_axis_becomes_partial_sums():
    program = _contraction()
    specs = _specs(program)
    found = _found(program, specs)
    # the weight gradient (through a transpose and a dtype conversion) and the bias gradient
    assert [(p.output, p.axes, p.groups, p.partial_spec) for p in found] == \
        [(0, ("data",), 4, P("data")), (1, ("data",), 4, P("data"))]
    rewritten, value_specs, _ = deferred_backward(program, program, range(len(program.eqns)),
                                                  found, specs, *SIZES)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    c = np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32)
    whole = evaluate_program(program, [x, c])
    partial = evaluate_program(rewritten, [x, c])
    assert partial[0].shape == (4, 5, 3) and partial[1].shape == (4, 5)
    for w, p in zip(whole, partial):
        np.testing.assert_allclose(np.asarray(p, np.float32).sum(0), np.asarray(w, np.float32),
                                   rtol=1e-2, atol=1e-2)
    assert value_specs[rewritten.outvars[0]] == P("data", None, None)


@pytest.mark.parametrize("case", ["result keeps the split", "split after it", "read by another op",
                                  "uneven"])
def test_what_is_not_deferred(case):
    if case == "result keeps the split":  # a reduce-scatter: the gradient stays split
        program = _contraction()
        g = next(e for e in program.eqns if e.primitive.name == "dot_general").outputs[0]
        specs = _specs(program, [(g, P("data", None))])
        assert [p.output for p in _found(program, specs)] == [1]
    elif case == "split after it":   # the gradient itself laid out over the reducing axis
        program = _contraction()
        specs = _specs(program, [(program.outvars[0], P("data", None))])
        assert [p.output for p in _found(program, specs)] == [1]
    elif case == "read by another op":
        program = _contraction(also_read=True)
        assert [p.output for p in _found(program, _specs(program))] == [1]
    else:   # 6 rows do not split into 4 groups evenly
        program = _contraction(rows=6)
        assert _found(program, _specs(program)) == ()


def test_an_embedding_gradient_scattered_into_zeros_becomes_partial_sums():
    # the transpose of a gather (a token embedding's lookup): scatter-add of each row's
    # cotangent into a zero table, the rows split over "data"
    def grads(table, tokens, ct):
        return jax.vjp(lambda t: jnp.take(t, tokens, axis=0), table)[1](ct)

    program = trace(grads, [jax.ShapeDtypeStruct((16, 3), jnp.float32),
                            jax.ShapeDtypeStruct((8, 2), jnp.int32),
                            jax.ShapeDtypeStruct((8, 2, 3), jnp.float32)]).program
    scatter = next(e for e in program.eqns if e.primitive.name == "scatter-add")
    specs = types.SimpleNamespace(flat_in_specs=(P(), P("data"), P("data")),
                                  value_specs=((scatter.inputs[1], P("data")),), operand_specs=())
    found = _found(program, specs)
    assert [(p.output, p.partial_spec) for p in found] == [(0, P("data"))]
    rewritten, _, _ = deferred_backward(program, program, range(len(program.eqns)), found,
                                        specs, *SIZES)
    rng = np.random.default_rng(0)
    args = [rng.normal(size=(16, 3)).astype(np.float32),
            rng.integers(0, 16, size=(8, 2)).astype(np.int32),
            rng.normal(size=(8, 2, 3)).astype(np.float32)]
    whole, = evaluate_program(program, args)
    partial, = evaluate_program(rewritten, args)
    assert partial.shape == (4, 16, 3)
    np.testing.assert_allclose(np.asarray(partial).sum(0), np.asarray(whole), rtol=1e-6,
                               atol=1e-6)
