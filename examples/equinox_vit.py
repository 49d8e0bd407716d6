"""An equinox vision transformer with dropout, trained with optax, as equinox's examples
write it (``eqx.partition`` into arrays and the rest, ``eqx.filter_value_and_grad``,
a PRNG key as the last argument), parallelized by autoshard.

With no ``batch_argnums`` autoshard infers the batch: the images and labels, not the
model, the optimizer state or the key. Plans on a (2, 4) mesh of 8 virtual CPU devices,
runs 3 training steps, prints the plan and checks every step against ``jax.jit``.

Run from the repository root: ``python examples/equinox_vit.py``.
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import autoshard  # noqa: E402


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, dim, heads, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm1, self.norm2 = eqx.nn.LayerNorm(dim), eqx.nn.LayerNorm(dim)
        self.attention = eqx.nn.MultiheadAttention(heads, dim, key=k1)
        self.mlp_in = eqx.nn.Linear(dim, 4 * dim, key=k2)
        self.mlp_out = eqx.nn.Linear(4 * dim, dim, key=k3)
        self.dropout = eqx.nn.Dropout(0.1)

    def __call__(self, x, key):
        k1, k2 = jax.random.split(key)
        h = jax.vmap(self.norm1)(x)
        x = x + self.dropout(self.attention(h, h, h), key=k1)
        h = jax.vmap(self.norm2)(x)
        h = jax.vmap(self.mlp_out)(jax.nn.gelu(jax.vmap(self.mlp_in)(h)))
        return x + self.dropout(h, key=k2)


class ViT(eqx.Module):
    patch_embedding: eqx.nn.Linear
    positions: jax.Array
    blocks: list
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    patch: int = eqx.field(static=True)

    def __init__(self, image=16, patch=4, channels=3, dim=64, heads=4, depth=2, classes=10,
                 *, key):
        keys = jax.random.split(key, depth + 3)
        self.patch = patch
        num_patches = (image // patch) ** 2
        self.patch_embedding = eqx.nn.Linear(patch * patch * channels, dim, key=keys[0])
        self.positions = 0.02 * jax.random.normal(keys[1], (num_patches, dim))
        self.blocks = [Block(dim, heads, k) for k in keys[3:]]
        self.norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, classes, key=keys[2])

    def __call__(self, image, key):
        h, w, c = image.shape
        p = self.patch
        patches = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
        x = jax.vmap(self.patch_embedding)(patches.reshape(-1, p * p * c)) + self.positions
        for block, k in zip(self.blocks, jax.random.split(key, len(self.blocks))):
            x = block(x, k)
        return self.head(self.norm(x.mean(axis=0)))


def make_step(static, optimizer):
    """The training step over the model's arrays (``eqx.partition``): what a user passes
    to ``eqx.filter_jit``, passed to ``autoshard.parallelize`` instead."""
    @eqx.filter_value_and_grad
    def loss_fn(model, images, labels, key):
        logits = jax.vmap(model)(images, jax.random.split(key, images.shape[0]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(params, opt_state, images, labels, key):
        loss, grads = loss_fn(eqx.combine(params, static), images, labels, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    return step


def main(batch_size=16, steps=3):
    model = ViT(key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.adam(1e-3)
    train_step = make_step(static, optimizer)
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    step = autoshard.parallelize(train_step, mesh=mesh)
    ours = ref = (params, optimizer.init(params))
    rng = np.random.default_rng(1)
    key = jax.random.key(2)
    for i in range(steps):
        images = jnp.asarray(rng.normal(size=(batch_size, 16, 16, 3)), jnp.float32)
        labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
        key, k = jax.random.split(key)
        *ours, loss = step(*ours, images, labels, k)
        *ref, ref_loss = jax.jit(train_step)(*ref, images, labels, k)
        np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
        print(f"step {i}: loss {float(loss):.5f} (jax.jit: {float(ref_loss):.5f})")
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        # atol 1e-4: Adam turns float32 summation-order noise in tiny gradients into
        # updates of up to its learning rate (as in examples/compare.py)
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4)
    plan = step.plan(*ours, images, labels, k)
    print(plan.summary(max_rows=12))
    print("parameters after", steps, "steps match jax.jit; batch:", ", ".join(plan.batch))


if __name__ == "__main__":
    main()
