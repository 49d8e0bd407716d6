"""Training steps written the way users write them, for tests that plan real code."""
from __future__ import annotations

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import optax
from jax.interpreters import mlir

from examples import models


def users_gpt_step(workload: models.Workload, heads: int):
    """``(step, args)`` for a GPT workload of ``examples.models.gpt``: the loss closes over
    the batch, plain ``jax.value_and_grad``, optax adamw, a Python float keyword argument
    (``temperature``); ``args`` = (params, adamw state, tokens)."""
    params, _, batch = workload.args
    optimizer = optax.adamw(1e-3)

    def step(params, opt_state, tokens, *, temperature=1.0):
        def loss(ps):
            x = jnp.take(ps["wte"], tokens[:, :-1], axis=0) + ps["wpe"]
            for block in ps["blocks"]:
                x = models._attention_block(block, x, heads)
            logits = models._layernorm(x, ps["ln_f"]) @ ps["wte"].T / temperature
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step, (params, optimizer.init(params), batch["tokens"])


def users_mlp_step(optimizer, hidden=jax.nn.relu):
    """``(step, args)``: a 2-layer MLP classifier (64 -> 256 -> 16 features, 32 examples)
    whose loss closes over the batch and its integer labels, ``hidden`` applied to the
    first layer's output, updated by ``optimizer`` (an optax transformation) with plain
    ``jax.value_and_grad``; ``args`` = (params, optimizer state, x, labels)."""
    def step(params, opt_state, x, labels):
        def loss(ps):
            logits = hidden(x @ ps["w1"]) @ ps["w2"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(keys[0], (64, 256)) * 0.1,
              "w2": jax.random.normal(keys[1], (256, 16)) * 0.1}
    x, labels = jax.random.normal(keys[2], (32, 64)), jnp.arange(32) % 16
    return step, (params, optimizer.init(params), x, labels)


def _doubled(x):
    return 2 * x


#: a primitive of the user's own (``2 * x``), which no sharding rule knows
user_op_p = jcore.Primitive("user_op")
user_op_p.def_impl(_doubled)
user_op_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(user_op_p, mlir.lower_fun(_doubled, multiple_results=False))

#: ``2 * x`` through ``user_op_p``, bound inside jax's own code under a jit, as jax's
#: linear algebra binds its primitives (no frame of the binding is the user's)
doubled = jax.jit(user_op_p.bind)
