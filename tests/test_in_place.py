"""intra/in_place.py: updates XLA writes over their target move only their window, and
slices read only what they keep; priced as XLA's ``cost_analysis`` counts them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoshard
from autoshard.intra.flops import bodies_traffic
from autoshard.intra.in_place import program_in_place
from autoshard.ir.trace import trace
from tests.trees import assert_trees_allclose

ROWS, COLS = 64, 32
TARGET = ROWS * COLS * 4  # bytes of the f32 target below
ROW = COLS * 4            # bytes of one row: the window


def _updates(fn, args, donated=()):
    """Names of the equations of ``fn``'s program written in place."""
    program = trace(fn, args).program
    return sorted(program.eqns[e].primitive.name for e in program_in_place(program, donated))


BUF, ROW_VALUE = jnp.zeros((ROWS, COLS)), jnp.ones((COLS,))


@pytest.mark.parametrize("fn, donated, expected", [
    # a donated target: its buffer is the update's to write over
    (lambda b, r, i: b.at[i].set(r), (0,), ["scatter"]),
    (lambda b, r, i: jax.lax.dynamic_update_slice(b, r[None], (i, 0)), (0,), ["dynamic_update_slice"]),
    # not donated: XLA copies the argument first (the copy reads and writes it whole)
    (lambda b, r, i: b.at[i].set(r), (), []),
    # an intermediate read by nothing else: written over
    (lambda b, r, i: (b * 2).at[i].add(r), (), ["scatter-add"]),
    # another reader the update does not wait for: copied first (measured: XLA's
    # cost_analysis counts the target read and written once more), whether that reader
    # reads the update's result too or not
    (lambda b, r, i: (lambda t: t.at[i].set(r) + t)(b * 2), (), []),
    (lambda b, r, i: (lambda t: (t.at[i].set(r), t.sum()))(b * 2), (), []),
    (lambda b, r, i: (b.at[i].set(r), b.sum()), (0,), []),
    # another reader the update's values come from: it reads first, then the update writes
    (lambda b, r, i: (lambda t: t.at[i].set(r * t.sum()))(b * 2), (), ["scatter"]),
    (lambda b, r, i: b.at[i].set(r * b.sum()), (0,), ["scatter"]),
    # two updates of one target: both copy it
    (lambda b, r, i: (lambda t: (t.at[i].set(r), t.at[i + 1].set(r)))(b * 2), (), []),
    # a chain of updates over a donated target, each written over the last
    (lambda b, r, i: b.at[i].set(r).at[i + 1].set(r * 2), (0,), ["scatter", "scatter"]),
])
def test_which_updates_are_written_in_place(fn, donated, expected):
    assert _updates(fn, (BUF, ROW_VALUE, 3), donated) == expected


def test_a_scatter_of_many_windows_is_not_one_update():
    # XLA's CPU backend counts a scatter of several rows over the whole target
    rows = jnp.arange(8) * 3
    assert _updates(lambda b, u, i: b.at[i].add(u), (BUF, jnp.ones((8, COLS)), rows), (0,)) == []


def test_a_loop_writing_into_its_carry_moves_only_the_window():
    def fill(buf, row):
        return jax.lax.fori_loop(0, ROWS, lambda i, b: jax.lax.dynamic_update_slice(
            b, row[None] * i, (i, 0)), buf)
    jaxpr = jax.make_jaxpr(fill)(BUF, ROW_VALUE).jaxpr
    loop = next(e for e in jaxpr.eqns if e.primitive.name == "scan")  # (static bounds)
    # each of its ROWS iterations reads the row and writes it into the buffer, and writes
    # the counter (4 bytes); never the whole buffer (2 * TARGET an iteration before)
    assert bodies_traffic(loop) == ROWS * (2 * ROW + 4)


def _decode(params, cache, x, pos):
    """One decoding step of a 2-layer attention model with a KV cache (the cache updated
    at ``pos``; every layer's weights read as slices of stacked arrays)."""
    for layer in range(2):
        qkv = (x @ params["wqkv"][layer]).reshape(8, 3, 4, 16)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        cache = cache.at[layer, 0, :, pos].set(k).at[layer, 1, :, pos].set(v)
        s = jnp.einsum("bhd,bthd->bht", q, cache[layer, 0]) / 4.0
        s = jnp.where(jnp.arange(cache.shape[3]) <= pos, s, -1e9)
        o = jnp.einsum("bht,bthd->bhd", jax.nn.softmax(s), cache[layer, 1]).reshape(8, 64)
        x = x + o @ params["wo"][layer]
    return x, cache


@pytest.mark.parametrize("donate", [(1,), ()])
def test_a_kv_cache_decoding_step_runs_what_was_priced(donate):
    """The audit found a decoding step's bytes at 2.7x the compiled program's: every cache
    update priced as the whole cache read and written, every slice of the stacked weights
    as the whole stack read. Not donated, the cache is copied once, as priced."""
    keys = jax.random.split(jax.random.key(0), 3)

    def args():
        params = {"wqkv": jax.random.normal(keys[0], (2, 64, 192)) * 0.1,
                  "wo": jax.random.normal(keys[1], (2, 64, 64)) * 0.1}
        return params, jnp.zeros((2, 2, 8, 32, 4, 16)), jax.random.normal(keys[2], (8, 64)), 5

    expected = jax.jit(_decode)(*args())
    step = autoshard.parallelize(_decode, mesh=autoshard.make_mesh((2, 4), ("data", "model")),
                                 donate_argnums=donate)
    report = step.audit(*args())
    assert report.ok, report.summary()
    assert_trees_allclose(step(*args()), expected, atol=1e-5)
    assert np.asarray(expected[1][:, :, :, 5]).any()  # the step wrote the cache
