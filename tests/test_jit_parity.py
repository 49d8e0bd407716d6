"""parallelize(f)(*args, **kwargs) gives what jax.jit(f) gives: dtype (weak types included),
shape and value; argument numbers and names are read and checked as jax.jit reads them."""
from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoshard
import autoshard.api


@pytest.fixture(scope="module")
def mesh8():
    return autoshard.make_mesh((8,), ("data",))


def assert_same_as_jit(got, want):
    """Same tree, and per leaf the same shape, dtype, weak type and values."""
    got_leaves, got_tree = jax.tree_util.tree_flatten(got)
    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    assert got_tree == want_tree
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        assert bool(getattr(g, "weak_type", False)) == bool(getattr(w, "weak_type", False))
        np.testing.assert_array_equal(np.asarray(g, dtype=np.float64) if g.dtype == jnp.bfloat16
                                      else np.asarray(g),
                                      np.asarray(w, dtype=np.float64) if w.dtype == jnp.bfloat16
                                      else np.asarray(w))


def count_plans(monkeypatch) -> list:
    """Every plan_traced call made through parallelize from now on, appended to a list."""
    calls = []
    real = autoshard.api.plan_traced

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(autoshard.api, "plan_traced", counting)
    return calls


# ------------------------------------------------------------------ weak types
def test_python_scalar_keeps_the_array_dtype(mesh8):
    fn = lambda x, s: x * s  # noqa: E731
    x = jnp.full((8,), 100, jnp.int8)
    got = autoshard.parallelize(fn, mesh=mesh8)(x, 3)
    assert got.dtype == jnp.int8
    assert_same_as_jit(got, jax.jit(fn)(x, 3))   # int8 44: 300 wraps


def test_float_learning_rate_keeps_bf16_params_and_plans_once(mesh8, monkeypatch):
    def sgd(w, lr):
        return jax.tree.map(lambda p: p - lr * p, w)

    plans = count_plans(monkeypatch)
    step = autoshard.parallelize(sgd, mesh=mesh8)
    w = {"a": jnp.ones((16, 8), jnp.bfloat16), "b": jnp.ones((8,), jnp.bfloat16)}
    w1 = step(w, 0.1)
    assert_same_as_jit(w1, jax.jit(sgd)(w, 0.1))
    step(w1, 0.1)   # the outputs feed the next call with the same signature
    assert len(plans) == 1


def test_weakly_typed_outputs_and_arrays(mesh8):
    double = lambda s: s * 2  # noqa: E731
    out = autoshard.parallelize(double, mesh=mesh8)(3)
    assert_same_as_jit(out, jax.jit(double)(3))
    assert out.weak_type
    weak = jnp.asarray(2.0) * 1   # a weakly typed array, as jax makes from a Python float
    assert weak.weak_type
    mul = lambda x, s: x * s  # noqa: E731
    x = jnp.ones((8,), jnp.float16)
    step = autoshard.parallelize(mul, mesh=mesh8)
    assert_same_as_jit(step(x, weak), jax.jit(mul)(x, weak))
    strong = jnp.float32(2.0)
    assert_same_as_jit(step(x, strong), jax.jit(mul)(x, strong))   # float32: another plan


@pytest.mark.parametrize("method", [autoshard.ShardParallel(), autoshard.ZeRO3()],
                         ids=["ilp", "zero3"])
def test_constant_outputs_beside_a_gradient(mesh8, method):
    """A step returning constants (a placeholder metric, a step count's increment): jax
    writes them as literals in the program's outputs."""
    def step(p, x):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((x @ p["w"]) ** 2))(p)
        return grads, loss, jnp.float32(0.0), 3

    p, x = {"w": jnp.ones((16, 16)) / 4}, jnp.ones((8, 16))
    out = autoshard.parallelize(step, mesh=mesh8, method=method)(p, x)
    want = jax.jit(step)(p, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5), out, want)


def test_shape_dtype_struct_weak_type_is_planned_as_given():
    mesh = autoshard.abstract_mesh((8,), ("data",))
    step = autoshard.parallelize(lambda x, s: x * s, mesh=mesh)
    x = jax.ShapeDtypeStruct((8,), jnp.int8)
    weak = step.plan(x, jax.ShapeDtypeStruct((), jnp.int32, weak_type=True))
    strong = step.plan(x, jax.ShapeDtypeStruct((), jnp.int32))
    assert weak.fingerprint == step.plan(x, 3).fingerprint != strong.fingerprint


