"""The user's own ``with_sharding_constraint`` inside a step: planned as written, run as planned."""
from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.intra.user_constraints import required_layout
from autoshard.ir.trace import trace
from tests.trees import ADAM_ATOL, assert_trees_allclose
from tests.user_steps import users_mlp_step

MESH = ((2, 4), ("data", "model"))


def _step_with_constraint(mesh, spec, *, bare=False):
    """An MLP step (integer labels, optax adam) whose hidden activations the user
    constrains to ``spec`` (a bare PartitionSpec under ``jax.set_mesh`` when ``bare``).
    Adam's learning rate is the 1e-3 ``ADAM_ATOL`` is set for: at 1e-2 one parameter of
    16384 whose gradient is ~0 differed from ``jax.jit``'s by 1.5e-4 on one machine."""
    sharding = spec if bare else NamedSharding(mesh, spec)
    return users_mlp_step(optax.adam(1e-3), lambda h: jax.lax.with_sharding_constraint(
        jax.nn.relu(h), sharding))


def _constrained_values(step, args) -> set[int]:
    """The values the constraint lays out: the activations and, in the backward pass,
    their gradient (jax transposes the constraint into one on the cotangent)."""
    found = {e.outputs[0] for e in trace(step, args).program.eqns
             if e.primitive.name == "sharding_constraint"}
    assert len(found) == 2
    return found


@pytest.mark.parametrize("spec", [P("data", "model"), P(None, "model"), P("model"),
                                  P(("data", "model"))], ids=str)  # as the plan writes them
