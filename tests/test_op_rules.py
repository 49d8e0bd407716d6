"""Sharding rules for random bits, pooling and grouped convolutions, checked three ways:
each rule's strategies against what XLA's SPMD partitioner compiles for that one op, plans
of small train steps against single-device ``jax.jit``, and which dims those plans split."""
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry2x32_p
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.cost_model import MeshCostModel, cluster_preset
from autoshard.intra.op_rules import loop_op
from autoshard.intra.strategies import loop_strategies
from autoshard.ir.jax_compat import bind
from autoshard.ir.program import Literal
from autoshard.ir.specs import to_partition_spec
from autoshard.ir.trace import trace

MESHES = [((8,), ("data",)), ((2, 4), ("data", "model"))]
MESH_IDS = ["8", "2x4"]
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                        r"(?:-start)?\(")


def _assert_matches_jit(actual, expected):
    """Same tree, every leaf within rtol 1e-5 (atol 1e-6 for values near zero)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)


def _collectives(hlo: str) -> set[str]:
    return {m.group(1) for m in COLLECTIVE.finditer(hlo)}


def _conv(x, w, groups=1):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


def _max_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _avg_pool(x):
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME") / 9


def _prod_pool(x):  # reduce_window with its own computation
    return jax.lax.reduce_window(x, 1.0, jax.lax.mul, (1, 2, 2, 1), (1, 1, 1, 1), "VALID")


# --------------------------------------------------------------------------- rules vs XLA

_X = jax.ShapeDtypeStruct((8, 6, 6, 8), jnp.float32)


def _filters(cg, o):
    return jax.ShapeDtypeStruct((3, 3, cg, o), jnp.float32)


def _conv_grads(groups):
    return jax.grad(lambda x, w: _conv(x, w, groups).sum(), argnums=(0, 1))


SINGLE_OPS = {
    "max_pool_and_grad": (jax.grad(lambda x: _max_pool(x).sum()), (_X,)),
    "avg_pool_and_grad": (jax.grad(lambda x: _avg_pool(x).sum()), (_X,)),
    "generic_reduce_window": (_prod_pool, (_X,)),
    "max_pool_jvp": (lambda x, t: jax.jvp(_max_pool, (x,), (t,)), (_X, _X)),
    "depthwise_conv_and_grads": (_conv_grads(8), (_X, _filters(1, 8))),
    "depthwise_x2_conv_and_grads": (_conv_grads(8), (_X, _filters(1, 16))),
    "grouped_conv_and_grads": (_conv_grads(2), (_X, _filters(4, 8))),
    "conv_and_grads": (_conv_grads(1), (_X, _filters(8, 8))),
    "bernoulli_typed_key": (lambda k: jax.random.bernoulli(k, 0.9, (16, 8)), (jax.random.key(0),)),
    "uint8_bits": (lambda k: jax.random.bits(k, (16, 8), jnp.uint8), (jax.random.key(0),)),
    "uniform_legacy_key": (lambda k: jax.random.uniform(k, (16, 8)), (jax.random.PRNGKey(0),)),
    "uniform_key_batch": (lambda ks: jax.vmap(lambda k: jax.random.uniform(k, (4,)))(ks),
                          (jax.random.split(jax.random.key(0), 8),)),
    "tile": (lambda x: jnp.tile(x, (1, 2, 1, 3)), (_X,)),
    "batched_linear_algebra": (
        lambda a: (jnp.linalg.cholesky(a @ a.mT + 16 * jnp.eye(16)), jnp.linalg.eigh(a + a.mT),
                   jnp.linalg.qr(a), jnp.linalg.svd(a), jax.lax.linalg.lu(a),
                   jax.lax.linalg.triangular_solve(a, a, left_side=True, lower=True)),
        (jax.ShapeDtypeStruct((8, 4, 16, 16), jnp.float32),)),
    "more_linear_algebra": (
        lambda a, d: (jnp.linalg.eig(a), jax.lax.linalg.schur(a), jax.lax.linalg.hessenberg(a),
                      jax.lax.linalg.householder_product(a, d[..., :8]),
                      jax.lax.linalg.tridiagonal_solve(d, d + 4.0, d, a),
                      jax.lax.linalg.lu_pivots_to_permutation(d.astype(jnp.int32) % 16, 16),
                      jax.lax.linalg.tridiagonal(a), jax.lax.linalg.symmetric_product(a, a),
                      jax.lax.linalg.ormqr(a, d[..., :8], a)),
        (jax.ShapeDtypeStruct((8, 4, 16, 16), jnp.float32),
         jax.ShapeDtypeStruct((8, 4, 16), jnp.float32))),
    "cholesky_update": (jax.lax.linalg.cholesky_update,
                        (jax.ShapeDtypeStruct((16, 16), jnp.float32),
                         jax.ShapeDtypeStruct((16,), jnp.float32))),
    "linear_solve": (lambda a, b: jnp.linalg.solve(a + 16 * jnp.eye(16), b),
                     (jax.ShapeDtypeStruct((8, 4, 16, 16), jnp.float32),
                      jax.ShapeDtypeStruct((8, 4, 16, 2), jnp.float32))),
    "ragged_dot_and_grads": (
        jax.value_and_grad(lambda x, w, sizes: jax.lax.ragged_dot(x, w, sizes).sum(),
                           argnums=(0, 1)),
        (jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((4, 32, 48), jnp.float32),
         jax.ShapeDtypeStruct((4,), jnp.int32))),
    "stack": (lambda x: jnp.stack([x, 2 * x, x], axis=1), (_X,)),
    "approx_top_k": (lambda x: (jax.lax.approx_max_k(x, 3),
                                jax.lax.approx_min_k(x, 2, reduction_dimension=1)), (_X,)),
    "scatter_max_min_mul": (
        lambda x, i: (x.at[i].max(1.0), x.at[:, i].min(0.0), x.at[i].multiply(2.0),
                      jax.ops.segment_max(x, i, num_segments=4)),
        (_X, jax.ShapeDtypeStruct((8,), jnp.int32))),
    "rfft_irfft": (lambda x: jnp.fft.irfft(jnp.fft.rfft(x, axis=1), n=6, axis=1), (_X,)),
    "threefry2x32": (lambda k, a, b: threefry2x32_p.bind(k[0], k[1], a, b),
                     (jax.ShapeDtypeStruct((2,), jnp.uint32),
                      jax.ShapeDtypeStruct((8, 4), jnp.uint32),
                      jax.ShapeDtypeStruct((8, 4), jnp.uint32))),
}
CHECKED = {"reduce_window_max", "reduce_window_sum", "reduce_window", "select_and_scatter_add",
           "select_and_gather_add", "conv_general_dilated", "reshape", "random_bits",
           "threefry2x32", "tile", "fft", "cholesky", "eigh", "qr", "svd", "lu",
           "triangular_solve", "eig", "schur", "hessenberg", "householder_product",
           "tridiagonal_solve", "lu_pivots_to_permutation", "tridiagonal",
           "symmetric_product", "ormqr", "cholesky_update", "stack", "approx_top_k",
           "scatter-max", "scatter-min", "scatter-mul", "ragged_dot_general"}


def _equation_fn(eqn):
    """``eqn`` alone, as a function of its non-literal operands."""
    def fn(*xs):
        it = iter(xs)
        return bind(eqn.primitive, eqn.params,
                    [a.value if isinstance(a, Literal) else next(it) for a in eqn.inputs])
    return fn


def _compiled_collectives(eqn, in_avals, strategy, mesh, names) -> set[str]:
    operands = [k for k, a in enumerate(eqn.inputs) if not isinstance(a, Literal)]
    shard = lambda spec: NamedSharding(mesh, to_partition_spec(spec, names))  # noqa: E731
    step = jax.jit(_equation_fn(eqn),
                   in_shardings=tuple(shard(strategy.in_specs[k]) for k in operands),
                   out_shardings=tuple(shard(s) for s in strategy.out_specs))
    avals = [jax.ShapeDtypeStruct(in_avals[k].shape, in_avals[k].dtype) for k in operands]
    return _collectives(step.lower(*avals).compile().as_text())


@pytest.mark.parametrize("shape, names", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("case", sorted(SINGLE_OPS))
def test_every_loop_strategy_compiles_to_its_own_collectives(case, shape, names):
    """Each strategy a rule offers (axes on loops; the generic reduce-scatter variants
    aside) compiles, for its op alone, with no collective but the all-reduce of a split
    reduction loop: the loop description is what XLA's partitioner does."""
    fn, args = SINGLE_OPS[case]
    program = trace(fn, args).program
    mesh = autoshard.make_mesh(shape, names)
    model = MeshCostModel(cluster_preset("host-cpu"), shape)
    checked = 0
    for eqn in program.eqns:
        if eqn.primitive.name not in CHECKED:
            continue
        in_avals = [None if isinstance(a, Literal) else program.avals[a] for a in eqn.inputs]
        out_avals = [program.avals[v] for v in eqn.outputs]
        op = loop_op(eqn, in_avals, out_avals)
        assert op is not None, eqn
        for strategy in loop_strategies(op, in_avals, out_avals, model):
            if strategy.scatters:
                continue
            found = _compiled_collectives(eqn, in_avals, strategy, mesh, names)
            expected = {"all-reduce"} if strategy.collectives else set()
            assert found == expected, (eqn, strategy.name, found)
            checked += 1
    assert checked


