"""How a pipelined loss's outputs combine over micro-batches (pipeline.microbatch_outputs):
each kind read off the program is checked against the values themselves, the micro-batches'
combined as that kind says against jax's value on the whole batch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoshard.ir.trace import trace
from autoshard.pipeline.microbatch_outputs import output_combinations, value_kinds

B, ROWS, D = 2, 8, 4   # micro-batches, rows of the whole batch, features


def _outputs(w, x, y):
    h = jnp.tanh(x @ w)
    per = jnp.mean((h - y) ** 2, -1)                       # one value per row
    hits = (y[:, 0] > 0).astype(jnp.float32)
    return {
        "mean": jnp.mean(per),                              # jnp.mean: a sum over a count
        "sum": jnp.sum(per),
        "max": jnp.max(per), "min": per.min(),
        "affine mean": 2 * jnp.mean(per) + 1,
        "mean of means": jnp.mean(per) + jnp.mean(h),
        "sum over a constant": jnp.sum(per) / 16.0,         # = the micro-batch's rows x 4
        "sum over the rows": jnp.sum(per) / per.shape[0],   # a mean
        "mean times the rows": jnp.mean(per) * x.shape[0],  # a sum
        "count": jnp.sum(per > 0.5),
        "max plus a constant": -jnp.max(-per) + 3.0,        # a min
        "independent": jnp.sum(w ** 2),
        "first row": per[0],
        "root mean square": jnp.sqrt(jnp.mean(per ** 2)),
        "masked mean": jnp.sum(per * hits) / jnp.sum(hits),
        "batch-normalized": jnp.mean((h - jnp.mean(h, 0)) ** 2),
        "squared mean": jnp.mean(per) ** 2,
    }


KINDS = {"mean": "mean", "sum": "sum", "max": "max", "min": "min", "affine mean": "mean",
         "mean of means": "mean", "sum over a constant": "sum", "sum over the rows": "mean",
         "mean times the rows": "sum", "count": "sum", "max plus a constant": "min",
         "independent": "same", "first row": None, "root mean square": None,
         "masked mean": None, "batch-normalized": None, "squared mean": None}
COMBINE = {"mean": lambda v: np.mean(v, 0), "sum": lambda v: np.sum(v, 0),
           "max": lambda v: np.max(v, 0), "min": lambda v: np.min(v, 0),
           "same": lambda v: v[0]}


def _args(rows):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.normal(size=(D, D)), jnp.float32),
            jnp.asarray(rng.normal(size=(ROWS, D)), jnp.float32)[:rows],
            jnp.asarray(rng.normal(size=(ROWS, D)), jnp.float32)[:rows])


def _kinds(with_whole: bool) -> dict:
    flat = lambda w, x, y: jax.tree.leaves(_outputs(w, x, y))  # noqa: E731
    micro = trace(flat, _args(ROWS // B)).program
    whole = trace(flat, _args(ROWS)).program if with_whole else None
    names = sorted(KINDS)   # (the dict's leaves come in key order)
    return dict(zip(names, output_combinations(micro, [False, True, True], B, whole)))


def test_each_kind_is_read_off_the_program_and_recovers_jits_value():
    kinds = _kinds(with_whole=True)
    assert kinds == KINDS
    w, x, y = _args(ROWS)
    whole = _outputs(w, x, y)
    parts = [_outputs(w, x[m * ROWS // B:(m + 1) * ROWS // B], y[m * ROWS // B:(m + 1) * ROWS // B])
             for m in range(B)]
    for name, kind in kinds.items():
        values = np.stack([np.asarray(p[name], np.float64) for p in parts])
        if kind is not None:
            np.testing.assert_allclose(COMBINE[kind](values), whole[name], rtol=1e-5,
                                       err_msg=name)
        else:   # averaged over the micro-batches (as the code before did): not jax's value
            assert not np.allclose(COMBINE["mean"](values), whole[name], rtol=1e-5), name


def test_functions_of_combined_values_are_told_from_what_no_totals_give():
    # a root mean square, a masked mean and a squared mean are functions of values that
    # combine (computed from their totals: pipeline.post_reduction); one row, and a batch
    # statistic fed back into each row, are not
    flat = lambda w, x, y: jax.tree.leaves(_outputs(w, x, y))  # noqa: E731
    micro = trace(flat, _args(ROWS // B)).program
    whole = trace(flat, _args(ROWS)).program
    kinds = value_kinds(micro, [False, True, True], B, whole)
    names = sorted(KINDS)
    post = {n for n, a in zip(names, micro.outvars) if kinds[a] is not None and kinds[a][0] == "post"}
    assert post == {"root mean square", "masked mean", "squared mean"}


def test_without_the_whole_batch_a_count_equal_to_the_rows_is_a_mean():
    # jnp.mean's divisor equals the elements its sum reduced; a mean's literal scale cannot
    # be told from a count without the trace at the whole batch's shapes: refused. The
    # constant 16.0 equals the micro-batch's 4 rows x 4 features here: taken for a count
    # (the trace at the whole batch's shapes tells it from one, above).
    kinds = _kinds(with_whole=False)
    assert kinds["mean"] == kinds["sum over the rows"] == "mean"
    assert kinds["affine mean"] is None and kinds["mean times the rows"] is None
    assert kinds["sum"] == "sum" and kinds["max"] == "max"


@pytest.mark.parametrize("rows", [1, 2])
def test_micro_batches_of_one_row_are_followed_through_their_reshapes(rows):
    # jax writes some ops of a [1, ...] micro-batch otherwise (take_along_axis): the loss is
    # read at the whole batch's shapes, the micro-batch's only compared with them
    def loss(table, tokens):
        logits = jax.nn.log_softmax(table[tokens[:, :-1]], -1)
        return [jnp.mean(jnp.take_along_axis(logits, tokens[:, 1:, None], -1))]

    table = jnp.ones((16, 16))
    tokens = jnp.zeros((rows * 4, 5), jnp.int32)
    micro = trace(loss, (table, tokens[:rows])).program
    whole = trace(loss, (table, tokens)).program
    assert output_combinations(micro, [False, True], 4, whole) == ("mean",)


def _kind_of(loss, *args, batch=(False, True)):
    micro = trace(lambda *a: [loss(*a)], tuple(a[: ROWS // B] if b else a
                                              for a, b in zip(args, batch))).program
    whole = trace(lambda *a: [loss(*a)], args).program
    return output_combinations(micro, list(batch), B, whole)[0]


def test_control_flow_is_followed_through_its_branches_and_body():
    w, x, _ = _args(ROWS)

    def branches(w, x, flag):   # a cond on a batch-independent flag: each branch a mean
        h = jax.lax.cond(flag > 0, lambda: jnp.tanh(x @ w), lambda: jax.nn.relu(x @ w))
        return jnp.mean(h)

    def layers(ws, x):   # a scan over layers too long to unroll (carrying the rows)
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
        return jnp.sum(h)

    def over_rows(w, x):   # a scan over the batch's rows: each step mixes into the carry
        total, _ = jax.lax.scan(lambda c, row: (jnp.tanh(c + row @ w), None),
                                jnp.zeros(D), x)
        return jnp.sum(total)

    assert _kind_of(branches, w, x, 1.0, batch=(False, True, False)) == "mean"
    ws = jnp.broadcast_to(w, (30_000, D, D))   # 30000 steps x 2 equations: not unrolled
    assert "scan" in [e.primitive.name for e in trace(layers, (ws, x)).program.eqns]
    assert _kind_of(layers, ws, x) == "sum"
    assert _kind_of(over_rows, w, x) is None
