"""Reference workloads for autoshard.

Every factory returns a :class:`Workload` whose ``fn(*args)`` is one full training
step ``(params, opt_state, batch) -> (new_params, new_opt_state, loss)``, written in
plain ``jax.numpy`` / ``jax.lax`` (no flax) so that the traced jaxpr stays small and
readable.  Parameters are nested dicts with descriptive keys, optimizers come from
optax, and the batch is always the last positional argument.

Arguments are made deterministically from ``jax.random.key(seed)``.  With
``abstract=True`` the arguments are ``jax.ShapeDtypeStruct`` s obtained through
``jax.eval_shape`` -- no device memory is touched, so huge configurations can be
planned on a laptop.

Default sizes are tiny (well under a second per step on a CPU) and every dimension
that a planner might split is divisible by 8.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import autoshard

__all__ = [
    "Workload",
    "mlp",
    "transformer_block",
    "conv_net",
    "moe",
    "gpt",
    "embedding_model",
    "wide_resnet_block",
    "WORKLOADS",
]


@dataclasses.dataclass(frozen=True)
class Workload:
    """A training step plus example arguments.

    name:          short identifier, e.g. ``"mlp"``.
    fn:            ``fn(*args) -> (new_params, new_opt_state, loss)``.
    args:          ``(params, opt_state, batch)`` as concrete ``jax.Array`` s or
                   ``jax.ShapeDtypeStruct`` s (``abstract=True``).
    batch_argnums: positions in ``args`` that hold the (data-parallel) batch.
    """

    name: str
    fn: Callable[..., Any]
    args: tuple
    batch_argnums: tuple[int, ...]


# --------------------------------------------------------------------------- helpers


def _build(name: str, fn: Callable, make_args: Callable[[], tuple], abstract: bool) -> Workload:
    """Make the args (concretely, or only their shapes) and wrap them in a Workload."""
    args = jax.eval_shape(make_args) if abstract else make_args()
    return Workload(name=name, fn=fn, args=tuple(args), batch_argnums=(len(args) - 1,))


def _train_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """``(params, opt_state, batch) -> (params, opt_state, loss)`` for ``loss_fn(params, batch)``.

    ``autoshard.value_and_grad`` is ``jax.value_and_grad`` except under
    ``autoshard.PipeshardParallel``, where it marks the end of the backward pass.
    """

    def step(params, opt_state, batch):
        loss, grads = autoshard.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss

    return step


def _make_optimizer(name: str, learning_rate: float | None = None) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(1e-2 if learning_rate is None else learning_rate)
    if name == "adam":
        return optax.adam(1e-3 if learning_rate is None else learning_rate)
    if name == "adamw":
        return optax.adamw(1e-3 if learning_rate is None else learning_rate)
    raise ValueError(f"unknown optimizer {name!r}; expected 'sgd', 'adam' or 'adamw'")


def _normal(key, shape: tuple[int, ...]) -> jax.Array:
    """float32 standard normal of ``shape``.

    Drawn flat and reshaped: XLA:CPU compiles a flat threefry draw several times
    faster than a rank-4 one, which keeps workload construction cheap.
    """
    return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


def _dense_init(key, fan_in: int, fan_out: int) -> jax.Array:
    """[fan_in, fan_out] weight, normal(0, 1/fan_in)."""
    return _normal(key, (fan_in, fan_out)) / math.sqrt(fan_in)


def _conv_init(key, c_in: int, c_out: int, k: int = 3) -> jax.Array:
    """[k, k, c_in, c_out] (HWIO) kernel, He-style scaling."""
    return _normal(key, (k, k, c_in, c_out)) * math.sqrt(2.0 / (k * k * c_in))


def _mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean((pred - target) ** 2)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross entropy; logits [..., classes], int labels [...]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def _layernorm(x: jax.Array, p: dict, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis; p = {"scale": [d], "bias": [d]}."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _layernorm_init(d: int) -> dict:
    return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """3x3 SAME stride-1 convolution, x [N, H, W, Cin], w [3, 3, Cin, Cout]."""
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# --------------------------------------------------------------------------- 1. MLP


def mlp(num_layers: int = 6, batch: int = 64, hidden: int = 64, optimizer: str = "sgd",
        *, seed: int = 0, abstract: bool = False) -> Workload:
    """Stack of dense+relu layers with MSE loss.

    params["layers"][i] = {"w": [hidden, hidden], "b": [hidden]}  (no relu after the last)
    batch = {"x": [batch, hidden], "y": [batch, hidden]}
    optimizer: "sgd" (optax.sgd(1e-2)) or "adam" (optax.adam(1e-3)).
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"mlp optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    opt = _make_optimizer(optimizer)

    def loss_fn(params, batch):
        x = batch["x"]
        for i, layer in enumerate(params["layers"]):
            x = x @ layer["w"] + layer["b"]
            if i < len(params["layers"]) - 1:
                x = jax.nn.relu(x)
        return _mse(x, batch["y"])

    def make_args():
        keys = jax.random.split(jax.random.key(seed), num_layers + 2)
        params = {"layers": [
            {"w": _dense_init(keys[i], hidden, hidden), "b": jnp.zeros((hidden,), jnp.float32)}
            for i in range(num_layers)]}
        data = {"x": _normal(keys[-2], (batch, hidden)),
                "y": _normal(keys[-1], (batch, hidden))}
        return params, opt.init(params), data

    return _build("mlp" if optimizer == "sgd" else f"mlp_{optimizer}", _train_step(loss_fn, opt), make_args, abstract)