def _conv_transpose(x, w):
    return jax.lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("fn, args", [
    (_conv, (_X, _filters(8, 8))),                 # padding: the edges' taps read zeros
    (_conv_transpose, (_X, _filters(8, 4))),       # input dilated by 2: a quarter of them
    (lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "VALID", rhs_dilation=(2, 2),
                                               dimension_numbers=("NHWC", "HWIO", "NHWC")),
     (_X, _filters(8, 8))),
    (lambda x: jnp.fft.rfft(x, axis=1), (_X,)),
    (lambda x: jnp.fft.irfft(x, n=10, axis=2), (jax.ShapeDtypeStruct((8, 6, 6, 8), jnp.complex64),)),
    (lambda x: jnp.fft.fft2(x), (jax.ShapeDtypeStruct((8, 16, 32), jnp.complex64),)),
], ids=["conv_same", "conv_transpose", "conv_strided_dilated", "rfft", "irfft", "fft2"])
def test_flops_are_counted_as_xla_counts_them(fn, args):
    """A convolution's multiply-adds on padding and on the holes of a dilated input, and
    an FFT's butterflies, counted as XLA's ``cost_analysis`` counts them (the audit found a
    transposed convolution's flops at 2.3x, and an FFT's, with no rule, at 0.04x)."""
    program = trace(fn, args).program
    (eqn,) = [e for e in program.eqns if e.primitive.name in ("conv_general_dilated", "fft")]
    in_avals = [program.avals[a] for a in eqn.inputs]
    op = loop_op(eqn, in_avals, [program.avals[v] for v in eqn.outputs])
    compiled = jax.jit(_equation_fn(eqn)).lower(*in_avals).compile().cost_analysis()
    assert op.flops == pytest.approx(compiled["flops"], rel=1e-6)


