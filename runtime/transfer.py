"""Moving an array between device sets, in one process or across ``jax.distributed``
processes (pipeline stages on the sub-meshes of different hosts).

Every process runs the same pipeline driver and calls :func:`move` for every transfer, in
the same order; what each process does is decided from the two device sets alone, so the
processes agree. A process holding none of the destination's devices gets a placeholder:
an array with the destination's sharding and no local shards (jax runs a program whose
devices are all elsewhere as a no-op, so the driver goes on with it as with any array).

Across processes, in order of preference:

- the same devices: ``jax.device_put`` reshards (XLA collectives over them);
- every destination process holds source devices (the whole mesh to a stage): the value
  is gathered to every source device, and each process fills its own destination shards
  from its local copy (no transfer between processes beyond the gather);
- source and destination meshes of the same shape on disjoint processes, on a backend with
  native cross-host transfers (GPU, TPU): the value is resharded to the destination's
  layout on the source devices, then jax's cross-host transfer copies each shard to its
  destination device (``jax.device_put``);
- otherwise through the hosts: gathered on the source, broadcast from its first process to
  all (``multihost_utils.broadcast_one_to_all``), laid out on the destination from there.
  (jax's socket transfers for backends without native ones, the CPU, hung in this
  project's tests after other traffic between the processes.)
"""
from __future__ import annotations

import jax
import jax.extend
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .sharded import place_global


def _reshard(value, sharding):
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    return jax.device_put(value, sharding)


def placeholder(shape, dtype, sharding) -> jax.Array:
    """An array laid out as ``sharding`` of which this process holds no shard."""
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, [], dtype=dtype)


def _native_cross_host_transfers() -> bool:
    """Whether the backend moves arrays between processes' devices itself (GPU, TPU)."""
    return bool(getattr(jax.extend.backend.get_backend(), "supports_cross_host_transfers",
                        False))


def _processes(devices) -> frozenset[int]:
    return frozenset(d.process_index for d in devices)


def _mesh_of(sharding) -> Mesh:
    if isinstance(sharding, NamedSharding):
        return sharding.mesh
    return Mesh(np.asarray(sharding._device_assignment, dtype=object), ("devices",))


def as_global(value, known_device_sets):
    """A step argument of a multi-process run as :func:`move` takes it: a jax array laid out
    over a device set of ``known_device_sets`` (the mesh's, a stage's: made by a previous
    step, or a global array) as it is, any other array that this process holds whole (a
    process-local array) as a host value, the same in every process."""
    if jax.process_count() > 1 and isinstance(value, jax.Array) and value.is_fully_addressable \
            and frozenset(value.sharding.device_set) not in known_device_sets:
        return np.asarray(value)
    return value


def move(value, sharding: NamedSharding):
    """``value`` laid out as ``sharding`` (see the module docstring)."""
    if jax.process_count() == 1:
        return _reshard(value, sharding)
    if not isinstance(value, jax.Array):
        return place_global(value, sharding)
    if value.sharding == sharding:
        return value
    src, dst = value.sharding, sharding
    if src.device_set == dst.device_set:
        return jax.device_put(value, dst)
    me = jax.process_index()
    src_procs, dst_procs = _processes(src.device_set), _processes(dst.device_set)
    shape, dtype = value.shape, value.dtype
    if len(src_procs) == 1 and src_procs == dst_procs:   # within one process
        return jax.device_put(value, dst) if me in dst_procs else placeholder(shape, dtype, dst)
    src_mesh = _mesh_of(src)
    if dst_procs <= src_procs:
        whole = _reshard(value, NamedSharding(src_mesh, PartitionSpec()))
        if me not in dst_procs:
            return placeholder(shape, dtype, dst)
        return place_global(whole.addressable_shards[0].data, dst)
    if src_mesh.devices.shape == dst.mesh.devices.shape and not src_procs & dst_procs \
            and _native_cross_host_transfers():
        alike = Mesh(src_mesh.devices, dst.mesh.axis_names, axis_types=dst.mesh.axis_types)
        laid = _reshard(value, NamedSharding(alike, dst.spec))
        if me not in src_procs | dst_procs:
            return placeholder(shape, dtype, dst)
        return jax.device_put(laid, dst)
    whole = _reshard(value, NamedSharding(src_mesh, PartitionSpec()))
    source = min(src_procs)
    host = np.asarray(whole.addressable_shards[0].data) if me == source else \
        np.zeros(shape, dtype)
    return place_global(multihost_utils.broadcast_one_to_all(host, is_source=me == source), dst)
