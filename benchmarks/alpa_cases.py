"""Alpa's shard-parallel plan expectations, held against autoshard's plans.

Alpa's own tests (alpa-projects/alpa, ``tests/shard_parallel``) assert which layout its ILP
finds for small flax models: data parallelism for a large batch, Megatron-LM's alternating
column/row splits for wide layers, "batch over the slow axis, Megatron over the fast one"
on a 2x2 mesh whose second axis has 10x the bandwidth. Each case here rebuilds one of those
tests (same model, sizes, optimizer and mesh, written with flax and optax as Alpa's are) and
writes Alpa's expected layout as a hand-written ``jax.jit`` (in/out ``PartitionSpec`` s,
XLA's propagation inside, no autoshard code).

A case **holds** when autoshard's plan has Alpa's layout on every argument. Alpa priced
communication only (its compute was free), so on a real cluster its layout is not always
the cheapest: a case is **beaten** when autoshard's compiled program costs at most what the
compiled Alpa layout costs on the yardstick (``benchmarks/yardstick.py``: the compiled HLO's
flops, bytes and collectives over the cluster's links). Every case must hold or be beaten.

Clusters: the presets, with Alpa's per-axis link figures where the test gives them
(``mesh_beta`` [1, 0.1]: the second axis has 10x the first's bandwidth; the first axis gets
the preset's inter-node link). Alpa's meshes ``(4, 1)`` and ``(1, 4)`` are the 1-D mesh
``(4,)``.

Run ``python -m benchmarks.alpa_cases [--out FILE]`` for the table (about a minute).
"""
from __future__ import annotations

from .host_devices import force_host_devices

force_host_devices(8)   # before jax is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import struct  # noqa: E402
from flax.training.train_state import TrainState  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import autoshard  # noqa: E402
from autoshard.cost_model import Cluster, Link  # noqa: E402

from .yardstick import yardstick  # noqa: E402

#: a case is beaten when autoshard's yardstick is at most this times the Alpa layout's
BEATEN_WITHIN = 1.005


# ------------------------------------------------------------------ models (as Alpa's)
class _MLP(nn.Module):
    """tests/shard_parallel/test_mlp.py: ``num_layers`` Dense layers, relu between."""
    num_layers: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.num_layers - 1):
            x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.hidden)(x)


def _bert_attention(x, mask, heads: int, deterministic: bool):
    """Alpa's FlaxBertAttention, called inside a compact module: a combined q/v/k kernel
    (columns interleaved per head dim), attention, output dense, layernorm; dropout 0.1 on
    the attention probabilities and the output dense."""
    b, s, h = x.shape
    qvk = nn.Dense(3 * h, name="qvk_combined")(x).reshape(b, s, h, 3)
    q, v, k = (t.reshape(b, s, heads, h // heads) for t in jnp.split(qvk, 3, axis=3))
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e10)
    probs = nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / (h // heads) ** 0.5 + bias)
    probs = nn.Dropout(0.1)(probs, deterministic=deterministic)
    attended = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, h)
    attended = nn.Dropout(0.1)(nn.Dense(h, name="attention_output")(attended),
                               deterministic=deterministic)
    return nn.LayerNorm(name="attention_norm")(attended + x)


class _BertLayer(nn.Module):
    """Alpa's FlaxBertLayer: attention (``_bert_attention``), then intermediate (4x, gelu)
    and output dense, layernorm, dropout 0.1 on the output dense."""
    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x, mask, deterministic):
        h = x.shape[-1]
        x = _bert_attention(x, mask, self.heads, deterministic)
        inner = nn.gelu(nn.Dense(4 * h, name="intermediate")(x))
        out = nn.Dropout(0.1)(nn.Dense(h, name="output")(inner), deterministic=deterministic)
        return nn.LayerNorm(name="output_norm")(out + x)


class _Bert(nn.Module):
    num_layers: int
    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x, mask, deterministic):
        for i in range(self.num_layers):
            x = _BertLayer(self.hidden, self.heads, name=str(i))(x, mask, deterministic)
        return x