# --------------------------------------------------------------------------- 2. transformer block


def _attention_block(p: dict, x: jax.Array, heads: int) -> jax.Array:
    """Pre-LN transformer block, x [B, S, D] -> [B, S, D].

    p = {"ln1", "ln2": layernorm params, "wq","wk","wv","wo": [D, D],
         "w1": [D, F], "b1": [F], "w2": [F, D], "b2": [D]}
    """
    b, s, d = x.shape
    dh = d // heads

    h = _layernorm(x, p["ln1"])
    q = (h @ p["wq"]).reshape(b, s, heads, dh)
    k = (h @ p["wk"]).reshape(b, s, heads, dh)
    v = (h @ p["wv"]).reshape(b, s, heads, dh)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)     # [B, H, S, S]
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d)
    x = x + attn @ p["wo"]

    h = _layernorm(x, p["ln2"])
    h = jax.nn.gelu(h @ p["w1"] + p["b1"])                            # [B, S, F]
    return x + h @ p["w2"] + p["b2"]


def _attention_block_init(key, d_model: int, d_ff: int) -> dict:
    k = jax.random.split(key, 6)
    return {
        "ln1": _layernorm_init(d_model),
        "wq": _dense_init(k[0], d_model, d_model),
        "wk": _dense_init(k[1], d_model, d_model),
        "wv": _dense_init(k[2], d_model, d_model),
        "wo": _dense_init(k[3], d_model, d_model),
        "ln2": _layernorm_init(d_model),
        "w1": _dense_init(k[4], d_model, d_ff),
        "b1": jnp.zeros((d_ff,), jnp.float32),
        "w2": _dense_init(k[5], d_ff, d_model),
        "b2": jnp.zeros((d_model,), jnp.float32),
    }


def transformer_block(batch: int = 8, seq: int = 16, d_model: int = 64, heads: int = 8,
                      d_ff: int = 256, *, learning_rate: float = 1e-2, seed: int = 0,
                      abstract: bool = False) -> Workload:
    """One pre-LN causal self-attention block, MSE against a target; SGD.

    params = {"ln1", "ln2": {"scale": [D], "bias": [D]},
              "wq","wk","wv","wo": [D, D], "w1": [D, F], "b1": [F], "w2": [F, D], "b2": [D]}
    batch  = {"x": [B, S, D], "y": [B, S, D]}
    """
    assert d_model % heads == 0, "d_model must be divisible by heads"
    opt = optax.sgd(learning_rate)

    def loss_fn(params, batch):
        return _mse(_attention_block(params, batch["x"], heads), batch["y"])

    def make_args():
        kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
        params = _attention_block_init(kp, d_model, d_ff)
        data = {"x": _normal(kx, (batch, seq, d_model)),
                "y": _normal(ky, (batch, seq, d_model))}
        return params, opt.init(params), data

    return _build("transformer_block", _train_step(loss_fn, opt), make_args, abstract)


