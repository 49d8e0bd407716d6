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


def test_aux_sums_and_extremes_combine_as_jit_computes_them():
    """An aux leaf that is a sum over the batch (an integer count), a maximum or a minimum
    is combined over the micro-batches as such, not averaged: jax.jit's value."""
    def fn(params, opt_state, batch):
        def loss(p, b):
            value, _ = _forward(p, b)
            per_row = jnp.sum(b["x"] ** 2, axis=-1)
            return value, {"labels": jnp.sum(b["label"]), "max": jnp.max(per_row),
                           "min": -jnp.max(-per_row), "total": jnp.sum(per_row) / 1000.0}
        (value, aux), grads = autoshard.value_and_grad(loss, has_aux=True)(params, batch)
        return grads, aux

    args = _classifier()
    got, want = _pipelined(fn)(*args), jax.jit(fn)(*args)
    assert got[1]["labels"].dtype == want[1]["labels"].dtype == jnp.int32
    assert_trees_allclose(got, want)


def test_per_example_aux_leaves_are_concatenated_and_only_returned():
    """Aux leaves with one value per example (per-example losses, log-probabilities) are the
    micro-batches' values concatenated, as eval_shape says; read after the gradient (at one
    micro-batch's shapes there) they are refused, naming the reader."""
    def fn(params, opt_state, batch):
        def loss(p, b):
            value, _ = _forward(p, b)
            logits = jax.nn.log_softmax(b["x"] @ p[0]["w"])
            return value, {"per_example": jnp.sum(b["x"] ** 2, -1), "log_probs": logits}
        (value, aux), grads = autoshard.value_and_grad(loss, has_aux=True)(params, batch)
        return grads, aux

    args = _classifier()
    step = _pipelined(fn)
    got, want = step(*args), jax.jit(fn)(*args)
    assert got[1]["per_example"].shape == (16,) and got[1]["log_probs"].shape == (16, 16)
    assert_trees_allclose(got, want)
    shapes = step.eval_shape(*args)[1]
    assert shapes["per_example"].shape == (16,) and shapes["log_probs"].shape == (16, 16)

    def summed_after(params, opt_state, batch):
        (value, aux), grads = fn_aux(params, batch)
        return grads, jnp.sum(aux)

    def fn_aux(params, batch):
        def loss(p, b):
            value, _ = _forward(p, b)
            return value, jnp.sum(b["x"] ** 2, -1)
        return autoshard.value_and_grad(loss, has_aux=True)(params, batch)

    with pytest.raises(ValueError, match=r"holds one value per example, which PipeshardParallel "
                                         r"concatenates from the micro-batches, and reduce_sum "
                                         r"at .*test_pipeline_api"):
        _pipelined(summed_after).plan(*args)


def test_an_aux_leaf_no_combination_recovers_is_refused():
    """One row of the batch differs per micro-batch from jax.jit's value on the whole batch:
    refused with the leaf's path (the code before averaged it over the micro-batches), and
    computed as jax does on one micro-batch. (A ratio of two sums beside it is computed
    from their totals.)"""
    def fn(params, opt_state, batch):
        def loss(p, b):
            value, _ = _forward(p, b)
            hits = (b["label"] == 0).astype(jnp.float32)
            return value, {"first_x": b["x"][0, 0],
                           "share": jnp.sum(hits * b["x"][:, 0]) / jnp.sum(hits)}
        (value, aux), grads = autoshard.value_and_grad(loss, has_aux=True)(params, batch)
        return grads, aux

    args = _classifier()
    with pytest.raises(ValueError, match=r"aux\['first_x'\] is not a mean, sum, maximum"):
        _pipelined(fn).plan(*args)
    assert_trees_allclose(_pipelined(fn, num_microbatches=1)(*args), jax.jit(fn)(*args))


def test_a_loss_summed_over_the_batch_sums_its_micro_batches():
    """A sum over the batch (not a mean) is summed over the micro-batches, its gradient with
    it: the code before averaged both (1/num_microbatches of jax.jit's gradient)."""
    def fn(params, opt_state, batch):
        def loss(p, b):
            return _forward(p, b)[0] * b["x"].shape[0]   # the sum of the per-example losses
        value, grads = autoshard.value_and_grad(loss)(params, batch)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), value

    args = _classifier()
    assert_trees_allclose(_pipelined(fn)(*args), jax.jit(fn)(*args))