# ------------------------------------------------------------------ static arguments
_STATIC_PROGRAM = """
import functools, sys
import jax, jax.numpy as jnp
import autoshard

class Scaled:                      # an object whose repr holds its address
    def __init__(self, k):
        self.k = k
    def __call__(self, x):
        return x * self.k
    def __hash__(self):
        return hash(self.k)
    def __eq__(self, other):
        return isinstance(other, Scaled) and other.k == self.k

def step(x, act, post, names, gelu):
    return post(gelu(act(x))) * len(names)

mesh = autoshard.abstract_mesh((8,), ("data",))
fn = autoshard.parallelize(step, mesh=mesh, static_argnums=(1, 2, 3, 4),
                           method=autoshard.DataParallel())
plan = fn.plan(jax.ShapeDtypeStruct((16, 8), jnp.float32), jax.nn.relu, Scaled(2),
               frozenset({"alpha", "beta", "gamma", "delta", "epsilon"}),
               functools.partial(jax.nn.gelu, approximate=False))
print(plan.fingerprint, autoshard.plan_digest(plan))
"""


def test_static_functions_and_objects_fingerprint_alike_in_every_process():
    """Functions, objects, sets and partials passed as static arguments: two processes
    with different hash seeds (and memory layouts) make the same fingerprint and digest."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    outs = []
    procs = [subprocess.Popen([sys.executable, "-c", _STATIC_PROGRAM], cwd=repo, text=True,
                              env=dict(os.environ, PYTHONHASHSEED=seed, JAX_PLATFORMS="cpu"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for seed in ("1", "2")]
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
            outs.append(out.split())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert outs[0] == outs[1]


def test_static_identity_tells_values_apart_and_ignores_addresses():
    import functools

    from autoshard.ir.fingerprint import static_identity

    class Scaled:
        def __init__(self, k):
            self.k = k

    assert static_identity(Scaled(2)) == static_identity(Scaled(2)) != static_identity(Scaled(3))
    assert "0x" not in static_identity(Scaled(2))
    assert static_identity(jax.nn.relu) != static_identity(jax.nn.gelu)
    assert "0x" not in static_identity(jax.nn.relu)
    assert static_identity(functools.partial(jax.nn.gelu, approximate=True)) != \
        static_identity(functools.partial(jax.nn.gelu, approximate=False))
    assert static_identity({"b", "a"}) == static_identity({"a", "b"})
    assert static_identity(1) != static_identity(1.0) != static_identity("1")
    first = lambda x: x  # noqa: E731
    second = lambda x: x + 1  # noqa: E731
    assert static_identity(first) != static_identity(second)   # by their lines


# ------------------------------------------------------------------ argument numbers and names
def _three(x, y, z):
    return x + y * z


@pytest.mark.parametrize("setting", [
    dict(static_argnums=3), dict(static_argnums=-4), dict(donate_argnums=(0, 5)),
    dict(batch_argnums=3), dict(batch_argnums=-7), dict(static_argnames="w"),
    dict(donate_argnames=("x", "nope")),
])
def test_out_of_range_argument_numbers_and_unknown_names_raise(setting):
    with pytest.raises(ValueError) as info:
        autoshard.parallelize(_three, **setting)
    message = str(info.value)
    assert next(iter(setting)) in message and "_three" in message
    with pytest.raises(ValueError):   # as jax.jit does
        jax.jit(_three, **{k: v for k, v in setting.items() if k != "batch_argnums"}
                or dict(static_argnums=3))


def test_static_and_donated_together_raise():
    with pytest.raises(ValueError, match="both static and donated"):
        autoshard.parallelize(_three, static_argnums=1, donate_argnames="y")
    with pytest.raises(ValueError, match="both static and batch"):
        autoshard.parallelize(_three, static_argnums=2, batch_argnums=-1)


def test_negative_numbers_count_from_the_last_parameter(mesh8, monkeypatch):
    fn = lambda x, n: x * n  # noqa: E731
    step = autoshard.parallelize(fn, mesh=mesh8, static_argnums=-1)
    x = jnp.arange(8.0)
    assert_same_as_jit(step(x, 3), jax.jit(fn, static_argnums=-1)(x, 3))
    assert step.plan(x, 3).in_specs[1] is None   # static: no spec
    plans = count_plans(monkeypatch)
    step(x, 4)   # another static value: another plan
    assert len(plans) == 1


def test_varargs_functions_check_numbers_per_call(mesh8):
    step = autoshard.parallelize(lambda *a: a[0] * a[1], mesh=mesh8, donate_argnums=2)
    with pytest.raises(ValueError, match="donate_argnums names argument 2 but .* called with "
                                         "2 positional arguments"):
        step(jnp.ones(8), 2.0)


def test_keyword_arguments_in_calls(mesh8):
    def step(params, batch, scale=2.0):
        return jax.tree.map(lambda p: p * scale, params), (batch * params["w"]).sum()

    fn = autoshard.parallelize(step, mesh=mesh8)
    params, batch = {"w": jnp.arange(32.0).reshape(8, 4)}, jnp.ones((8, 4))
    assert_same_as_jit(fn(params, batch=batch), jax.jit(step)(params, batch=batch))
    assert_same_as_jit(fn(params, batch, scale=3.0), jax.jit(step)(params, batch, scale=3.0))
    assert_same_as_jit(fn(batch=batch, params=params), jax.jit(step)(batch=batch, params=params))
    # keyword arguments follow the positional ones, in name order, as jax.jit orders them
    assert fn.plan(params, batch=batch).in_paths == ("args[0]['w']", "args[1]")
    with pytest.raises(TypeError, match="multiple values for argument 'batch'"):
        fn(params, batch, batch=batch)


def test_static_and_donate_argnames(mesh8):
    def fn(x, *, power, y):
        return x ** power + y

    step = autoshard.parallelize(fn, mesh=mesh8, static_argnames="power", donate_argnames="y")
    x = jnp.arange(8.0)
    y = step(x, power=2, y=jnp.ones(8))       # y is placed on the mesh by this first call
    assert_same_as_jit(step(x, power=3, y=jnp.ones(8)),
                       jax.jit(fn, static_argnames="power")(x, power=3, y=jnp.ones(8)))
    out = step(x, power=2, y=y)
    assert y.is_deleted()                      # donated, as under jax.jit
    assert_same_as_jit(out, x ** 2 + x ** 2 + 1)
    assert "donor" in step.lower(x, power=2, y=out).as_text() or \
        "aliasing_output" in step.lower(x, power=2, y=out).as_text()


def test_static_argnums_apply_to_the_same_argument_passed_by_keyword(mesh8):
    fn = lambda x, n: x * n  # noqa: E731
    step = autoshard.parallelize(fn, mesh=mesh8, static_argnums=1)
    x = jnp.arange(8.0)
    assert_same_as_jit(step(x, n=3), jax.jit(fn, static_argnums=1)(x, n=3))
    assert step.plan(x, n=3).in_specs[1] is None


def test_default_mesh_touches_no_devices_until_the_first_call():
    """A module-level @parallelize runs before jax.distributed.initialize(): deciding the
    default mesh there would start the backends with the wrong process count."""
    import os
    import subprocess
    import sys
    code = ("import jax, jax.numpy as jnp, autoshard\n"
            "from jax._src import xla_bridge\n"
            "step = autoshard.parallelize(lambda x: x * 2)\n"
            "repr(step)\n"
            "assert not xla_bridge.backends_are_initialized(), 'backends started'\n"
            "print(step(jnp.ones(8)).sum(), step)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "16.0" in done.stdout and "{'devices': 4}" in done.stdout


# ------------------------------------------------------------------ jit's other methods
def _sgd_step(params, x, lr=0.1):
    grads = jax.grad(lambda p: jnp.mean(jnp.tanh(x @ p["w1"]) @ p["w2"]))(params)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), {"n": 3, "sum": jnp.sum(x)}


def _sgd_args():
    params = {"w1": jnp.linspace(-1, 1, 16 * 64).reshape(16, 64),
              "w2": jnp.linspace(-1, 1, 64 * 4).reshape(64, 4)}
    return params, jnp.linspace(-2, 2, 32 * 16).reshape(32, 16)


def test_eval_shape_gives_the_outputs_as_the_step_returns_them(monkeypatch):
    """``step.eval_shape`` (as ``jax.jit(f).eval_shape``) plans without running: each
    output's shape, dtype, weak type and the sharding the step returns it with (what a
    checkpoint is restored into), then the call reuses that plan."""
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    plans = count_plans(monkeypatch)
    step = autoshard.parallelize(_sgd_step, mesh=mesh)
    params, x = _sgd_args()
    structs = step.eval_shape(params, jax.ShapeDtypeStruct(x.shape, x.dtype), lr=0.5)
    want = jax.jit(_sgd_step).eval_shape(params, x, lr=0.5)
    assert jax.tree.structure(structs) == jax.tree.structure(want)
    for s, w in zip(jax.tree.leaves(structs), jax.tree.leaves(want), strict=True):
        assert (s.shape, s.dtype, s.weak_type) == (w.shape, w.dtype, w.weak_type)
    out = step(params, x, lr=0.5)
    assert len(plans) == 1
    for s, o in zip(jax.tree.leaves(structs), jax.tree.leaves(out), strict=True):
        assert s.sharding == o.sharding, (s.sharding, o.sharding)
    assert any(s.sharding.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(structs))
    # on an abstract mesh too: nothing needs devices
    abstract = autoshard.parallelize(_sgd_step, mesh=autoshard.abstract_mesh((8, 8), ("a", "b")))
    structs = abstract.eval_shape(params, jax.ShapeDtypeStruct((64, 16), jnp.float32))
    assert all(isinstance(s.sharding.mesh, jax.sharding.AbstractMesh)
               for s in jax.tree.leaves(structs))


def test_trace_gives_the_planned_program_and_lowers_to_what_runs():
    """``step.trace`` (as ``jax.jit(f).trace``): the planned program's jaxpr, its outputs
    laid out as the step returns them, and ``.lower().compile()`` runs what the step runs."""
    step = autoshard.parallelize(_sgd_step, mesh=autoshard.make_mesh((8,), ("data",)))
    params, x = _sgd_args()
    traced = step.trace(params, x, lr=0.5)
    assert isinstance(traced, jax.stages.Traced)
    assert "dot_general" in str(traced.jaxpr)
    out = step(params, x, lr=0.5)
    for info, o in zip(jax.tree.leaves(traced.out_info), jax.tree.leaves(out), strict=True):
        assert info.sharding == o.sharding
    assert_same_as_jit(traced.lower().compile()(params, x, 0.5), out)


def test_clear_cache_plans_again(monkeypatch):
    plans = count_plans(monkeypatch)
    step = autoshard.parallelize(_sgd_step, mesh=autoshard.make_mesh((8,), ("data",)))
    params, x = _sgd_args()
    first = step(params, x)
    step(params, x)
    step.clear_cache()
    assert_same_as_jit(step(params, x), first)
    assert len(plans) == 2


# ------------------------------------------------------------------ seeded fuzz against jax.jit
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.int32, jnp.uint8, jnp.bool_)
_SHAPES = ((), (8,), (16,), (8, 4), (2, 8))
_ROLES = ("array", "array", "scalar", "tree", "static", "donated")
_PARAMS = ("a", "b", "c", "d", "e")
_TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2,
              jnp.dtype(jnp.float16): 2e-3}


def _random_array(rng: np.random.Generator, dtype, shape):
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bool_:
        return jnp.asarray(rng.random(shape) < 0.5)
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return jnp.asarray(rng.integers(max(info.min, -100), min(info.max, 100), shape), dtype)
    return jnp.asarray(rng.normal(size=shape), dtype)


def _leaf_op(x, s, k: int, act):
    """A few dtype-respecting ops on one array leaf, with the traced scalar ``s`` (often a
    weakly typed Python number) and static values ``k`` and ``act``."""
    if x.dtype == jnp.bool_:
        return [jnp.logical_not(x), x & (s > 0), x.sum(dtype=jnp.int32) if x.ndim else x][k % 3]
    if jnp.issubdtype(x.dtype, jnp.integer):
        return [x * s + 3, x * k, jnp.abs(x).sum(axis=-1) if x.ndim else x - s][k % 3]
    return [act(x) * s + 1.0, x * k - s, x.sum(axis=0) * s if x.ndim else act(x)][k % 3]


def _fuzz_case(seed: int):
    """A random small function over five parameters a..e, its arguments (some passed by
    keyword), and its static / donated settings given by number or by name."""
    r = random.Random(seed)
    rng = np.random.default_rng(seed)
    roles = [r.choice(_ROLES) for _ in _PARAMS]
    values, statics, donated = {}, [], []
    for name, role in zip(_PARAMS, roles):
        if role == "scalar":
            values[name] = r.choice([3, -2, 0.5, 1.5, True, 7])
        elif role == "tree":
            values[name] = {"w": _random_array(rng, r.choice(_DTYPES), r.choice(_SHAPES)),
                            "none": None,
                            "pair": (_random_array(rng, r.choice(_DTYPES), r.choice(_SHAPES)),
                                     r.choice([2, 0.25]))}
        elif role == "static":
            values[name] = r.choice([2, 3, jnp.tanh, jax.nn.relu, "sin"])
            statics.append(name)
        else:
            values[name] = _random_array(rng, r.choice(_DTYPES), r.choice(_SHAPES))
            if role == "donated":
                donated.append(name)
    with_const = r.random() < 0.3

    def fn(a, b, c, d, e):
        given = dict(zip(_PARAMS, (a, b, c, d, e)))
        k = next((v for n, v in given.items() if n in statics and isinstance(v, int)), 1)
        act = next((v for n, v in given.items() if n in statics and callable(v)), jnp.sin)
        scalars = [v for n, v in given.items() if roles[_PARAMS.index(n)] == "scalar"]
        s = scalars[0] if scalars else 2
        out = {}
        for name, value in given.items():
            if name in statics:
                continue
            leaves = jax.tree_util.tree_leaves(value)
            out[name] = [_leaf_op(jnp.asarray(x), s, k + i, act) if hasattr(x, "dtype")
                         else x * s for i, x in enumerate(leaves)]
        return out, None, (7 if with_const else s)

    positional = r.randint(1, len(_PARAMS))
    args = tuple(values[n] for n in _PARAMS[:positional])
    kwargs = {n: values[n] for n in r.sample(_PARAMS[positional:], len(_PARAMS) - positional)}
    by_name = r.random() < 0.5
    static = dict(static_argnames=tuple(statics)) if by_name else \
        dict(static_argnums=tuple(_PARAMS.index(n) for n in statics))
    donate = dict(donate_argnames=tuple(donated)) if not by_name else \
        dict(donate_argnums=tuple(_PARAMS.index(n) for n in donated))
    static, donate = ({k: v for k, v in d.items() if v} for d in (static, donate))
    return fn, args, kwargs, static, donate, f"roles={roles}, positional={positional}"


def _assert_close_to_jit(got, want, what: str):
    got_leaves, got_tree = jax.tree_util.tree_flatten(got)
    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    assert got_tree == want_tree, what
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype), what
        assert bool(getattr(g, "weak_type", False)) == bool(getattr(w, "weak_type", False)), what
        tolerance = _TOLERANCE.get(jnp.dtype(w.dtype))
        if tolerance is None:   # integers and bools: exact (a sharded sum wraps alike)
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=what)
        else:
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                       rtol=tolerance, atol=tolerance, err_msg=what)


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
@pytest.mark.parametrize("seed", range(40))
def test_random_functions_match_jax_jit(mesh8, seed):
    fn, args, kwargs, static, donate, what = _fuzz_case(seed)
    want = jax.jit(fn, **static)(*args, **kwargs)
    step = autoshard.parallelize(fn, mesh=mesh8, method=autoshard.ShardParallel(time_limit_s=2),
                                 **static, **donate)
    fresh = jax.tree.map(lambda x: jnp.array(x) if isinstance(x, jax.Array) else x,
                         (args, kwargs))
    got = step(*fresh[0], **fresh[1])
    _assert_close_to_jit(got, want, f"seed {seed}: {what}, {static}, {donate}")


def test_keyword_arguments_reach_a_pipeline(mesh8):
    """PipeshardParallel: the batch passed by keyword is split into micro-batches, and a
    keyword learning rate stays a weak scalar."""
    def loss(params, x):
        return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"]) ** 2)

    def step(params, batch, lr=0.1):
        value, grads = autoshard.value_and_grad(loss)(params, batch)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), value

    params = {"w1": jnp.full((16, 32), 0.1), "w2": jnp.full((32, 8), 0.1)}
    batch = jnp.arange(256.0).reshape(16, 16) / 256
    method = autoshard.PipeshardParallel(num_microbatches=2, num_stages=2, num_layers=2)
    fn = autoshard.parallelize(step, mesh=mesh8, method=method, batch_argnums=1)
    for args, kwargs in [((params,), dict(batch=batch)), ((params, batch), dict(lr=0.5))]:
        got, want = fn(*args, **kwargs), jax.jit(step)(*args, **kwargs)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert len(fn.plan(params, batch=batch).stages) == 2