# --------------------------------------------------------------------------- 3. conv net


def conv_net(batch: int = 16, image: int = 16, channels: tuple[int, ...] = (8, 16, 16),
             num_classes: int = 8, *, in_channels: int = 8, learning_rate: float = 1e-2,
             seed: int = 0, abstract: bool = False) -> Workload:
    """3x3 SAME convs + relu, global average pool, dense classifier; softmax CE; SGD.

    params = {"convs": [{"w": [3, 3, Cin_i, channels[i]], "b": [channels[i]]}, ...],
              "head": {"w": [channels[-1], num_classes], "b": [num_classes]}}
    batch  = {"images": [B, image, image, in_channels] (NHWC), "labels": int32 [B]}
    """
    opt = optax.sgd(learning_rate)

    def loss_fn(params, batch):
        x = batch["images"]
        for layer in params["convs"]:
            x = jax.nn.relu(_conv(x, layer["w"]) + layer["b"])
        x = jnp.mean(x, axis=(1, 2))                                   # [B, C]
        logits = x @ params["head"]["w"] + params["head"]["b"]
        return _cross_entropy(logits, batch["labels"])

    def make_args():
        keys = jax.random.split(jax.random.key(seed), len(channels) + 3)
        c_ins = (in_channels,) + tuple(channels[:-1])
        params = {
            "convs": [{"w": _conv_init(keys[i], ci, co), "b": jnp.zeros((co,), jnp.float32)}
                      for i, (ci, co) in enumerate(zip(c_ins, channels))],
            "head": {"w": _dense_init(keys[-3], channels[-1], num_classes),
                     "b": jnp.zeros((num_classes,), jnp.float32)},
        }
        data = {"images": _normal(keys[-2], (batch, image, image, in_channels)),
                "labels": jax.random.randint(keys[-1], (batch,), 0, num_classes, jnp.int32)}
        return params, opt.init(params), data

    return _build("conv_net", _train_step(loss_fn, opt), make_args, abstract)


# --------------------------------------------------------------------------- 4. mixture of experts


def moe(batch: int = 16, seq: int = 8, d_model: int = 32, experts: int = 8, d_ff: int = 64,
        capacity: int = 4, *, learning_rate: float = 1e-2, seed: int = 0,
        abstract: bool = False) -> Workload:
    """Top-1 mixture-of-experts FFN in GShard's grouped form; MSE; SGD.

    Each sequence is a group (G = batch, S = seq tokens per group); E = experts,
    C = capacity per expert and group (overflow tokens are dropped).
    params = {"gate": [D, E], "w1": [E, D, F], "b1": [E, F], "w2": [E, F, D], "b2": [E, D]}
    batch  = {"x": [G, S, D], "y": [G, S, D]}
    dispatch [G, S, E, C] is one-hot; combine = dispatch * gate probability. The
    dispatched tokens [E, G, C, D] are indexed by expert, the batch by group: with
    groups split over devices and experts split over the same devices, moving from one
    to the other is GShard's all-to-all.
    """
    opt = optax.sgd(learning_rate)

    def loss_fn(params, batch):
        x = batch["x"]                                                  # [G, S, D]
        probs = jax.nn.softmax(x @ params["gate"], axis=-1)            # [G, S, E]
        expert = jnp.argmax(probs, axis=-1)                             # [G, S]
        mask = jax.nn.one_hot(expert, experts, dtype=x.dtype)           # [G, S, E]
        position = jnp.cumsum(mask, axis=1) * mask - 1.0                # slot in expert, -1 elsewhere
        mask = mask * (position < capacity)                             # drop overflow tokens
        slot = jax.nn.one_hot(position.astype(jnp.int32), capacity, dtype=x.dtype)  # [G, S, E, C]
        dispatch = mask[..., None] * slot                               # [G, S, E, C]
        combine = dispatch * jnp.sum(probs * mask, axis=-1)[..., None, None]

        xe = jnp.einsum("gsec,gsd->egcd", dispatch, x)                  # [E, G, C, D]
        h = jax.nn.relu(jnp.einsum("egcd,edf->egcf", xe, params["w1"])
                        + params["b1"][:, None, None, :])
        ye = jnp.einsum("egcf,efd->egcd", h, params["w2"]) + params["b2"][:, None, None, :]
        y = jnp.einsum("gsec,egcd->gsd", combine, ye)                   # [G, S, D]
        return _mse(y + x, batch["y"])                                  # residual

    def make_args():
        k = jax.random.split(jax.random.key(seed), 5)
        params = {
            "gate": _dense_init(k[0], d_model, experts),
            "w1": _normal(k[1], (experts, d_model, d_ff)) / math.sqrt(d_model),
            "b1": jnp.zeros((experts, d_ff), jnp.float32),
            "w2": _normal(k[2], (experts, d_ff, d_model)) / math.sqrt(d_ff),
            "b2": jnp.zeros((experts, d_model), jnp.float32),
        }
        data = {"x": _normal(k[3], (batch, seq, d_model)),
                "y": _normal(k[4], (batch, seq, d_model))}
        return params, opt.init(params), data

    return _build("moe", _train_step(loss_fn, opt), make_args, abstract)


