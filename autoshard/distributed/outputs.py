"""Global arrays → whole values in every process, for multi-process (``jax.distributed``)
runs where some outputs live on the devices of one process only (pipeline stages)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from autoshard.runtime import move


def gather_to_host(tree):
    """Every array leaf of ``tree`` as a whole numpy array, in every process.

    ``multihost_utils.process_allgather`` needs each array to span every process; a
    pipelined step's outputs stay on the devices of the stage that made them (the
    parameters a stage updates, on its sub-mesh), which may belong to one process only.
    Every process must call this, with the same tree. In a single process it is
    ``jax.device_get``.
    """
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    everywhere = NamedSharding(Mesh(np.asarray(jax.devices(), dtype=object), ("devices",)),
                               PartitionSpec())

    def whole(leaf):
        if not isinstance(leaf, jax.Array):
            return np.asarray(leaf)
        return np.asarray(move(leaf, everywhere).addressable_data(0))

    return jax.tree.map(whole, tree)