def test_xla_gathers_grouped_convolutions_so_their_rule_splits_nothing():
    """XLA's partitioner gathers a grouped convolution with several input features per
    group whole, even split only on the batch; if a jax upgrade partitions it, the conv
    rule can let its batch and group loops split as it does for depthwise ones."""
    mesh = autoshard.make_mesh((8,), ("data",))
    step = jax.jit(lambda x, w: _conv(x, w, 2), in_shardings=(
        NamedSharding(mesh, P("data")), NamedSharding(mesh, P())),
        out_shardings=NamedSharding(mesh, P("data")))
    assert "all-gather" in _collectives(step.lower(_X, _filters(4, 8)).compile().as_text())
    program = trace(lambda x, w: _conv(x, w, 2), (_X, _filters(4, 8))).program
    eqn = program.eqns[0]
    op = loop_op(eqn, [program.avals[a] for a in eqn.inputs], [program.avals[eqn.outputs[0]]])
    assert not any(op.splittable)


# --------------------------------------------------------------------------- loop descriptions


def _loop_op_of(fn, args, primitive):
    program = trace(fn, args).program
    eqn = next(e for e in program.eqns if e.primitive.name == primitive)
    return loop_op(eqn, [None if isinstance(a, Literal) else program.avals[a]
                         for a in eqn.inputs], [program.avals[v] for v in eqn.outputs])


