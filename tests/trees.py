"""Comparing result pytrees with jax.jit's (shared by the test modules)."""
import jax
import numpy as np


def assert_trees_allclose(actual, expected, atol=2e-5):
    """Same tree structure, every leaf allclose (float32 reduction-order tolerance; a
    larger ``atol`` for parameters Adam updated, see ``ADAM_ATOL``)."""
    a_leaves, a_tree = jax.tree.flatten(actual)
    e_leaves, e_tree = jax.tree.flatten(expected)
    assert a_tree == e_tree
    for a, e in zip(a_leaves, e_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-4, atol=atol)


# Adam moves every parameter by up to its learning rate whatever the gradient's size, so
# float32 summation-order noise in a gradient that is ~0 (1e-8 against a median of 1e-3)
# becomes an update difference of up to 1e-3 (lr 1e-3): parameters after Adam steps are
# compared to 1e-4 (as examples/equinox_vit.py does); a wrong gradient moves many by ~lr.
ADAM_ATOL = 1e-4