def _top2_routing(gates, capacity: int):
    """GShard's top-2 routing of tokens ``gates`` [G, S, E] (softmax over experts) into
    ``capacity`` slots per expert and group: (combine weights, dispatch mask), both
    [G, S, E, C]. A token goes to its two likeliest experts, first choices taking slots
    before second ones; a token past an expert's capacity is dropped there; its two
    weights are renormalized to sum to one."""
    experts = gates.shape[-1]
    first = jax.nn.one_hot(jnp.argmax(gates, axis=-1), experts)
    second = jax.nn.one_hot(jnp.argmax(gates * (1 - first), axis=-1), experts)
    first_slot = jnp.cumsum(first, axis=1) - first
    first = first * (first_slot < capacity)
    second_slot = jnp.cumsum(second, axis=1) - second + jnp.sum(first, axis=1, keepdims=True)
    second = second * (second_slot < capacity)
    weights = [jnp.sum(gates * choice, axis=-1) for choice in (first, second)]
    total = weights[0] + weights[1]
    total = jnp.where(total > 0, total, 1.0)
    combine = sum(
        (weight / total)[..., None, None] * choice[..., None]
        * jax.nn.one_hot(jnp.sum(slot * choice, axis=-1).astype(jnp.int32), capacity)[:, :, None]
        for weight, choice, slot in zip(weights, (first, second), (first_slot, second_slot)))
    return combine, (combine > 0).astype(gates.dtype)


class _MoELayer(nn.Module):
    """Alpa's FlaxMoELayer (``alpa.model.moe``): BERT attention, then a position-wise
    mixture of experts (groups of ``group`` tokens, top-2 routing, capacity 2S/E, relu
    experts of 4x width), dropout 0.1, layernorm."""
    heads: int
    group: int
    experts: int

    @nn.compact
    def __call__(self, x, mask, deterministic):
        x = _bert_attention(x, mask, self.heads, deterministic)
        m = x.shape[-1]
        init = nn.initializers.lecun_normal()
        wg = self.param("wg", init, (m, self.experts))
        wi = self.param("wi", init, (self.experts, m, 4 * m))
        wo = self.param("wo", init, (self.experts, 4 * m, m))
        tokens = x.reshape(-1, self.group, m)                                   # [G, S, M]
        gates = jax.nn.softmax(jnp.einsum("gsm,me->gse", tokens, wg))
        combine, dispatch = _top2_routing(gates, 2 * self.group // self.experts)
        routed = jnp.einsum("gsec,gsm->egcm", dispatch, tokens)                # [E, G, C, M]
        hidden = nn.relu(jnp.einsum("egcm,emh->egch", routed, wi))
        out = jnp.einsum("gsec,gecm->gsm", combine, jnp.einsum("egch,ehm->gecm", hidden, wo))
        out = nn.Dropout(0.1)(out.reshape(x.shape), deterministic=deterministic)
        return nn.LayerNorm(name="moe_norm")(out + x)


class _ConvNet(nn.Module):
    """tests/shard_parallel/test_conv.py: 3x3 stride-2 convolutions, batchnorm, relu and
    a 2x2 max-pool per layer (``depthwise``: Alpa's conv, depthwise conv, conv, relu,
    batchnorm)."""
    num_layers: int
    channels: int
    depthwise: bool = False

    @nn.compact
    def __call__(self, x):
        if self.depthwise:
            wide = 8 * self.channels
            x = nn.Conv(wide, (3, 3), use_bias=False)(x)
            x = nn.Conv(wide, (3, 3), feature_group_count=wide, use_bias=False)(x)
            x = nn.relu(nn.Conv(self.channels, (3, 3), use_bias=False)(x))
            return nn.BatchNorm(use_running_average=False)(x)
        for _ in range(self.num_layers):
            x = nn.Conv(self.channels, (3, 3), strides=(2, 2), use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=False)(x))
            x = nn.max_pool(x, (2, 2), strides=(1, 1), padding="SAME")
        return x