def test_transposing_reshape_maps_loops_to_the_operand_dims_they_came_from():
    """``reshape(x, (3, 3, 4, 4), dimensions=(0, 1, 3, 2, 4))`` of ``x [3, 3, 2, 2, 4]``:
    output dim 2 merges operand dims 3 (major) and 2, so it follows operand dim 3's loop."""
    x = jax.ShapeDtypeStruct((3, 3, 2, 5, 4), jnp.float32)
    op = _loop_op_of(lambda x: jax.lax.reshape(x, (3, 3, 10, 4), dimensions=(0, 1, 3, 2, 4)),
                     (x,), "reshape")
    (in_dims,), (out_dims,) = op.in_dims, op.out_dims
    assert out_dims[2] == in_dims[3] and in_dims[2] is None
    assert op.sizes[out_dims[2]] == 5


def test_pooling_splits_only_dims_the_window_leaves_alone():
    op = _loop_op_of(_max_pool, (_X,), "reduce_window_max")
    assert op.splittable == (True, False, False, True)
    assert op.in_dims == ((0, None, None, 3),)
    strided = _loop_op_of(lambda x: jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 1, 2, 1), (1, 2, 1, 1), "VALID"), (_X,), "reduce_window_max")
    assert strided.splittable == (True, False, False, True)   # stride 2 alone keeps H whole


def test_random_bits_split_only_for_partitionable_threefry():
    bernoulli = lambda k: jax.random.bernoulli(k, 0.5, (16, 8))  # noqa: E731
    op = _loop_op_of(bernoulli, (jax.random.key(0),), "random_bits")
    assert op.splittable == (True, True) and op.in_dims == ((),)
    assert _loop_op_of(bernoulli, (jax.random.key(0, impl="rbg"),), "random_bits") is None
    jax.config.update("jax_threefry_partitionable", False)
    try:
        assert _loop_op_of(bernoulli, (jax.random.key(0),), "random_bits") is None
    finally:
        jax.config.update("jax_threefry_partitionable", True)


# --------------------------------------------------------------------------- plans of steps


def _sgd(loss):
    def step(params, *rest):
        value, grads = jax.value_and_grad(loss)(params, *rest)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value
    return step


def _plan_and_run(fn, args, shape, names, method, batch_argnums):
    """The plan, its outputs, the compiled HLO and the "no sharding rule" warnings
    planning raised (or recorded in the plan)."""
    mesh = autoshard.make_mesh(shape, names)
    step = autoshard.parallelize(fn, mesh=mesh, method=method, batch_argnums=batch_argnums)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = step.plan(*args)
    out = step(*args)
    messages = [str(w.message) for w in caught] + list(plan.warnings)
    unsupported = [m for m in messages if "no sharding rule" in m]
    return plan, out, step.lower(*args).compile().as_text(), unsupported