def test_the_search_keeps_the_users_constraint_and_runs_what_it_priced(spec):
    """Before: the constraint was planned as a free identity and replayed as written, so
    XLA resharded around it unpriced (the audit found 2-4 differences, one an involuntary
    full rematerialization), and the gradient's ``reshard`` of the loss seed warned."""
    mesh = autoshard.make_mesh(*MESH)
    step, args = _step_with_constraint(mesh, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: every primitive here has a rule
        f = autoshard.parallelize(step, mesh=mesh, batch_argnums=(2, 3))
        plan = f.plan(*args)
    made = {P(*s) for vid, s in plan.value_specs if vid in _constrained_values(step, args)}
    assert made == {spec}, made
    report = f.audit(*args)
    assert report.ok, report.summary()
    assert_trees_allclose(f(*args), jax.jit(step)(*args), atol=ADAM_ATOL)


def test_unconstrained_dims_stay_free_and_a_bare_spec_under_set_mesh_is_kept():
    mesh = autoshard.make_mesh(*MESH)
    step, args = _step_with_constraint(mesh, P(P.UNCONSTRAINED, "model"), bare=True)
    with jax.set_mesh(mesh):
        f = autoshard.parallelize(step, mesh=mesh, batch_argnums=(2, 3))
        plan = f.plan(*args)
        report = f.audit(*args)
        out, expected = f(*args), jax.jit(step)(*args)
        constrained = _constrained_values(step, args)
    made = [s for vid, s in plan.value_specs if vid in constrained]
    assert made and all(P(*s)[1] == "model" for s in made), made
    assert report.ok, report.summary()
    assert_trees_allclose(out, expected, atol=ADAM_ATOL)


def test_a_constraint_no_layout_meets_is_named_in_a_warning_at_the_users_line():
    mesh = autoshard.make_mesh(*MESH)
    step, args = _step_with_constraint(mesh, P(None, ("model", "data")))  # not mesh order
    f = autoshard.parallelize(step, mesh=mesh, batch_argnums=(2, 3))
    with pytest.warns(UserWarning, match=r"sharding constraint P\(None, \('model', 'data'\)\) "
                      r"at .*test_user_constraints.py") as caught:
        f.plan(*args)
    assert caught[0].filename == __file__
    assert_trees_allclose(f(*args), jax.jit(step)(*args), atol=ADAM_ATOL)


def test_required_layout_reads_the_constraint_by_the_plans_axis_names():
    mesh = autoshard.make_mesh(*MESH)
    names, shape = MESH[1], MESH[0]

    def params(spec, on=mesh, **more):
        return {"sharding": NamedSharding(on, spec), "unconstrained_dims": frozenset(), **more}

    assert required_layout(params(P("data")), 2, names, shape) == ((0,), ())
    assert required_layout(params(P(None, ("data", "model"))), 2, names, shape) == ((), (0, 1))
    assert required_layout(params(P("model", "data"), unconstrained_dims={1}), 2, names,
                           shape) == ((1,), None)
    other = autoshard.make_mesh((2, 4), ("x", "y"))
    assert required_layout(params(P("x"), on=other), 2, names, shape) is None
    # a pipeline stage's sub-mesh: the same names, and an axis of size 1 splits nothing
    assert required_layout(params(P("data", "model")), 2, names, (1, 4)) == ((), (1,))
    # jax's gradient seeds a loss under a constraint with a reshard on Auto axes: no layout
    auto = {"dst_sharding": NamedSharding(mesh.abstract_mesh, P()), "concrete_mesh": None}
    assert required_layout(auto, 0, names, shape) is None


def test_a_flax_logical_constraint_under_its_rules_is_kept():
    """MaxText's idiom: ``nn.with_logical_constraint`` on activations, logical axis rules
    and the mesh in context while the step is called."""
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.with_logical_constraint(jax.nn.relu(nn.Dense(256)(x)), ("batch", "mlp"))
            return nn.Dense(16)(h)

    model, optimizer = MLP(), optax.adam(1e-2)
    x = jax.random.normal(jax.random.key(1), (32, 64))
    labels = jnp.arange(32) % 16
    params = model.init(jax.random.key(0), x)

    def step(params, opt_state, x, labels):
        def loss(ps):
            logits = model.apply(ps, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    args = (params, optimizer.init(params), x, labels)
    mesh = autoshard.make_mesh(*MESH)
    rules = (("batch", "data"), ("mlp", "model"), ("embed", None))
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
        f = autoshard.parallelize(step, mesh=mesh, batch_argnums=(2, 3))
        plan, report = f.plan(*args), f.audit(*args)
        out, expected = f(*args), jax.jit(step)(*args)
        constrained = _constrained_values(step, args)
    assert {P(*s) for vid, s in plan.value_specs if vid in constrained} == \
        {P("data", "model")}
    assert report.ok, report.summary()
    assert_trees_allclose(out, expected, atol=ADAM_ATOL)


@pytest.mark.parametrize("bare", [False, True], ids=["NamedSharding", "set_mesh"])
def test_a_pipeline_runs_the_constraints_on_each_stages_sub_mesh(bare):
    """Stages run on sub-meshes of the step's mesh: the constraint (written for the whole
    mesh) constrains the same axes there. Before: jax refused the stage programs
    (incompatible devices), and any pipelined step called under ``jax.set_mesh`` too."""
    mesh = autoshard.make_mesh(*MESH)
    spec = P(None, "model")
    keys = jax.random.split(jax.random.key(0), 5)
    params = [jax.random.normal(k, (32, 32)) * 0.2 for k in keys[:4]]
    x = jax.random.normal(keys[4], (16, 32))

    def step(params, x):
        def loss(ps):
            h = x
            for w in ps:
                h = jax.lax.with_sharding_constraint(
                    jnp.tanh(h @ w), spec if bare else NamedSharding(mesh, spec))
            return (h ** 2).mean()
        value, grads = jax.value_and_grad(loss)(params)
        return [w - 0.1 * g for w, g in zip(params, grads)], value

    method = autoshard.PipeshardParallel(num_microbatches=2, num_stages=2)
    with jax.set_mesh(mesh) if bare else contextlib.nullcontext():
        out = autoshard.parallelize(step, mesh=mesh, method=method)(params, x)
        expected = jax.jit(step)(params, x)
    assert_trees_allclose(out, expected)


@pytest.mark.parametrize("spec", [P("data", "model"), P(None, "model")], ids=str)
def test_a_device_put_on_the_mesh_inside_the_step_is_a_constraint_too(spec):
    """``jax.device_put(x, NamedSharding(mesh, spec))`` inside a jitted step lays ``x``
    out as a sharding constraint does. Before: ``device_put`` had no rule, so it warned and
    ran replicated, and XLA resharded around it unpriced."""
    mesh = autoshard.make_mesh(*MESH)
    step, args = users_mlp_step(optax.sgd(1e-2), lambda h: jax.device_put(
        jax.nn.relu(h), NamedSharding(mesh, spec)))
    # (its transpose in the backward pass puts the cotangent on no sharding: unconstrained)
    put = {e.outputs[0] for e in trace(step, args).program.eqns
           if e.primitive.name == "device_put" and e.params["devices"] != (None,)}
    assert len(put) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = autoshard.parallelize(step, mesh=mesh, batch_argnums=(2, 3))
        plan = f.plan(*args)
    made = {P(*s) for vid, s in plan.value_specs if vid in put}
    assert made == {spec}, made
    report = f.audit(*args)
    assert report.ok, report.summary()
    assert_trees_allclose(f(*args), jax.jit(step)(*args))


def test_a_step_under_a_mesh_of_explicit_axes_runs_in_the_plans_mesh():
    """The caller set a mesh of Explicit axes (``jax.set_mesh(jax.make_mesh(...))``, the
    default axis type; the user's own code may run there): the step is traced and run in
    the plan's mesh instead, its bare PartitionSpec constraint naming the plan's axes,
    planned and run as under ``jax.set_mesh`` of the plan's mesh, on the planning call and
    on jax's own dispatch after it. Before: the step's ops ran with the caller's axis types
    (the dot's operands were typed on the plan's mesh, the context on the caller's)."""
    mesh = autoshard.make_mesh(*MESH)
    step, args = _step_with_constraint(mesh, P("data", "model"), bare=True)
    with jax.set_mesh(mesh):
        expected = jax.jit(step)(*args)
        constrained = _constrained_values(step, args)
    with jax.set_mesh(jax.make_mesh(*MESH)):
        f = autoshard.parallelize(step, mesh=mesh, batch_argnums=(2, 3))
        plan = f.plan(*args)
        out = f(*args)
        out_again = f(*args)
    made = {P(*s) for vid, s in plan.value_specs if vid in constrained}
    assert made == {P("data", "model")}, made
    assert_trees_allclose(out, expected, atol=ADAM_ATOL)
    assert_trees_allclose(out_again, expected, atol=ADAM_ATOL)


def test_a_mesh_of_explicit_axes_is_planned_and_run_as_its_auto_twin():
    """``parallelize(mesh=jax.make_mesh(...))``: jax's default mesh has Explicit axes. The
    plan lays values out on the same devices and axis names with Auto axes, as
    autoshard.make_mesh makes them. Before: the runtime's constraints were refused (an
    Explicit axis in with_sharding_constraint)."""
    explicit = jax.make_mesh(*MESH)
    assert set(explicit.axis_types) == {jax.sharding.AxisType.Explicit}
    step, args = users_mlp_step(optax.adam(1e-3))
    f = autoshard.parallelize(step, mesh=explicit, batch_argnums=(2, 3))
    out = f(*args)
    assert_trees_allclose(out, jax.jit(step)(*args), atol=ADAM_ATOL)
    leaf = jax.tree.leaves(out)[0]
    assert leaf.sharding.mesh.devices.tolist() == explicit.devices.tolist()
    assert set(leaf.sharding.mesh.axis_types) == {jax.sharding.AxisType.Auto}
