"""Meshes with Auto axis types, and reading a mesh's shape without touching devices."""
from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], *, devices=None) -> Mesh:
    """A ``jax.sharding.Mesh`` of ``shape`` with ``AxisType.Auto`` axes.

    Raises ``ValueError`` when fewer devices exist than the mesh needs; to plan
    for a mesh you don't have, use :func:`abstract_mesh`.
    """
    shape, axis_names = _check_shape(shape, axis_names)
    needed = 1
    for n in shape:
        needed *= n
    available = len(devices) if devices is not None else jax.device_count()
    if needed > available:
        raise ValueError(
            f"a mesh of shape {shape} needs {needed} devices but {available} are available. "
            f"To plan without the devices use autoshard.abstract_mesh({shape}, {axis_names}); on "
            f"CPU you can get virtual devices by setting XLA_FLAGS=--xla_force_host_platform_"
            f"device_count={needed} before jax is imported.")
    return jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices)


def abstract_mesh(shape: Sequence[int], axis_names: Sequence[str]) -> AbstractMesh:
    """A device-free mesh: enough to plan and inspect, not to run."""
    shape, axis_names = _check_shape(shape, axis_names)
    return AbstractMesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(shape))


def _check_shape(shape, axis_names):
    shape = tuple(shape)
    axis_names = tuple(axis_names)
    if not shape or any(not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"mesh shape must be a non-empty tuple of positive ints, got {shape}")
    if len(axis_names) != len(shape) or len(set(axis_names)) != len(axis_names) \
            or not all(isinstance(a, str) for a in axis_names):
        raise ValueError(f"need {len(shape)} distinct string axis names for mesh shape "
                         f"{shape}, got {axis_names}")
    return shape, axis_names


def mesh_axes(mesh) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(shape, axis names) of a ``Mesh`` or ``AbstractMesh``."""
    if isinstance(mesh, (Mesh, AbstractMesh)):
        return tuple(mesh.axis_sizes), tuple(mesh.axis_names)
    raise TypeError(f"mesh must be a jax.sharding.Mesh or AbstractMesh (see autoshard.make_mesh), "
                    f"got {type(mesh).__name__}")


def default_cluster(mesh):
    """The cluster preset that matches the mesh's devices (host CPU for abstract meshes)."""
    from .cost_model import default_cluster_for_platform
    if isinstance(mesh, Mesh):
        device = mesh.devices.flat[0]
        return default_cluster_for_platform(device.platform, getattr(device, "device_kind", ""))
    return default_cluster_for_platform("cpu", "")
