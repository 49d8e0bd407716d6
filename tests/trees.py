"""Comparing result pytrees with jax.jit's (shared by the test modules)."""
import jax
import numpy as np


def assert_trees_allclose(actual, expected):
    """Same tree structure, every leaf allclose (float32 reduction-order tolerance)."""
    a_leaves, a_tree = jax.tree.flatten(actual)
    e_leaves, e_tree = jax.tree.flatten(expected)
    assert a_tree == e_tree
    for a, e in zip(a_leaves, e_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-4, atol=2e-5)
