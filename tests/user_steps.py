"""Training steps written the way users write them, for tests that plan real code."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

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
