"""The tracer: every equation keeps where it came from, in user code and in the model's
module tree (jax's name stack, which flax and ``jax.named_scope`` set)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import autoshard
from autoshard.ir.trace import trace
from tests.compiled_bytes import replicated_bytes
from tests.user_steps import users_mlp_step


def _step(params, x):
    def loss(p):
        with jax.named_scope("encoder"):
            with jax.named_scope("dense_0"):
                h = jnp.tanh(x @ p["w0"])
            h = jax.jit(lambda h, w: h @ w)(h, p["w1"])   # an inlined call keeps its scope
        return jnp.mean(h ** 2)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))


ARGS = ({"w0": jax.ShapeDtypeStruct((64, 256), jnp.float32),
         "w1": jax.ShapeDtypeStruct((256, 64), jnp.float32)},
        jax.ShapeDtypeStruct((32, 64), jnp.float32))


def test_equations_keep_their_module_path():
    traced = trace(_step, ARGS)
    dots = [s for e, s in zip(traced.program.eqns, traced.scopes)
            if e.primitive.name == "dot_general"]
    assert len(traced.scopes) == len(traced.program.eqns)
    # forward scopes under the differentiation: "jvp(encoder)/dense_0"
    assert any(s == "jvp(encoder)/dense_0" for s in dots), dots
    assert any("encoder" in s and "dense_0" not in s for s in dots), dots   # the jit's dot
    assert any(s.startswith("transpose(") and "dense_0" in s for s in dots), dots  # backward


def test_the_costliest_ops_are_named_by_module_path():
    plan = autoshard.parallelize(_step, mesh=autoshard.abstract_mesh((8,), ("data",))).plan(*ARGS)
    assert any("encoder" in op.scope for op in plan.top_ops)
    assert "encoder" in plan.summary()


def test_a_programs_analyses_are_made_once_per_program_and_arguments():
    from autoshard.intra.liveness import live_ranges
    from autoshard.ir.program import per_program

    calls = []

    @per_program
    def count(program, donated=()):
        calls.append(tuple(donated))
        return len(program.eqns)

    program, other = trace(_step, ARGS).program, trace(_step, ARGS).program
    assert count(program, [1]) == count(program, [1]) == len(program.eqns)
    count(program, [2])
    count(other, [1])
    assert calls == [(1,), (2,), (1,)]  # the second program and other arguments: again
    # the planner's analyses are shared, the same object for the same arguments
    assert live_ranges(program, [program.invars[0]]) is live_ranges(program, [program.invars[0]])
    assert live_ranges(program) is not live_ranges(program, [program.invars[0]])


def test_equations_say_where_in_user_code_they_came_from():
    # sources[e] (summarised when first read) names this file and _step's line for the
    # forward tanh, the same text on every read, for indices, negative ones and slices
    traced = trace(_step, ARGS)
    sources = traced.sources
    assert len(sources) == len(traced.program.eqns)
    tanh = next(e for e, eqn in enumerate(traced.program.eqns) if eqn.primitive.name == "tanh")
    line = next(n for n, text in enumerate(open(__file__), 1) if "jnp.tanh(x @" in text)
    assert f"test_trace.py:{line}:" in sources[tanh] and "loss)" in sources[tanh], sources[tanh]
    assert sources[tanh] is sources[tanh]
    assert sources[-1] == sources[len(sources) - 1]
    assert sources[tanh:tanh + 2] == (sources[tanh], sources[tanh + 1])
    assert list(sources) == [sources[e] for e in range(len(sources))]


def test_dead_equations_are_dropped_and_side_effects_kept():
    """``jax.grad`` of a loss leaves the loss's own reduction unread (XLA removes it, so
    the plan must not price it); a ``jax.debug.callback`` reads nothing later but runs."""
    def step(w, x):
        def loss(w):
            h = jnp.tanh(x @ w)
            jax.debug.callback(lambda v: None, h.max())
            return jnp.sum(h ** 2)
        return w - 0.1 * jax.grad(loss)(w)

    args = (jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((16, 64),
                                                                            jnp.float32))
    names = [e.primitive.name for e in trace(step, args).program.eqns]
    jaxpr_names = [e.primitive.name for e in jax.make_jaxpr(step)(*args).eqns]
    assert "reduce_sum" in jaxpr_names and "reduce_sum" not in names  # the unread loss
    assert names.count("debug_callback") == 1 and "reduce_max" in names
    assert names.count("dot_general") == jaxpr_names.count("dot_general") == 2


def test_optax_multisteps_is_sharded_and_matches_jit_over_steps():
    """optax.MultiSteps (gradient accumulation) applies adam inside a lax.cond: computed as
    both branches and a select, its update is sharded like the rest (before: the cond ran
    replicated, every parameter gathered each step; 74 MiB per device, not 8)."""
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P

    step, args = users_mlp_step(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
                                jnp.tanh)
    x, y = args[2:]
    assert "cond" not in [e.primitive.name for e in trace(step, args).program.eqns]

    f = autoshard.parallelize(step, mesh=autoshard.make_mesh((2, 4), ("data", "model")),
                              batch_argnums=(2, 3))
    assert any(spec != P() for spec in f.plan(*args).flat_in_specs[:2])
    assert f.audit(*args).ok
    ours, theirs = args, args
    for _ in range(4):  # two accumulating steps, two applying
        ours, theirs = f(*ours), jax.jit(step)(*theirs)
        ours, theirs = (*ours[:2], x, y), (*theirs[:2], x, y)
    for a, b in zip(jax.tree.leaves(ours[:2]), jax.tree.leaves(theirs[:2])):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_cond_with_a_contraction_in_a_branch_stays_a_cond():
    def step(w, x, flag):
        return jax.lax.cond(flag, lambda: x @ w, lambda: x[:, :8] * 2.0)

    args = (jnp.ones((16, 8)), jnp.ones((4, 16)), True)
    names = [e.primitive.name for e in trace(step, args).program.eqns]
    assert "cond" in names and "select_n" not in names


@jax.custom_batching.custom_vmap
def _custom_batched_sin(x):
    return jnp.sin(x)


@_custom_batched_sin.def_vmap
def _(axis_size, in_batched, x):
    return jnp.sin(x), in_batched[0]


def test_calls_that_compute_their_own_jaxpr_are_inlined():
    """``lax.composite`` (its decomposition), ``custom_vmap`` (its function) and
    ``custom_linear_solve`` (its solve: ``jnp.linalg.solve``) are what XLA runs, so the
    program holds their equations, each with a rule, not one call no rule knows."""
    def fn(a, b, x):
        tanh = jax.lax.composite(lambda x: jnp.tanh(x), name="user.tanh")(x)
        return jnp.linalg.solve(a + 8.0 * jnp.eye(8), b) @ (tanh + _custom_batched_sin(x))
    args = (jnp.ones((8, 8)), jnp.ones((8, 4)), jnp.ones((4, 4)))
    names = {e.primitive.name for e in trace(fn, args).program.eqns}
    assert {"tanh", "sin", "lu", "triangular_solve"} <= names, names
    assert not names & {"composite", "custom_vmap_call", "custom_linear_solve"}, names
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    out = autoshard.parallelize(fn, mesh=mesh)(*args)
    assert jnp.allclose(out, jax.jit(fn)(*args), atol=1e-5)


def test_repeated_pure_arithmetic_is_traced_once_as_xlas_cse_computes_it():
    # a layernorm as users write it: jnp.var takes the mean again and subtracts it again;
    # XLA's CSE computes each once (priced twice: the layernorm at 0.83x its compiled
    # bytes, its gradient at 1.50x). Dots are not merged: XLA compiles both
    def layernorm(x):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)

    x = jax.ShapeDtypeStruct((1024, 256), jnp.float32)
    program = trace(layernorm, (x,)).program
    centred = [e for e in program.eqns
               if e.primitive.name == "sub" and program.avals[e.outputs[0]].shape == (1024, 256)]
    assert len(centred) == 1
    assert [e.primitive.name for e in program.eqns].count("reduce_sum") == 2  # mean, variance
    modelled, compiled = replicated_bytes(layernorm, (x,))
    assert modelled == pytest.approx(compiled, rel=0.01)
    w = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    names = [eqn.primitive.name for eqn in
             trace(lambda a, b: ((a @ b).T, a @ b + 1.0), (x, w)).program.eqns]
    assert names.count("dot_general") == 2


def test_an_arithmetic_identity_is_traced_as_its_operand():
    # a loss sum(f(x) * c) seeds its gradient with ones: the gradient of f's output is
    # c * broadcast(1), which XLA's simplifier returns as c (priced as a multiply written
    # for its three readers, a layernorm's gradient was 1.17x its compiled bytes)
    x = jax.ShapeDtypeStruct((64, 64, 256), jnp.float32)
    grad = jax.grad(lambda x, c: jnp.sum(x * c))
    program = trace(grad, (x, x)).program
    assert not [e for e in program.eqns if e.primitive.name == "mul"]
    assert program.outvars[0] == program.invars[1]

    def layernorm_loss(x, c, scale):
        mean = x.mean(-1, keepdims=True)
        centred = x - mean
        y = centred * jax.lax.rsqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * scale
        return jnp.sum(y * c)

    args = (x, x, jax.ShapeDtypeStruct((256,), jnp.float32))
    modelled, compiled = replicated_bytes(jax.grad(layernorm_loss, argnums=(0, 2)), args)
    assert modelled == pytest.approx(compiled, rel=0.01)