class _Dropout(nn.Module):
    """tests/shard_parallel/test_basic.py::test_dropout."""

    @nn.compact
    def __call__(self, x, deterministic):
        x = nn.Dense(16, use_bias=False)(x)
        x = nn.Dropout(0.1, deterministic=deterministic)(x)
        return nn.Dense(16, use_bias=False)(x)


class _Gather(nn.Module):
    """tests/shard_parallel/test_basic.py::test_gather."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32, use_bias=False)(x)
        return nn.Dense(16, use_bias=False)(x[:, jnp.arange(16)])


class _StatsState(TrainState):
    batch_stats: dict = struct.field(default_factory=dict)


# ------------------------------------------------------------------ train steps
def _mlp_step(num_layers: int, batch: int, hidden: int):
    model = _MLP(num_layers, hidden)
    x = jnp.ones((batch, hidden))
    state = TrainState.create(apply_fn=model.apply, params=model.init(jax.random.key(0), x),
                              tx=optax.adam(1e-2))

    def train_step(state, batch):
        def loss(params):
            return jnp.mean((state.apply_fn(params, batch["x"]) - batch["y"]) ** 2)
        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    return train_step, (state, {"x": x, "y": jnp.ones((batch, hidden))})


def _bert_step(batch: int, seq: int, num_layers: int, hidden: int, heads: int):
    return _attention_step(_Bert(num_layers, hidden, heads), batch, seq, hidden, False)


def _moe_step(batch: int, seq: int, hidden: int, heads: int, group: int, experts: int):
    # Alpa's test_moe.py runs its MoE layer deterministic (no dropout)
    return _attention_step(_MoELayer(heads, group, experts), batch, seq, hidden, True)


def _attention_step(model: nn.Module, batch: int, seq: int, hidden: int, deterministic: bool):
    """Alpa's BERT and MoE layer tests' step: MSE against labels, adam(1e-2)."""
    x = jnp.ones((batch, seq, hidden))
    mask = jnp.ones((batch, seq), jnp.int32)
    state = TrainState.create(apply_fn=model.apply,
                              params=model.init(jax.random.key(0), x, mask, True),
                              tx=optax.adam(1e-2))

    def train_step(state, batch):
        def loss(params):
            out = state.apply_fn(params, batch["hidden_states"], batch["attention_mask"],
                                 deterministic, rngs={"dropout": batch["rng"]})
            return jnp.mean((out - batch["label"]) ** 2)
        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    return train_step, (state, {"hidden_states": x, "attention_mask": mask,
                                "label": jnp.ones((batch, seq, hidden)),
                                "rng": jax.random.key(1)})


def _conv_step(num_layers: int, batch: int, image: int, channels: int, depthwise: bool = False):
    model = _ConvNet(num_layers, channels, depthwise)
    x = jnp.ones((batch, image, image, channels))
    out = image if depthwise else image // 2 ** num_layers
    variables = model.init(jax.random.key(0), x)
    state = _StatsState.create(apply_fn=model.apply, params=variables["params"],
                               tx=optax.sgd(0.1, momentum=0.9),
                               batch_stats=variables["batch_stats"])

    def train_step(state, batch):
        def loss(params):
            out, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                          batch["x"], mutable=["batch_stats"])
            return jnp.mean((out - batch["y"]) ** 2), updates
        grads, updates = jax.grad(loss, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])

    return train_step, (state, {"x": x, "y": jnp.ones((batch, out, out, channels))})


def _dropout_step():
    model = _Dropout()
    x = jnp.ones((32, 32, 16))
    state = TrainState.create(apply_fn=model.apply, params=model.init(jax.random.key(0), x, True),
                              tx=optax.sgd(1e-2))

    def train_step(state, x, y, rngs):
        def loss(params):
            return jnp.mean((model.apply(params, x, False, rngs=rngs) - y) ** 2)
        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    return train_step, (state, x, jnp.ones((32, 32, 16)), {"dropout": jax.random.key(1)})


def _gather_step():
    model = _Gather()
    x = jnp.ones((256, 32))
    state = TrainState.create(apply_fn=model.apply, params=model.init(jax.random.key(0), x),
                              tx=optax.sgd(1e-2))

    def train_step(state, x, y):
        def loss(params):
            return jnp.mean((model.apply(params, x) - y) ** 2)
        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    return train_step, (state, x, jnp.ones((256, 16)))


# ------------------------------------------------------------------ Alpa's layouts
Rules = tuple[tuple[str, P], ...]


def rule_specs(args, rules: Rules):
    """PartitionSpecs for ``args``: the first rule whose regex is found in a leaf's
    ``keystr`` path gives its spec; leaves no rule matches are replicated."""
    def spec(path, leaf):
        key = jax.tree_util.keystr(path)
        for pattern, rule in rules:
            if re.search(pattern, key):
                return rule
        return P()
    return jax.tree_util.tree_map_with_path(spec, args)


def _megatron_mlp(num_layers: int, axis: str) -> Rules:
    rules = []
    for i in range(num_layers):
        column = i % 2 == 0
        rules.append((rf"\['Dense_{i}'\]\['kernel'\]", P(None, axis) if column else P(axis)))
        rules.append((rf"\['Dense_{i}'\]\['bias'\]", P(axis) if column else P()))
    return tuple(rules)


def _megatron_bert(axis: str) -> Rules:
    rules = []
    for name, column in (("qvk_combined", True), ("attention_output", False),
                         ("intermediate", True), ("output", False)):
        rules.append((rf"\['{name}'\]\['kernel'\]", P(None, axis) if column else P(axis)))
        rules.append((rf"\['{name}'\]\['bias'\]", P(axis) if column else P()))
    return tuple(rules)


def _batch(axis: str | tuple[str, ...], *keys: str) -> Rules:
    return tuple((rf"^\[1\]\['{key}'\]", P(axis)) for key in keys)


def _positional_batch(axis: str, *positions: int) -> Rules:
    return tuple((rf"^\[{i}\]$", P(axis)) for i in positions)


# ------------------------------------------------------------------ the cases
@dataclasses.dataclass(frozen=True)
class AlpaCase:
    """One of Alpa's shard-parallel tests. ``mesh_beta``: Alpa's per-axis cost of a byte
    (a link's bandwidth is the preset's inter-node bandwidth over it; ``None``: the preset's
    own links). ``rules``: Alpa's layout of the step's arguments (``rule_specs``)."""
    name: str
    source: str
    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    build: Callable[[], tuple[Callable, tuple]]
    rules: Rules
    expectation: str
    mesh_beta: tuple[float, ...] | None = None


def _dp(name, source, build, *keys):
    return AlpaCase(name, source, (4,), ("x",), build, _batch("x", *keys),
                    "data parallel: parameters replicated, batch split")


CASES: tuple[AlpaCase, ...] = (
    _dp("mlp_data_parallel", "test_mlp.py::test_n_layer_mlp_data_parallel",
        lambda: _mlp_step(6, 256, 32), "x", "y"),
    AlpaCase("mlp_model_parallel", "test_mlp.py::test_n_layer_mlp_model_parallel", (4,), ("x",),
             lambda: _mlp_step(6, 32, 256), _megatron_mlp(6, "x"),
             "Megatron: kernels alternately column- and row-parallel, batch replicated"),
    AlpaCase("mlp_2d_mesh", "test_mlp.py::test_n_layer_mlp_2d_mesh", (2, 2), ("a", "b"),
             lambda: _mlp_step(6, 256, 32), _megatron_mlp(6, "b") + _batch("a", "x", "y"),
             "batch over the slow axis, Megatron over the 10x faster one", (1.0, 0.1)),
    _dp("bert_data_parallel", "test_bert.py::test_bert_layer_data_parallel",
        lambda: _bert_step(64, 64, 2, 32, 8), "hidden_states", "attention_mask", "label"),
    AlpaCase("bert_model_parallel", "test_bert.py::test_bert_layer_model_parallel", (4,), ("x",),
             lambda: _bert_step(8, 8, 2, 128, 8), _megatron_bert("x"),
             "Megatron: q/v/k and intermediate column-, outputs row-parallel"),
    AlpaCase("bert_2d_mesh", "test_bert.py::test_bert_layer_2d_mesh", (2, 2), ("a", "b"),
             lambda: _bert_step(8, 8, 2, 128, 8),
             _megatron_bert("b") + _batch("a", "hidden_states", "attention_mask", "label"),
             "batch over the slow axis, Megatron over the 10x faster one", (1.0, 0.1)),
    _dp("conv_data_parallel", "test_conv.py::test_n_layer_conv_data_parallel",
        lambda: _conv_step(3, 16, 16, 4), "x", "y"),
    AlpaCase("conv_model_parallel", "test_conv.py::test_n_layer_conv_model_parallel", (4,), ("x",),
             lambda: _conv_step(4, 8, 16, 256),
             tuple((rf"\['Conv_{i}'\]\['kernel'\]",
                    P(None, None, None, "x") if i % 2 == 0 else P(None, None, "x"))
                   for i in range(4))
             + tuple((rf"\['BatchNorm_{i}'\]", P("x")) for i in range(0, 4, 2)),
             "channels: kernels alternately split on output and input channels"),
    AlpaCase("depthwise_conv_model_parallel",
             "test_conv.py::test_n_layer_depthwise_conv_model_parallel", (4,), ("x",),
             lambda: _conv_step(2, 4, 8, 256, depthwise=True),
             ((r"\['Conv_0'\]\['kernel'\]", P(None, None, None, "x")),
              (r"\['Conv_1'\]\['kernel'\]", P(None, None, None, "x")),
              (r"\['Conv_2'\]\['kernel'\]", P(None, None, "x"))),
             "channels: widening and depthwise convolutions split on their output channels"),
    AlpaCase("moe_layer", "test_moe.py::test_moe_layer", (4,), ("x",),
             lambda: _moe_step(64, 16, 64, 16, 32, 16),
             ((r"\['w[io]'\]", P("x")),) + _batch("x", "hidden_states", "attention_mask", "label"),
             "expert parallel: experts split, batch split, the rest replicated"),
    AlpaCase("moe_layer_2d", "test_moe.py::test_moe_layer_2d", (2, 2), ("a", "b"),
             lambda: _moe_step(64, 16, 64, 16, 32, 16),
             ((r"\['w[io]'\]", P("b")),)
             + _batch(("a", "b"), "hidden_states", "attention_mask", "label"),
             "experts split over one axis, batch over both, the rest replicated"),
    AlpaCase("dropout", "test_basic.py::test_dropout", (4,), ("x",), _dropout_step,
             _positional_batch("x", 1, 2),
             "data parallel, each device drawing only its own dropout bits"),
    AlpaCase("gather", "test_basic.py::test_gather", (4,), ("x",), _gather_step,
             _positional_batch("x", 1, 2), "data parallel through a column gather"),
)


# ------------------------------------------------------------------ judging a case
@dataclasses.dataclass(frozen=True)
class CaseResult:
    """``holds``: autoshard's plan has Alpa's layout. ``autoshard_s`` / ``alpa_s``: the
    compiled programs' yardsticks (seconds). ``differing``: argument paths whose spec
    differs from Alpa's (autoshard's spec, Alpa's)."""
    case: str
    cluster: str
    holds: bool
    autoshard_s: float
    alpa_s: float
    differing: tuple[tuple[str, str, str], ...]

    @property
    def ratio(self) -> float:
        return self.autoshard_s / self.alpa_s

    @property
    def passes(self) -> bool:
        return self.holds or self.ratio <= BEATEN_WITHIN