# --------------------------------------------------------------------------- 5. GPT


def gpt(num_layers: int = 2, batch: int = 8, seq: int = 16, d_model: int = 64, heads: int = 4,
        vocab: int = 256, d_ff: int | None = None, optimizer: str = "adamw", remat: bool = False,
        *, scan_layers: bool = False, learning_rate: float | None = None, seed: int = 0,
        abstract: bool = False) -> Workload:
    """Small decoder-only GPT with tied embeddings; next-token softmax CE; optax adamw(1e-3).

    params = {"wte": [V, D], "wpe": [S, D],
              "blocks": [block_i, ...]   (same layout as transformer_block params, F = d_ff),
              "ln_f": {"scale": [D], "bias": [D]}}
    batch  = {"tokens": int32 [B, S+1]}   inputs = tokens[:, :-1], targets = tokens[:, 1:]
    logits = ln_f(x) @ wte.T  -> [B, S, V].  remat=True wraps each block in jax.checkpoint.
    scan_layers=True stacks the blocks (``"blocks"``: one block's tree, each leaf with a
    leading [num_layers] dim) and runs them with ``lax.scan``, as MaxText's ``scan_layers``.
    """
    d_ff = 4 * d_model if d_ff is None else d_ff
    assert d_model % heads == 0, "d_model must be divisible by heads"
    opt = _make_optimizer(optimizer, learning_rate)

    def block(p, x):
        return _attention_block(p, x, heads)

    if remat:
        block = jax.checkpoint(block)

    def loss_fn(params, batch):
        inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
        x = jnp.take(params["wte"], inputs, axis=0) + params["wpe"]    # [B, S, D]
        if scan_layers:
            x, _ = jax.lax.scan(lambda x, p: (block(p, x), None), x, params["blocks"])
        else:
            for p in params["blocks"]:
                x = block(p, x)
        x = _layernorm(x, params["ln_f"])
        logits = x @ params["wte"].T                                   # [B, S, V]
        return _cross_entropy(logits, targets)

    def make_args():
        k = jax.random.split(jax.random.key(seed), num_layers + 3)
        params = {
            "wte": _normal(k[0], (vocab, d_model)) * 0.02,
            "wpe": _normal(k[1], (seq, d_model)) * 0.02,
            "blocks": [_attention_block_init(k[3 + i], d_model, d_ff) for i in range(num_layers)],
            "ln_f": _layernorm_init(d_model),
        }
        if scan_layers:
            params["blocks"] = jax.tree.map(lambda *ps: jnp.stack(ps), *params["blocks"])
        data = {"tokens": jax.random.randint(k[2], (batch, seq + 1), 0, vocab, jnp.int32)}
        return params, opt.init(params), data

    name = ("gpt_remat" if remat else "gpt") + ("_scanned" if scan_layers else "")
    return _build(name, _train_step(loss_fn, opt), make_args, abstract)


# --------------------------------------------------------------------------- 6. embedding model


