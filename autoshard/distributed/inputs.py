"""Process-local data → global arrays, for multi-process (``jax.distributed``) runs."""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def global_batch(local, mesh: jax.sharding.Mesh):
    """Global ``jax.Array`` s from each process's slice of a batch.

    ``local`` is a pytree of arrays holding this process's rows: process ``i`` holds
    rows ``[i·n, (i+1)·n)`` of the global batch on the leading dim, so every leaf of
    the result has leading dim ``n × jax.process_count()``. Every process must call it
    (with the same tree structure, shapes and dtypes). The result is split on its
    leading dim over all of ``mesh``'s devices; pass it to the parallelized function,
    which reshards it to the planned layout if that differs. In a single process this
    is just a sharded ``device_put``.

    ``n`` must be divisible by the number of this process's devices in ``mesh``, and
    the mesh must give each process a contiguous block of devices (``autoshard.make_mesh``
    does).
    """
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"global_batch needs a jax.sharding.Mesh (autoshard.make_mesh), got "
                        f"{type(mesh).__name__}")
    sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    processes = math.prod(mesh.devices.shape) // max(local_devices, 1)

    def one(path, leaf):
        host = np.asarray(jax.device_get(leaf))
        if host.ndim == 0:
            raise ValueError(f"global_batch: leaf {jax.tree_util.keystr(path)} is a scalar; "
                             f"every leaf needs a leading batch dim")
        if host.shape[0] % local_devices:
            raise ValueError(
                f"global_batch: leaf {jax.tree_util.keystr(path)} has {host.shape[0]} rows "
                f"in this process, not divisible by its {local_devices} devices in the mesh; "
                f"give each process a multiple of {local_devices} rows")
        shape = (host.shape[0] * processes,) + host.shape[1:]
        return jax.make_array_from_process_local_data(sharding, host, shape)

    return jax.tree_util.tree_map_with_path(one, local)
