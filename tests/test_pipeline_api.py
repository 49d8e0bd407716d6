"""PipeshardParallel with what a jax.jit user expects: has_aux, donation, lower(), saved plans."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autoshard
from tests.trees import assert_trees_allclose

OPT = optax.adam(1e-2)
PIPE = dict(num_microbatches=4, num_stages=2, num_layers=2,
            stage_method=autoshard.DataParallel())


def _classifier(widths=(16, 16, 16, 4), batch=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(widths) + 1)
    params = [{"w": jax.random.normal(k, (a, b)) / a ** 0.5, "b": jnp.zeros((b,))}
              for k, a, b in zip(keys, widths[:-1], widths[1:])]
    data = {"x": jax.random.normal(keys[-2], (batch, widths[0])),
            "label": jax.random.randint(keys[-1], (batch,), 0, widths[-1])}
    return params, OPT.init(params), data


def _forward(params, batch):
    x = batch["x"]
    hidden = []
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = jnp.tanh(x)
            hidden.append(x)
    logits = jax.nn.log_softmax(x)
    loss = -jnp.mean(jnp.take_along_axis(logits, batch["label"][:, None], axis=1))
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    # metrics that are means over the batch, one made in the first layer, and one that does
    # not depend on the batch
    aux = {"accuracy": accuracy, "first_activation": jnp.mean(hidden[0] ** 2),
           "mean_logit": jnp.mean(logits, axis=0),
           "weight_norm": jnp.sum(params[0]["w"] ** 2)}
    return loss, aux


def step_value_and_grad(params, opt_state, batch):
    (loss, aux), grads = autoshard.value_and_grad(_forward, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


def step_grad(params, opt_state, batch):
    grads, aux = autoshard.grad(_forward, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux["accuracy"] * 2.0


def _pipelined(fn, **kw):
    method = autoshard.PipeshardParallel(**{**PIPE, **kw})
    return autoshard.parallelize(fn, mesh=autoshard.make_mesh((4,), ("data",)), method=method)


@pytest.mark.parametrize("fn", [step_value_and_grad, step_grad])
def test_has_aux_matches_jit(fn):
    args = _classifier()
    step = _pipelined(fn)
    assert_trees_allclose(step(*args), jax.jit(fn)(*args))
    assert len(step.plan(*args).stages) == 2


def test_has_aux_integer_leaf_is_refused_with_microbatches():
    def fn(params, opt_state, batch):
        def loss(p, b):
            value, _ = _forward(p, b)
            return value, jnp.sum(b["label"])    # a count: not a mean over the batch
        (value, count), grads = autoshard.value_and_grad(loss, has_aux=True)(params, batch)
        return grads, count

    args = _classifier()
    with pytest.raises(ValueError, match="aux leaf 0 has dtype int32.*float mean"):
        _pipelined(fn).plan(*args)
    # one micro-batch: aux is computed on the whole batch, exactly as jax does
    assert_trees_allclose(_pipelined(fn, num_microbatches=1)(*args), jax.jit(fn)(*args))


def test_donated_params_and_optimizer_state():
    args = _classifier()
    expected = jax.jit(step_value_and_grad)(*args)
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731
    step = autoshard.parallelize(step_value_and_grad, mesh=autoshard.make_mesh((4,), ("data",)),
                                 method=autoshard.PipeshardParallel(**PIPE),
                                 donate_argnums=(0, 1))
    params, opt_state, batch = copy(args)
    out = step(params, opt_state, batch)
    assert_trees_allclose(out, expected)
    assert all(x.is_deleted() for x in jax.tree.leaves((params, opt_state)))
    assert not any(x.is_deleted() for x in jax.tree.leaves(batch))
    # a training loop feeds the outputs back in
    again = step(out[0], out[1], batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(out[:2]))
    assert_trees_allclose(again, jax.jit(step_value_and_grad)(*expected[:2], args[2]))


def test_lower_gives_every_program_of_the_pipeline():
    args = _classifier()
    step = autoshard.parallelize(step_value_and_grad, mesh=autoshard.make_mesh((4,), ("data",)),
                                 method=autoshard.PipeshardParallel(**PIPE),
                                 donate_argnums=(0, 1))
    lowered = step.lower(*args)
    assert isinstance(lowered, autoshard.runtime.PipelineLowered)
    assert lowered.names == ("stage 0 forward", "stage 0 backward", "stage 1 forward",
                             "stage 1 backward", "apply on stage 0", "apply on stage 1")
    assert lowered.runs_per_step["stage 1 backward"] == 4
    assert lowered.runs_per_step["apply on stage 0"] == 1
    assert "// ----- stage 0 forward (runs 4x per step)" in lowered.as_text()
    # the updates reuse the donated parameters' buffers
    assert "tf.aliasing_output" in lowered["apply on stage 1"].as_text()
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    assert set(memory) == set(lowered.names)
    assert all(m.argument_size_in_bytes > 0 for m in memory.values())
    flops = compiled.cost_analysis()
    assert flops["stage 0 backward"]["flops"] > flops["stage 0 forward"]["flops"] > 0
    assert "HloModule" in compiled["stage 1 forward"].as_text()
    with pytest.raises(KeyError, match="the pipeline's programs are"):
        lowered["stage 2 forward"]
    # lowering touches nothing: the arguments are still there, and the step still runs
    assert_trees_allclose(step(*jax.tree.map(jnp.array, args)),
                          jax.jit(step_value_and_grad)(*args))


def test_eval_shape_and_trace_of_a_pipeline():
    """A pipeline's outputs are on its stages' sub-meshes: ``eval_shape`` gives their
    shapes and dtypes (as ``jax.eval_shape``); it runs several programs, so ``trace`` is a
    clear error that points at ``lower``."""
    args = _classifier()
    step = _pipelined(step_value_and_grad)
    structs = step.eval_shape(*args)
    want = jax.eval_shape(step_value_and_grad, *args)
    assert jax.tree.structure(structs) == jax.tree.structure(want)
    for s, w in zip(jax.tree.leaves(structs), jax.tree.leaves(want), strict=True):
        assert (s.shape, s.dtype, s.sharding) == (w.shape, w.dtype, None)
    with pytest.raises(TypeError, match="no single trace: use .lower"):
        step.trace(*args)


def _no_solving(monkeypatch):
    import autoshard.api as api
    import autoshard.pipeline.apply as apply
    import autoshard.pipeline.planner as planner

    def fail(*a, **k):
        raise AssertionError("a saved plan must not be planned or solved again")
    for module, name in [(api, "plan_traced"), (apply, "plan_traced"), (planner, "plan_traced"),
                         (planner.ilp, "solve_stages")]:
        monkeypatch.setattr(module, name, fail)


def test_saved_pipeline_plan_runs_without_solving(monkeypatch):
    args = _classifier()
    mesh = autoshard.make_mesh((4,), ("data",))
    method = autoshard.PipeshardParallel(**PIPE)
    planned = autoshard.parallelize(step_value_and_grad, mesh=mesh, method=method)
    saved = autoshard.Plan.from_json(planned.plan(*args).to_json())
    assert [p.name for p in saved.programs] == ["stage 0", "stage 1", "apply on stage 0",
                                                "apply on stage 1"]
    _no_solving(monkeypatch)
    step = autoshard.parallelize(step_value_and_grad, mesh=mesh, plan=saved,
                                 donate_argnums=(0, 1))
    assert step.plan(*args) is saved
    assert_trees_allclose(step(*jax.tree.map(jnp.array, args)),
                          jax.jit(step_value_and_grad)(*args))
    # the same method may be named again; another one is refused
    autoshard.parallelize(step_value_and_grad, mesh=mesh, plan=saved, method=method)
    with pytest.raises(ValueError, match="method mismatch"):
        autoshard.parallelize(step_value_and_grad, mesh=mesh, plan=saved,
                              method=autoshard.PipeshardParallel(**{**PIPE,
                                                                    "num_microbatches": 2}))
    with pytest.raises(ValueError, match="mesh shape mismatch"):
        autoshard.parallelize(step_value_and_grad, plan=saved,
                              mesh=autoshard.make_mesh((2, 2), ("data", "model")))
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        autoshard.parallelize(step_grad, mesh=mesh, plan=saved).plan(*args)
    other_devices = jax.sharding.Mesh(np.array(jax.devices()[4:8]), ("data",),
                                      axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match=r"no device\(s\) \[0, 1\].*another mesh"):
        autoshard.parallelize(step_value_and_grad, mesh=other_devices, plan=saved).plan(*args)


def test_batch_size_written_into_the_step_is_named_for_micro_batches():
    params, opt_state, data = _classifier()

    def step(params, opt_state, batch):
        def loss_fn(params, batch):
            x = batch["x"].reshape(16, -1)   # the full batch size, written in
            return jnp.mean((x @ params[0]["w"]) ** 2)
        loss, grads = autoshard.value_and_grad(loss_fn)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss

    jax.jit(step)(params, opt_state, data)   # fine with the whole batch
    f = autoshard.parallelize(step, mesh=autoshard.make_mesh((8,), ("data",)),
                              method=autoshard.PipeshardParallel(**PIPE))
    message = (r"(?s)fails on one micro-batch \(num_microbatches=4: batch argument "
               r"args\[2\]\['label'\] goes from \(16,\) to \(4,\)\).*x.reshape\(x.shape\[0\]")
    with pytest.raises(ValueError, match=message):
        f.plan(params, opt_state, data)