def embedding_model(batch: int = 32, vocab: int = 4096, d_model: int = 64, *,
                    learning_rate: float = 0.5, seed: int = 0, abstract: bool = False) -> Workload:
    """Large-vocab embedding lookup -> dense+tanh -> untied vocab projection; softmax CE; SGD.

    params = {"embed": [V, D], "dense": {"w": [D, D], "b": [D]},
              "out": {"w": [D, V], "b": [V]}}
    batch  = {"ids": int32 [B], "labels": int32 [B]}
    (The SGD learning rate is high by default because each row of the vocab-sized
    tensors sees only a few tokens per step.)
    """
    opt = optax.sgd(learning_rate)

    def loss_fn(params, batch):
        x = jnp.take(params["embed"], batch["ids"], axis=0)             # [B, D]
        x = jnp.tanh(x @ params["dense"]["w"] + params["dense"]["b"])
        logits = x @ params["out"]["w"] + params["out"]["b"]           # [B, V]
        return _cross_entropy(logits, batch["labels"])

    def make_args():
        k = jax.random.split(jax.random.key(seed), 5)
        params = {
            "embed": _normal(k[0], (vocab, d_model)),
            "dense": {"w": _dense_init(k[1], d_model, d_model), "b": jnp.zeros((d_model,), jnp.float32)},
            "out": {"w": _dense_init(k[2], d_model, vocab), "b": jnp.zeros((vocab,), jnp.float32)},
        }
        data = {"ids": jax.random.randint(k[3], (batch,), 0, vocab, jnp.int32),
                "labels": jax.random.randint(k[4], (batch,), 0, vocab, jnp.int32)}
        return params, opt.init(params), data

    return _build("embedding_model", _train_step(loss_fn, opt), make_args, abstract)


# --------------------------------------------------------------------------- 7. wide resnet block


def _batchnorm(x: jax.Array, p: dict, eps: float = 1e-5) -> jax.Array:
    """Batch normalisation with batch statistics only (no running stats), x [N, H, W, C]."""
    mean = jnp.mean(x, axis=(0, 1, 2), keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=(0, 1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def wide_resnet_block(batch: int = 8, image: int = 16, channels: int = 32, width: int = 2, *,
                      learning_rate: float = 1e-2, seed: int = 0, abstract: bool = False) -> Workload:
    """Pre-activation Wide-ResNet block: x + conv2(relu(bn2(conv1(relu(bn1(x)))))); MSE; SGD.

    C = channels, W = channels * width.
    params = {"bn1": {"scale","bias": [C]}, "conv1": [3, 3, C, W],
              "bn2": {"scale","bias": [W]}, "conv2": [3, 3, W, C]}
    batch  = {"x": [B, image, image, C], "y": [B, image, image, C]}  (NHWC)
    """
    wide = channels * width
    opt = optax.sgd(learning_rate)

    def loss_fn(params, batch):
        x = batch["x"]
        h = _conv(jax.nn.relu(_batchnorm(x, params["bn1"])), params["conv1"])   # [B, H, W, wide]
        h = _conv(jax.nn.relu(_batchnorm(h, params["bn2"])), params["conv2"])   # [B, H, W, C]
        return _mse(x + h, batch["y"])

    def make_args():
        k = jax.random.split(jax.random.key(seed), 4)
        params = {
            "bn1": _layernorm_init(channels),
            "conv1": _conv_init(k[0], channels, wide),
            "bn2": _layernorm_init(wide),
            "conv2": _conv_init(k[1], wide, channels),
        }
        shape = (batch, image, image, channels)
        data = {"x": _normal(k[2], shape),
                "y": _normal(k[3], shape)}
        return params, opt.init(params), data

    return _build("wide_resnet_block", _train_step(loss_fn, opt), make_args, abstract)


# --------------------------------------------------------------------------- registry

WORKLOADS: dict[str, Callable[..., Workload]] = {
    "mlp": mlp,
    "transformer_block": transformer_block,
    "conv_net": conv_net,
    "moe": moe,
    "gpt": gpt,
    "embedding_model": embedding_model,
    "wide_resnet_block": wide_resnet_block,
}
