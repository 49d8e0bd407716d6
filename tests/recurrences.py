"""An RNN trained by SGD over time-major inputs (shared by the scan, control-flow and
repeat-class tests): a ``lax.scan`` whose transpose, in the backward pass, is a scan too."""
import jax
import jax.numpy as jnp


def rnn_train_step(w, xs):
    """One SGD step of a tanh RNN (``w``: ``{"h": [hidden, hidden], "x": [features,
    hidden]}``) over ``xs`` ``[steps, batch, features]``; the loss reads the last state
    and every step's sum. Returns (the new ``w``, the loss)."""
    def loss(w):
        def cell(h, x):
            h = jnp.tanh(h @ w["h"] + x @ w["x"])
            return h, jnp.sum(h)
        h, ys = jax.lax.scan(cell, jnp.zeros((xs.shape[1], w["h"].shape[0])), xs)
        return jnp.mean(h ** 2) + jnp.mean(ys)

    value, grads = jax.value_and_grad(loss)(w)
    return jax.tree.map(lambda p, g: p - 0.1 * g, w, grads), value


def rnn_arguments(steps: int, batch: int, features: int, hidden: int = 32, seed: int = 2):
    """(w, xs) for :func:`rnn_train_step`, random."""
    keys = jax.random.split(jax.random.key(seed), 3)
    w = {"h": jax.random.normal(keys[0], (hidden, hidden)) / 8,
         "x": jax.random.normal(keys[1], (features, hidden)) / 4}
    return w, jax.random.normal(keys[2], (steps, batch, features))