def _canonical(spec: P, ndim: int) -> tuple:
    """A spec's per-dimension entries, padded to ``ndim``, one-axis tuples unwrapped."""
    entries = [e[0] if isinstance(e, tuple) and len(e) == 1 else (e or None) for e in spec]
    return tuple(entries + [None] * (ndim - len(entries)))


def case_cluster(case: AlpaCase, preset: str) -> Cluster:
    """``preset`` with ``case``'s per-axis links (Alpa's ``mesh_beta``), if it gives them."""
    base = autoshard.cluster_preset(preset)
    if case.mesh_beta is None:
        return base
    links = tuple(Link(bandwidth=base.inter_node.bandwidth / beta, latency=base.inter_node.latency)
                  for beta in case.mesh_beta)
    return dataclasses.replace(base, name=f"{base.name}-alpa", axis_links=links)


def run_case(case: AlpaCase, preset: str) -> CaseResult:
    """Plan ``case`` with autoshard on ``preset``'s cluster, compile it and Alpa's layout."""
    step, args = case.build()
    mesh = autoshard.make_mesh(case.mesh_shape, case.axis_names)
    cluster = case_cluster(case, preset)
    parallel = autoshard.parallelize(step, mesh=mesh, cluster=cluster)
    plan = parallel.plan(*args)
    expected = rule_specs(args, case.rules)
    differing = []
    for (path, leaf), ours, alpas in zip(
            jax.tree_util.tree_leaves_with_path(args),
            jax.tree_util.tree_leaves(plan.in_specs, is_leaf=lambda s: isinstance(s, P)),
            jax.tree_util.tree_leaves(expected, is_leaf=lambda s: isinstance(s, P)), strict=True):
        ndim = len(jnp.shape(leaf))   # (a key array's shape leaves out its key data)
        if _canonical(ours, ndim) != _canonical(alpas, ndim):
            differing.append((jax.tree_util.keystr(path), str(ours), str(alpas)))
    shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), expected,
                                       is_leaf=lambda s: isinstance(s, P))
    alpa = jax.jit(step, in_shardings=shardings, out_shardings=shardings[0])
    measure = dict(mesh_shape=case.mesh_shape, cluster=cluster, axis_names=case.axis_names)
    return CaseResult(
        case=case.name, cluster=preset, holds=not differing,
        autoshard_s=yardstick(parallel.lower(*args).compile(), **measure).total_s,
        alpa_s=yardstick(alpa.lower(*args).compile(), **measure).total_s,
        differing=tuple(differing))


