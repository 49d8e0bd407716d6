"""PipeshardParallel on steps without a gradient (inference): the whole step is pipelined
forward only, each output combined over the micro-batches as it is over the batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoshard
from tests.trees import assert_trees_allclose

VOCAB, WIDTH, LAYERS = 32, 16, 4


def _model(seed=0):
    rng = np.random.default_rng(seed)
    params = {"embed": jnp.asarray(rng.normal(size=(VOCAB, WIDTH)) * 0.3, jnp.float32),
              "layers": [{"w": jnp.asarray(rng.normal(size=(WIDTH, WIDTH)) * 0.3, jnp.float32)}
                         for _ in range(LAYERS)]}
    tokens = jnp.asarray(rng.integers(0, VOCAB, size=(16, 7)), jnp.int32)
    mask = jnp.asarray(rng.random(size=(16, 6)) > 0.3, jnp.float32)
    return params, tokens, mask


def _logits(params, tokens):
    h = params["embed"][tokens]
    for layer in params["layers"]:
        h = jnp.tanh(h @ layer["w"])
    return h @ params["embed"].T


def predict(params, tokens):   # one value per example: the micro-batches' concatenated
    return jnp.argmax(_logits(params, tokens), -1)


def evaluate(params, tokens, mask):   # a masked mean, a masked accuracy, per-example losses
    logits = _logits(params, tokens[:, :-1])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
    hits = (jnp.argmax(logits, -1) == tokens[:, 1:]) * mask
    return {"loss": jnp.sum(nll * mask) / jnp.sum(mask), "accuracy": jnp.sum(hits) / jnp.sum(mask),
            "per_example": jnp.mean(nll, -1), "largest_logit": jnp.max(logits)}


def _pipelined(fn, **kw):
    method = autoshard.PipeshardParallel(num_microbatches=4, num_stages=2, num_layers=2)
    return autoshard.parallelize(fn, mesh=autoshard.make_mesh((8,), ("data",)), method=method,
                                 **kw)


@pytest.mark.parametrize("fn, batch_argnums", [(predict, None), (evaluate, (1, 2))])
def test_a_step_without_a_gradient_is_pipelined_forward_only(fn, batch_argnums):
    """Refused before ("needs a gradient"); now two stages run the step's layers and its
    outputs are jax.jit's, at the whole batch's shapes."""
    params, tokens, mask = _model()
    args = (params, tokens) if fn is predict else (params, tokens, mask)
    step = _pipelined(fn, batch_argnums=batch_argnums)
    assert_trees_allclose(step(*args), jax.jit(fn)(*args))
    assert len(step.plan(*args).stages) == 2
    names = step.lower(*args).names   # (evaluate's masked means: from totals, in an apply)
    assert names[:2] == ("stage 0 forward", "stage 1 forward")
    assert not any("backward" in name for name in names)
    assert step.audit(*args).ok
    assert jax.tree.map(lambda s: s.shape, step.eval_shape(*args)) == \
        jax.tree.map(lambda s: s.shape, jax.eval_shape(fn, *args))


def test_an_output_no_combination_gives_is_refused_naming_it():
    def top_logits(params, tokens):   # the five largest over the whole batch
        return {"top": jax.lax.top_k(_logits(params, tokens).reshape(-1), 5)[0]}

    def doubled_on_the_host(params, tokens):   # rows? a mean? a callback does not say
        logits = _logits(params, tokens)
        return jax.pure_callback(lambda a: np.asarray(a) * 2, jax.typeof(logits), logits)

    params, tokens, _ = _model()
    with pytest.raises(ValueError, match=r"in top_logits \(no gradient: run forward only\): "
                                         r"its output\['top'\] is"):
        _pipelined(top_logits).plan(params, tokens)
    # (a loss read through a callback is averaged over the micro-batches, with a warning;
    # the outputs of an inference step are as often one row per example: refused)
    with pytest.raises(ValueError, match="reads the batch through pure_callback"):
        _pipelined(doubled_on_the_host).plan(params, tokens)
