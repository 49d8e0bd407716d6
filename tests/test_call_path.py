"""Calling a parallelized step in a loop: after the first call, jax's own dispatch checks the
arguments and runs the program (as under jax.jit), and any call it was not made for (another
signature, a static value, arrays committed elsewhere) still gives jax.jit's numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autoshard
from autoshard.api import ParallelizedFunction
from tests.trees import assert_trees_allclose

CASES = [((8,), ("data",), autoshard.ShardParallel()),
         ((2, 4), ("data", "model"), autoshard.Megatron())]
IDS = ["8-ShardParallel", "2x4-Megatron"]
OPTIMIZER = optax.adam(1e-2)


def loss_fn(params, batch, scale):
    hidden = jax.nn.relu(batch["x"] @ params["w1"])
    return scale * jnp.mean((hidden @ params["w2"] - batch["y"]) ** 2)


def train_step(params, opt_state, batch, *, lr_scale, scale=1.0):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch, scale))(params)  # closes over the batch
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: lr_scale * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss


def init(batch_size=32):
    keys = jax.random.split(jax.random.key(0), 2)
    params = {"w1": jax.random.normal(keys[0], (16, 64)) * 0.1,
              "w2": jax.random.normal(keys[1], (64, 8)) * 0.1}
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(batch_size, 16)).astype(np.float32),
                "y": rng.normal(size=(batch_size, 8)).astype(np.float32)} for _ in range(4)]
    return params, OPTIMIZER.init(params), batches


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


@pytest.mark.parametrize("shape, names, method", CASES, ids=IDS)
def test_a_training_loop_runs_without_planning_again(monkeypatch, shape, names, method):
    """Host batches each step, donated state, a static keyword: from the second step on
    autoshard's own signature code never runs, and every step matches jax.jit's."""
    params, opt_state, batches = init()
    step = autoshard.parallelize(train_step, mesh=autoshard.make_mesh(shape, names),
                                 method=method, donate_argnums=(0, 1),
                                 static_argnames=("lr_scale",))
    reference = jax.jit(train_step, static_argnames=("lr_scale",))
    ref_params, ref_state = copy(params), copy(opt_state)
    for i, batch in enumerate(batches):
        if i == 1:  # the first call planned and compiled; from here jax dispatches alone
            def planned_again(*args, **kwargs):
                raise AssertionError("a steady-state call took autoshard's full call path")
            monkeypatch.setattr(ParallelizedFunction, "_signature", planned_again)
        old = params
        params, opt_state, loss = step(params, opt_state, batch, lr_scale=0.5)
        ref_params, ref_state, ref_loss = reference(ref_params, ref_state, batch, lr_scale=0.5)
        assert_trees_allclose((params, opt_state, loss), (ref_params, ref_state, ref_loss))
        if i:  # donated (the first step donates the copies it moved onto the mesh)
            assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))


@pytest.mark.parametrize("shape, names, method", CASES, ids=IDS)
def test_calls_the_program_was_not_made_for_match_jit(shape, names, method):
    params, opt_state, batches = init()
    mesh = autoshard.make_mesh(shape, names)
    step = autoshard.parallelize(train_step, mesh=mesh, method=method,
                                 static_argnames=("lr_scale",))
    reference = jax.jit(train_step, static_argnames=("lr_scale",))
    state = ref = (params, opt_state)
    half = {k: v[:16] for k, v in batches[1].items()}
    calls = [((batches[0],), dict(lr_scale=0.5)),
             ((batches[1],), dict(lr_scale=0.5)),   # as made for
             ((batches[2],), dict(lr_scale=0.25)),  # another static value
             ((half,), dict(lr_scale=0.25)),        # another batch shape
             ((batches[3],), dict(lr_scale=0.25, scale=2.0)),  # one more keyword
             ((batches[0],), dict(lr_scale=0.5)),   # the first signature again
             ]
    for i, (args, kwargs) in enumerate(calls):
        if i == 4:  # state committed to one device: moved onto the mesh, as on a first call
            state = jax.device_put(state, jax.devices()[1])
        *state, loss = step(*state, *args, **kwargs)
        *ref, ref_loss = reference(*ref, *args, **kwargs)
        assert_trees_allclose((state, loss), (ref, ref_loss))


def test_alternating_signatures_match_jit():
    """Two batch shapes in turn: each a miss for the program of the call before, which costs
    a trace attempt, so after a few the last program is no longer tried first."""
    params, opt_state, _ = init()
    _, _, small = init(batch_size=16)
    _, _, large = init(batch_size=64)
    step = autoshard.parallelize(train_step, mesh=autoshard.make_mesh((8,), ("data",)),
                                 method=autoshard.DataParallel(), static_argnames=("lr_scale",))
    reference = jax.jit(train_step, static_argnames=("lr_scale",))
    state = ref = (params, opt_state)
    for i in range(12):
        batch = (small if i % 2 else large)[i % 4]
        *state, loss = step(*state, batch, lr_scale=1.0)
        *ref, ref_loss = reference(*ref, batch, lr_scale=1.0)
        assert_trees_allclose((state, loss), (ref, ref_loss))
    # every call missed the program of the one before: autoshard stopped trying it first
    assert step._fast.call is None


def test_arrays_on_a_mesh_of_explicit_axes_are_moved_to_the_plan_as_jit_moves_them():
    """jax.make_mesh's default axes are Explicit: an array laid out over them carries its
    sharding in its type. After a first call with host arrays, a call with such arrays
    (w1 split on the dim the batch's features contract with, which jax.jit itself rejects
    as ambiguous) is moved to the plan's layouts and matches jax.jit on the host values,
    in a loop too. The code before ran the program with their types and raised jax's
    ShardingTypeError from inside it."""
    params, opt_state, batches = init()
    step = autoshard.parallelize(train_step, mesh=autoshard.make_mesh((2, 4), ("data", "model")),
                                 static_argnames=("lr_scale",))
    reference = jax.jit(train_step, static_argnames=("lr_scale",))
    explicit = jax.make_mesh((8,), ("d",))
    assert explicit.axis_types == (jax.sharding.AxisType.Explicit,)
    on = lambda tree, spec: jax.device_put(  # noqa: E731
        tree, jax.sharding.NamedSharding(explicit, jax.sharding.PartitionSpec(*spec)))
    state = ref = (params, opt_state)
    *state, loss = step(*state, batches[0], lr_scale=0.5)
    *ref, ref_loss = reference(*ref, batches[0], lr_scale=0.5)
    state = (on(state[0], ("d",)), state[1])
    for batch in batches[1:]:
        *state, loss = step(*state, {"x": on(batch["x"], (None, "d")), "y": on(batch["y"], ("d",))},
                            lr_scale=0.5)
        *ref, ref_loss = reference(*ref, batch, lr_scale=0.5)
        assert_trees_allclose((state, loss), (ref, ref_loss))


def test_explicit_arrays_inside_the_callers_jit_are_a_clear_error():
    params, opt_state, batches = init()
    step = autoshard.parallelize(train_step, mesh=autoshard.make_mesh((8,), ("data",)),
                                 static_argnames=("lr_scale",))
    explicit = jax.make_mesh((8,), ("d",))
    x = jax.device_put(batches[0]["x"], jax.sharding.NamedSharding(
        explicit, jax.sharding.PartitionSpec("d")))
    with pytest.raises(TypeError, match=r"inside jax.jit .* Explicit axes: args\[2\]\['x'\] "
                                        r"\(P\('d', None\)\).*autoshard.make_mesh"):
        jax.jit(lambda x: step(params, opt_state, {"x": x, "y": batches[0]["y"]},
                               lr_scale=1.0))(x)


def test_a_step_called_under_a_mesh_of_other_devices_runs_on_its_own():
    """The caller set a mesh of other devices (half of the plan's), say for code of its own:
    the step still runs on the plan's mesh, on the planning call and on jax's own dispatch
    after it. Before: jax refused the program ("incompatible devices for jitted
    computation": its arguments lie outside the context mesh)."""
    params, opt_state, batches = init()
    step = autoshard.parallelize(train_step, mesh=autoshard.make_mesh((2, 4), ("data", "model")),
                                 static_argnames=("lr_scale",))
    reference = jax.jit(train_step, static_argnames=("lr_scale",))
    other = autoshard.make_mesh((4,), ("data",), devices=jax.devices()[4:])
    state = ref = (params, opt_state)
    for batch in batches[:3]:
        with jax.set_mesh(other):
            *state, loss = step(*state, batch, lr_scale=0.5)
        *ref, ref_loss = reference(*ref, batch, lr_scale=0.5)
        assert_trees_allclose((state, loss), (ref, ref_loss))
    assert step._fast.hits >= 1