def report(results: Sequence[CaseResult]) -> str:
    """A markdown table of ``results`` and the differing specs of each case that does not
    hold."""
    by_name = {case.name: case for case in CASES}
    lines = ["| case | Alpa's test | mesh | cluster | Alpa's layout | holds | "
             "autoshard / Alpa (yardstick) | passes |", "|---|---|---|---|---|---|---:|---|"]
    for r in results:
        case = by_name[r.case]
        mesh = "x".join(map(str, case.mesh_shape))
        lines.append(f"| {r.case} | `{case.source}` | {mesh} | {r.cluster} | {case.expectation} "
                     f"| {'yes' if r.holds else 'no'} | {r.ratio:.2f} | "
                     f"{'yes' if r.passes else '**no**'} |")
    for r in results:
        if r.differing:
            lines.append(f"\n{r.case} on {r.cluster}: autoshard's layout differs from Alpa's on "
                         f"{len(r.differing)} argument(s), e.g. "
                         + "; ".join(f"`{p}` {ours} (Alpa: {alpas})"
                                     for p, ours, alpas in r.differing[:3]))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", default="host-cpu,h100-80gb")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    options = parser.parse_args(argv)
    wanted = options.cases.split(",")
    results = [run_case(case, preset) for case in CASES if case.name in wanted
               for preset in options.clusters.split(",")]
    text = report(results)
    print(text)
    if options.out:
        options.out.write_text(text)
    return 0 if all(r.passes for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
