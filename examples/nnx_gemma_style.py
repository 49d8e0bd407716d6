"""A flax nnx decoder in Gemma's style (RMSNorm, gated-GELU MLP, tied embeddings) trained
with ``nnx.Optimizer``, parallelized by autoshard through nnx's functional API
(``nnx.split`` outside, ``nnx.merge`` inside the step: what a user passes to ``jax.jit``).

Plans on a (2, 4) mesh of 8 virtual CPU devices, runs 3 training steps (one plan),
prints the plan and checks every step against ``jax.jit``.

Run from the repository root: ``python examples/nnx_gemma_style.py``.
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import autoshard  # noqa: E402


class GatedMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
        self.gate = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.gate(x)) * self.up(x))


class DecoderLayer(nnx.Module):
    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
        self.attention_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=heads, in_features=dim,
                                                use_bias=False, decode=False, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.mlp = GatedMLP(dim, 4 * dim, rngs)

    def __call__(self, x, mask):
        x = x + self.attention(self.attention_norm(x), mask=mask)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
    def __init__(self, vocab=256, dim=64, heads=4, layers=2, *, rngs: nnx.Rngs):
        self.embedding = nnx.Embed(vocab, dim, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(dim, heads, rngs) for _ in range(layers)])
        self.final_norm = nnx.RMSNorm(dim, rngs=rngs)

    def __call__(self, tokens):
        x = self.embedding(tokens) * jnp.sqrt(self.embedding.features).astype(jnp.float32)
        mask = nnx.make_causal_mask(tokens)
        for layer in self.layers:
            x = layer(x, mask)
        return self.embedding.attend(self.final_norm(x))   # tied input/output embedding


def create(vocab=256, dim=64, heads=4, layers=2, seed=0):
    """(graphdef, state) of the model and its optimizer, as nnx's functional API splits them."""
    model = Decoder(vocab, dim, heads, layers, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    return nnx.split((model, optimizer))


def make_step(graphdef):
    def train_step(state, tokens):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return train_step


def main(batch_size=16, seq=33, steps=3, vocab=256):
    graphdef, state = create(vocab)
    train_step = make_step(graphdef)
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    step = autoshard.parallelize(train_step, mesh=mesh)
    ours = ref = state
    rng = np.random.default_rng(1)
    for i in range(steps):
        tokens = jnp.asarray(rng.integers(0, vocab, (batch_size, seq)), jnp.int32)
        ours, loss = step(ours, tokens)
        ref, ref_loss = jax.jit(train_step)(ref, tokens)
        np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
        print(f"step {i}: loss {float(loss):.5f} (jax.jit: {float(ref_loss):.5f})")
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        # atol 1e-4: Adam turns float32 summation-order noise in tiny gradients into
        # updates of up to its learning rate (as in examples/compare.py)
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4)
    print(step.plan(ours, tokens).summary(max_rows=12))
    print("parameters after", steps, "steps match jax.jit")


if __name__ == "__main__":
    main()