def _specs_of(fn, args, plan, primitive):
    """The plan's layout of every output of ``primitive``'s equations."""
    program = trace(fn, args).program
    specs = dict(plan.value_specs)
    return [specs.get(eqn.outputs[0], P()) for eqn in program.eqns
            if eqn.primitive.name == primitive]


def _dim_axes(spec: P, dim: int) -> tuple:
    entries = tuple(spec) + (None,) * (dim + 1)
    entry = entries[dim]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


# a batch that outweighs the weights, so that splitting it is the cheapest plan: XLA's CPU
# collectives run each gradient's all-reduce on its own (Cluster.all_reduce_per_operand),
# and at batch 256 one all-reduce of the output (hidden split) beats two of the gradients
# (measured on 8 devices: 1.84 ms a step against data parallelism's 2.07 ms)
B, D, H = 2048, 32, 128


def _dropout_loss(params, key, batch):
    """An MLP with dropout on its hidden layer; the mask is drawn for ``h``'s shape."""
    h = jax.nn.relu(batch["x"] @ params["w1"])
    keep = jax.random.bernoulli(key, 0.9, h.shape)
    h = jnp.where(keep, h / 0.9, 0.0)
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def _dropout_step(params, key, batch):
    """SGD on the dropout MLP; the loss closes over the key and the batch."""
    value, grads = jax.value_and_grad(lambda p: _dropout_loss(p, key, batch))(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value


def _dropout_args(key_kind):
    k = jax.random.split(jax.random.key(1), 4)
    params = {"w1": jax.random.normal(k[0], (D, H)) * 0.1,
              "w2": jax.random.normal(k[1], (H, D)) * 0.1}
    batch = {"x": jax.random.normal(k[2], (B, D)), "y": jax.random.normal(k[3], (B, D))}
    key = jax.random.key(4) if key_kind == "typed" else jax.random.PRNGKey(4)
    return params, key, batch


@pytest.mark.parametrize("key_kind", ["typed", "legacy"])
@pytest.mark.parametrize("method", [autoshard.ShardParallel(), autoshard.DataParallel()],
                         ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("shape, names", MESHES, ids=MESH_IDS)
def test_dropout_mask_is_drawn_where_the_batch_lives(shape, names, method, key_kind):
    """The plan gives jit's numbers, draws the mask split like the batch, and never
    gathers a batch-sized activation to meet a replicated mask. (DataParallel pins no
    intermediate: XLA's propagation draws the mask, and the HLO must show it split.)"""
    args = _dropout_args(key_kind)
    plan, out, hlo, unsupported = _plan_and_run(_dropout_step, args, shape, names, method, (2,))
    _assert_matches_jit(out, jax.jit(_dropout_step)(*args))
    batch_axes = _dim_axes(plan.in_specs[2]["x"], 0)
    assert batch_axes, "the plan should split the batch"
    if isinstance(method, autoshard.ShardParallel):
        (mask_spec,) = _specs_of(_dropout_step, args, plan, "random_bits")
        assert set(batch_axes) <= set(_dim_axes(mask_spec, 0)), mask_spec
    gathered = re.findall(r"= \w+\[([\d,]*)\][^=]* all-gather\(", hlo)
    assert not [s for s in gathered if s.split(",")[0] == str(B)], gathered
    assert not unsupported, unsupported


def _cnn_loss(params, batch):
    """conv → relu → depthwise conv → grouped conv → max-pool → avg-pool → dense → MSE."""
    h = jax.nn.relu(_conv(batch["x"], params["conv"]))
    if "depthwise" in params:
        h = jax.nn.relu(_conv(h, params["depthwise"], groups=h.shape[-1]))
        h = jax.nn.relu(_conv(h, params["grouped"], groups=2))
    h = _max_pool(h)
    h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    return jnp.mean((h.reshape(h.shape[0], -1) @ params["dense"] - batch["y"]) ** 2)


def _cnn_args(channels, grouped, batch=64, image=16):
    k = jax.random.split(jax.random.key(1), 6)
    params = {"conv": jax.random.normal(k[0], (3, 3, 3, channels)) * 0.2,
              "dense": jax.random.normal(k[1], ((image // 4) ** 2 * channels, 10)) * 0.1}
    if grouped:
        params["depthwise"] = jax.random.normal(k[2], (3, 3, 1, channels)) * 0.3
        params["grouped"] = jax.random.normal(k[3], (3, 3, channels // 2, channels)) * 0.2
    data = {"x": jax.random.normal(k[4], (batch, image, image, 3)),
            "y": jax.random.normal(k[5], (batch, 10))}
    return params, data


@pytest.mark.parametrize("shape, names", MESHES, ids=MESH_IDS)
def test_max_pool_cnn_splits_its_pooling_by_batch(shape, names):
    step = _sgd(_cnn_loss)
    args = _cnn_args(channels=4, grouped=False)
    plan, out, _, unsupported = _plan_and_run(step, args, shape, names, autoshard.ShardParallel(),
                                         (1,))
    _assert_matches_jit(out, jax.jit(step)(*args))
    assert not unsupported, unsupported
    batch_axes = _dim_axes(plan.in_specs[1]["x"], 0)
    assert batch_axes, "the plan should split the batch"
    for primitive in ("reduce_window_max", "reduce_window_sum", "select_and_scatter_add"):
        specs = _specs_of(step, args, plan, primitive)
        assert specs and all(_dim_axes(s, 0) == batch_axes for s in specs), (primitive, specs)


@pytest.mark.parametrize("shape, names", MESHES, ids=MESH_IDS)
def test_depthwise_and_grouped_convolutions(shape, names):
    """jit's numbers; the depthwise conv is split (by batch or channels), no op of the
    step lacks a rule (the transposing reshapes of the filter gradients included)."""
    step = _sgd(_cnn_loss)
    args = _cnn_args(channels=8, grouped=True)
    plan, out, _, unsupported = _plan_and_run(step, args, shape, names, autoshard.ShardParallel(),
                                         (1,))
    _assert_matches_jit(out, jax.jit(step)(*args))
    assert not unsupported, unsupported
    program = trace(step, args).program
    specs = dict(plan.value_specs)
    depthwise = [specs[e.outputs[0]] for e in program.eqns
                 if e.primitive.name == "conv_general_dilated"
                 and e.params["feature_group_count"] == 8]
    assert depthwise and all(_dim_axes(s, 0) or _dim_axes(s, 3) for s in depthwise), depthwise


def test_batched_linear_algebra_splits_its_batch_and_matches_jit():
    """A block preconditioner (Shampoo-like: an ``eigh`` per block of a statistics
    stack): the linear algebra had no rule, ran replicated and warned; its batch of blocks
    now splits like any batch dim, with no collective."""
    def step(stats, grads):
        stats = 0.9 * stats + jnp.einsum("bij,bkj->bik", grads, grads)
        w, v = jnp.linalg.eigh(stats + 1e-3 * jnp.eye(stats.shape[-1]))
        root = jnp.einsum("bij,bj,bkj->bik", v, jax.lax.rsqrt(jnp.maximum(w, 1e-6)), v)
        return stats, jnp.einsum("bij,bjk->bik", root, grads)

    keys = jax.random.split(jax.random.key(0))
    stats = jnp.stack([jnp.eye(32)] * 16)
    grads = jax.random.normal(keys[1], (16, 32, 32))
    mesh = autoshard.make_mesh((8,), ("data",))
    planned = autoshard.parallelize(step, mesh=mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = planned.plan(stats, grads)
    assert plan.in_specs[0] == P("data")
    assert not plan.collectives
    _assert_matches_jit(planned(stats, grads), jax.jit(step)(stats, grads))


@pytest.mark.parametrize("special", [
    jax.scipy.special.i0e, jax.scipy.special.i1e,
    lambda x: jax.scipy.special.betainc(2.0, 3.0, jax.nn.sigmoid(x)),
    lambda x: jax.grad(lambda a: jax.scipy.special.gammainc(a, 0.5).sum())(jnp.abs(x) + 1.0),
], ids=["i0e", "i1e", "betainc", "gammainc_grad"])
def test_special_functions_are_elementwise(special):
    """Bessel, incomplete beta and gamma-gradient primitives had no rule: they ran
    replicated with a warning although each element is computed alone."""
    x = jax.random.normal(jax.random.key(1), (64, 32))
    planned = autoshard.parallelize(lambda x: special(x) * 2.0,
                                    mesh=autoshard.make_mesh((8,), ("data",)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = planned.plan(x)
    assert plan.in_specs[0] != P() and not plan.collectives  # split, nothing gathered
    _assert_matches_jit(planned(x), jax.jit(lambda x: special(x) * 2.0)(x))


def _ragged_moe_loss(w, x, sizes):
    return jnp.mean(jax.lax.ragged_dot(jax.nn.gelu(x), w, sizes) ** 2)


def _solve_loss(a, b):
    spd = a @ a.mT + 8.0 * jnp.eye(a.shape[-1])
    return jnp.mean(jnp.linalg.solve(spd, b) ** 2) + jnp.mean(jnp.linalg.inv(spd))


def _stacked_losses(ws, x):
    outs = [jnp.tanh(x @ w) for w in jnp.unstack(ws)]
    return jnp.mean(jnp.stack(outs, axis=1) ** 2)


def _segment_max_loss(w, x, segments):
    pooled = jax.ops.segment_max(x @ w, segments, num_segments=8)
    return jnp.mean(pooled ** 2) + jnp.mean(x.at[segments].multiply(0.5) @ w)


def _bucketed_loss(w, x):
    buckets = jnp.digitize(x[:, 0], jnp.linspace(-1.0, 1.0, 7))
    values, _ = jax.lax.approx_max_k(x @ w, 4)
    return jnp.mean(values) + jnp.mean(jnp.take(w[0], buckets))


_R = np.random.default_rng(0)
_f32 = lambda *shape: jnp.asarray(_R.normal(size=shape), jnp.float32)  # noqa: E731
USER_FUNCTIONS = {
    "ragged_dot_moe": (_ragged_moe_loss, (_f32(4, 32, 64), _f32(64, 32),
                                          jnp.array([16, 24, 8, 16], jnp.int32))),
    "linalg_solve_and_inv": (_solve_loss, (_f32(8, 16, 16), _f32(8, 16, 4))),
    "stack_unstack": (_stacked_losses, (_f32(4, 32, 32), _f32(64, 32))),
    "segment_max_and_scatter_mul": (_segment_max_loss, (_f32(32, 16), _f32(64, 32),
                                                        jnp.arange(64, dtype=jnp.int32) % 8)),
    "digitize_and_approx_top_k": (_bucketed_loss, (_f32(32, 16), _f32(64, 32))),
}


@pytest.mark.parametrize("case", sorted(USER_FUNCTIONS))
def test_functions_jax_builds_from_new_primitives_plan_without_a_warning(case):
    """Gradients of losses built from jax functions whose primitives had no rule (each ran
    replicated with a warning): ``ragged_dot``, ``jnp.linalg.solve`` / ``inv`` (a
    ``custom_linear_solve``), ``stack`` / ``unstack``, ``segment_max`` and ``.at[].multiply``,
    ``digitize`` (``lt_to``) and ``approx_max_k``. Planned on 2x4 with no warning, they
    give jax.jit's numbers."""
    loss, args = USER_FUNCTIONS[case]
    step = jax.value_and_grad(loss)
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = autoshard.parallelize(step, mesh=mesh)(*args)
    expected = jax.jit(step)(*args)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
