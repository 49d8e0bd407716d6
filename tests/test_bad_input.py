"""Bad or unusual input: clear errors, or correct fallbacks with a warning that points at user code."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from tests.user_steps import doubled


@pytest.fixture(scope="module")
def mesh8():
    return autoshard.make_mesh((8,), ("data",))


def test_unsupported_primitive_warns_once_and_still_runs(mesh8):
    def fn(a, x):
        spd = a @ a.T + 8.0 * jnp.eye(8)
        return doubled(spd) @ x

    a = jnp.arange(64.0).reshape(8, 8) / 64
    x = jnp.ones((8, 16))
    step = autoshard.parallelize(fn, mesh=mesh8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = step(a, x)
    messages = [w for w in caught if "'user_op'" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert "replicated" in str(messages[0].message)
    assert messages[0].filename == __file__   # stacklevel points at the caller
    # and the message names the line calling doubled (which makes the primitive
    # inside that function's own jit, where no frame is the user's: it named none before)
    line = fn.__code__.co_firstlineno + 2
    assert f"first at {__file__}:{line}:" in str(messages[0].message), messages[0].message
    np.testing.assert_allclose(out, jax.jit(fn)(a, x), rtol=1e-5, atol=1e-5)


def test_control_flow_that_splits_nowhere_runs_replicated_with_a_warning(mesh8):
    def fn(w, x):  # a while loop (a lax.scan would be unrolled: tests/test_scan.py)
        def body(state):
            i, h = state
            return i + 1, jnp.tanh(h @ w)
        return jax.lax.while_loop(lambda s: s[0] < 3, body, (0, x))[1].sum()

    # no dim the 8 devices divide: no split of the loop (tests/test_control_flow.py)
    w, x = jnp.eye(7) * 0.5, jnp.ones((5, 7))
    with pytest.warns(UserWarning, match="control flow primitive 'while'"):
        out = autoshard.parallelize(fn, mesh=mesh8)(w, x)
    np.testing.assert_allclose(out, jax.jit(fn)(w, x), rtol=1e-5)


def test_mesh_larger_than_devices_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs 64 devices but 8 are available.*abstract_mesh"):
        autoshard.make_mesh((8, 8), ("data", "model"))


def test_abstract_mesh_plans_but_does_not_run():
    mesh = autoshard.abstract_mesh((8, 8), ("data", "model"))
    step = autoshard.parallelize(lambda w, x: jnp.tanh(x @ w), mesh=mesh)
    w = jax.ShapeDtypeStruct((512, 512), jnp.float32)
    x = jax.ShapeDtypeStruct((64, 512), jnp.float32)
    plan = step.plan(w, x)
    assert plan.mesh_shape == (8, 8)
    with pytest.raises(ValueError, match="abstract mesh"):
        step(jnp.ones((512, 512)), jnp.ones((64, 512)))


def test_dims_no_axis_divides_fall_back_to_replication(mesh8):
    def fn(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2, axis=0)

    w, x = jnp.ones((7, 5)) * 0.1, jnp.ones((3, 7))
    step = autoshard.parallelize(fn, mesh=mesh8)
    plan = step.plan(w, x)
    assert plan.in_specs == (P(), P())
    np.testing.assert_allclose(step(w, x), jax.jit(fn)(w, x), rtol=1e-6)


def test_non_array_leaves_name_their_path(mesh8):
    def fn(params, x):
        return x * 2

    step = autoshard.parallelize(fn, mesh=mesh8)
    with pytest.raises(TypeError, match=r"(?s)args\[0\]\[.name.\]: str.*static_argnums"):
        step({"name": "relu", "w": jnp.ones(8)}, jnp.ones(8))


def test_errors_while_tracing_name_the_users_function_and_arguments(mesh8):
    """As under jax.jit: a traced bool names the argument it depends on by its path, and a
    non-array output the user's function and line, not autoshard's flat wrapper."""
    def step(params, x, scale=1.0):
        if params["w"].sum() > 0:   # Python control flow on a traced value
            return x
        return x * scale

    def returns_text(x):
        return x, "done"

    params = {"w": jnp.ones(8)}
    with pytest.raises(jax.errors.TracerBoolConversionError,
                       match=r"(?s)function step at .*test_bad_input.py:\d+.*argument params\['w'\]"):
        autoshard.parallelize(step, mesh=mesh8)(params, jnp.ones(8), scale=2.0)
    with pytest.raises(TypeError, match=r"function returns_text at .*test_bad_input.py:\d+ "
                                        r"traced for parallelize returned a value of type"):
        autoshard.parallelize(returns_text, mesh=mesh8)(jnp.ones(8))


def test_static_argnums_take_python_values(mesh8):
    def fn(activation, x):
        return jnp.tanh(x) if activation == "tanh" else jax.nn.relu(x)

    step = autoshard.parallelize(fn, mesh=mesh8, static_argnums=0)
    x = jnp.linspace(-1, 1, 64).reshape(8, 8)
    np.testing.assert_allclose(step("tanh", x), jnp.tanh(x), rtol=1e-6)
    np.testing.assert_allclose(step("relu", x), jax.nn.relu(x), rtol=1e-6)
    assert step.plan("tanh", x).in_specs[0] is None


def test_unhashable_static_argument_is_a_clear_error(mesh8):
    step = autoshard.parallelize(lambda cfg, x: x, mesh=mesh8, static_argnums=0)
    with pytest.raises(TypeError, match="static argument 0 must be hashable"):
        step({"a": 1}, jnp.ones(8))


def test_bad_method_is_a_clear_error(mesh8):
    with pytest.raises(TypeError, match="method must be one of"):
        autoshard.parallelize(lambda x: x, mesh=mesh8, method="ilp")


def test_python_scalars_are_accepted(mesh8):
    def fn(x, scale):
        return x * scale

    step = autoshard.parallelize(fn, mesh=mesh8, batch_argnums=0)
    np.testing.assert_allclose(step(jnp.ones((8, 4)), 3.0), 3.0 * np.ones((8, 4)))


def test_memory_budget_is_checked_and_bad_strings_rejected(mesh8):
    def fn(w, x):
        return jnp.tanh(x @ w)

    w, x = jnp.ones((256, 256)), jnp.ones((64, 256))
    fits = autoshard.parallelize(fn, mesh=mesh8, memory_budget="1GiB")
    np.testing.assert_allclose(fits(w, x), jax.jit(fn)(w, x), rtol=1e-6)
    tight = autoshard.parallelize(fn, mesh=mesh8, memory_budget=1024)
    with pytest.raises(autoshard.InfeasiblePlanError,
                       match=r"memory_budget=1.00 KiB per device cannot be met.*smallest peak"):
        tight.plan(w, x)
    with pytest.raises(ValueError, match="sixteen gigs.*16GiB"):
        autoshard.parallelize(fn, mesh=mesh8, memory_budget="sixteen gigs")


def test_a_budget_no_plan_meets_names_the_arguments_to_donate(mesh8):
    """An optimizer step returning its parameters and state updated, not donated, holds
    both copies: the smallest peak is then far above the donated step's, and the error
    says which arguments to donate."""
    def step(params, state, x):
        grads = jax.grad(lambda p: jnp.tanh(x @ p["w"]).mean())(params)
        state = jax.tree.map(lambda m, g: 0.9 * m + g, state, grads)
        return jax.tree.map(lambda p, m: p - 0.1 * m, params, state), state

    params = {"w": jnp.ones((512, 512))}
    state = {"w": jnp.zeros((512, 512))}
    args = (params, state, jnp.ones((64, 512)))
    kept = autoshard.parallelize(step, mesh=mesh8, memory_budget=1024)
    with pytest.raises(autoshard.InfeasiblePlanError,
                       match=r"cannot be met.*args\[0\]\['w'\], args\[1\]\['w'\] are returned "
                             r"updated but not donated.*donate_argnums=\(0, 1\)"):
        kept.plan(*args)
    donated = autoshard.parallelize(step, mesh=mesh8, memory_budget=1024, donate_argnums=(0, 1))
    with pytest.raises(autoshard.InfeasiblePlanError) as err:
        donated.plan(*args)
    assert "not donated" not in str(err.value)
    # the state passed by keyword: named by its keyword, to donate by name
    with pytest.raises(autoshard.InfeasiblePlanError,
                       match=r"donate_argnums=\(0,\), donate_argnames=\('state',\)"):
        kept.plan(params, state=state, x=args[2])


_USER_STEP = '''
import autoshard
from tests.user_steps import doubled


def run(mesh, a, x):
    def fn(a, x):
        return doubled(a @ a.T) @ x
    return autoshard.parallelize(fn, mesh=mesh)(a, x)
'''


@pytest.mark.parametrize("folders", [("autoshard", "jax"), (".venv", "lib", "site-packages",
                                                             "userpkg")])
def test_warnings_point_at_user_code_wherever_it_lives(mesh8, tmp_path, folders):
    """A user's file inside folders named like autoshard's or jax's, or inside a virtual
    environment in the project, is user code: the warning points at it."""
    import importlib.util
    folder = tmp_path.joinpath(*folders)
    folder.mkdir(parents=True)
    path = folder / "user_step.py"
    path.write_text(_USER_STEP)
    spec = importlib.util.spec_from_file_location("user_step_" + folders[0].strip("."), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.run(mesh8, jnp.eye(8), jnp.ones((8, 4)))
    messages = [w for w in caught if "'user_op'" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert messages[0].filename == str(path)


def test_debug_prints_and_callbacks_run_without_a_warning(mesh8, capfd):
    """``jax.debug.print`` / ``jax.debug.callback`` in a loss: they see the whole value,
    as under ``jax.jit``, and are not "unsupported" (``debug_print`` warned before)."""
    seen = []

    def step(w, x):
        def loss(w):
            value = (jnp.tanh(x @ w) ** 2).mean()
            jax.debug.print("loss {v:.6f}", v=value)
            jax.debug.callback(lambda v: seen.append(float(v)), value)
            return value
        return w - 0.1 * jax.grad(loss)(w)

    w, x = jnp.eye(16) * 0.5, jnp.linspace(-1, 1, 8 * 16).reshape(8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = autoshard.parallelize(step, mesh=mesh8)(w, x)
        jax.effects_barrier()
    expected = float((jnp.tanh(x @ w) ** 2).mean())
    assert f"loss {expected:.6f}" in capfd.readouterr().out
    assert seen and all(v == pytest.approx(expected, rel=1e-6) for v in seen), seen
    np.testing.assert_allclose(out, jax.jit(step)(w, x), rtol=1e-5, atol=1e-6)