def test_a_masked_mean_loss_and_metric_match_jit_with_the_update_split_by_stage():
    """The masked sum over the mask's sum is a ratio of two sums over the batch: the
    micro-batches compute both sums, the step divides their totals and scales the summed
    gradient of the masked sum by d loss / d sum (pipeline.post_reduction). A masked
    accuracy (an aux leaf) is computed so too; a count passed in as an argument gives the
    same numbers. Reading the count does not make the update one program on the mesh."""
    def masked(params, opt_state, batch):
        def loss(p, b):
            logits = jax.nn.log_softmax(p[-1]["b"] + b["x"] @ jnp.ones((16, 4)))
            nll = -jnp.take_along_axis(logits, b["label"][:, None], axis=1)[:, 0]
            keep = (b["label"] != 3).astype(jnp.float32)
            hits = (jnp.argmax(logits, -1) == b["label"]) * keep
            return jnp.sum(nll * keep) / jnp.maximum(jnp.sum(keep), 1.0), \
                {"accuracy": jnp.sum(hits) / jnp.sum(keep), "tokens": jnp.sum(keep),
                 "version": 3.0}   # (a constant leaf beside them: refused before)
        (value, aux), grads = autoshard.value_and_grad(loss, has_aux=True)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value, aux

    def counted(params, opt_state, batch, count):
        def loss(p, b):
            logits = jax.nn.log_softmax(p[-1]["b"] + b["x"] @ jnp.ones((16, 4)))
            nll = -jnp.take_along_axis(logits, b["label"][:, None], axis=1)[:, 0]
            return jnp.sum(nll * (b["label"] != 3)) / count
        value, grads = autoshard.value_and_grad(loss)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value

    args = _classifier()
    expected = jax.jit(masked)(*args)
    step = _pipelined(masked)
    assert_trees_allclose(step(*args), expected)
    names = step.lower(*args).names
    assert "apply on the mesh" not in names and "apply on stage 0" in names
    count = jnp.sum(args[2]["label"] != 3).astype(jnp.float32)
    step = autoshard.parallelize(counted, mesh=autoshard.make_mesh((4,), ("data",)),
                                 method=autoshard.PipeshardParallel(**PIPE), batch_argnums=2)
    assert_trees_allclose(step(*args, count), expected[:2])


def test_a_loss_of_two_sums_that_depend_on_the_parameters_needs_gpipe():
    """Its gradient needs each sum's gradient times its own factor d loss / d sum, known
    once every micro-batch's forward has run. Under 1F1B a backward pass starts before
    that: refused, saying so. GPipe runs every forward first; the backward passes then
    differentiate each sum at the totals (``runtime.PipelineProgram.cotangents``), and the
    step matches jax.jit: a sum over a parameter-dependent sum, beside a ratio to a
    count, a log of a mean and a parameter norm."""
    def two_sums(params, opt_state, batch):
        def loss(p, b):
            value, _ = _forward(p, b)
            nll = value * b["x"].shape[0]
            return nll / jnp.sum(p[-1]["b"] * b["x"][:, :4])
        return autoshard.value_and_grad(loss)(params, batch)

    def several(params, opt_state, batch):
        def loss(p, b):
            logits = jax.nn.log_softmax(p[-1]["b"] + b["x"] @ jnp.ones((16, 4)))
            nll = -jnp.take_along_axis(logits, b["label"][:, None], axis=1)[:, 0]
            keep = (b["label"] != 3).astype(jnp.float32)
            spread = jnp.mean(jax.nn.sigmoid(b["x"] @ p[0]["w"]))
            return jnp.sum(nll * keep) / jnp.sum(keep) + jnp.log(spread) + \
                1e-2 * jnp.sum(p[0]["w"] ** 2), {"spread": spread}
        (value, aux), grads = autoshard.value_and_grad(loss, has_aux=True)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value, aux

    args = _classifier()
    with pytest.raises(ValueError, match="a function of 2 values combined over the batch "
                                         "that depend on the differentiated arguments, whose "
                                         "factor.*several under schedule='gpipe'"):
        _pipelined(two_sums).plan(*args)
    for fn in (two_sums, several):
        step = _pipelined(fn, schedule="gpipe")
        assert_trees_allclose(step(*args), jax.jit(fn)(*args))
    assert "head cotangents" in step.lower(*args).names


@pytest.mark.parametrize("form", ["plus", "times"])
def test_a_masked_mean_and_a_parameter_norm_match_jit(form):
    """A value that depends on the parameters but not on the batch (an L2 penalty) beside
    a masked mean: the step differentiates it itself, at d loss / d penalty from the
    totals, and adds that to the scaled sum of the micro-batches' gradients. Refused
    before, as a function of two parameter-dependent values."""
    def fn(params, opt_state, batch):
        def loss(p, b):
            logits = jax.nn.log_softmax(p[-1]["b"] + b["x"] @ jnp.ones((16, 4)))
            nll = -jnp.take_along_axis(logits, b["label"][:, None], axis=1)[:, 0]
            keep = (b["label"] != 3).astype(jnp.float32)
            penalty = sum(jnp.sum(w ** 2) for w in jax.tree.leaves(p))
            masked = jnp.sum(nll * keep) / jnp.maximum(jnp.sum(keep), 1.0)
            return masked + 1e-2 * penalty if form == "plus" else masked * (1 + 1e-2 * penalty)
        value, grads = autoshard.value_and_grad(loss)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value

    args = _classifier()
    assert_trees_allclose(_pipelined(fn)(*args), jax.jit(fn)(*args))


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
