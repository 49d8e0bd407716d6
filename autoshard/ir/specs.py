"""Tensor sharding specs: the planner's internal form and jax's PartitionSpec.

Internally a spec is ``tuple[tuple[int, ...], ...]``: per tensor dim, the mesh
axis indices splitting it, major first (``()`` = whole). This is the plain data
``cost_model`` prices.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from jax.sharding import PartitionSpec

Spec = tuple[tuple[int, ...], ...]


def replicated(rank: int) -> Spec:
    return ((),) * rank


def to_partition_spec(spec: Spec, axis_names: Sequence[str]) -> PartitionSpec:
    """``((0,), (), (0, 1))`` → ``PartitionSpec('data', None, ('data', 'model'))`` (trailing Nones dropped)."""
    entries = []
    for axes in spec:
        if not axes:
            entries.append(None)
        elif len(axes) == 1:
            entries.append(axis_names[axes[0]])
        else:
            entries.append(tuple(axis_names[a] for a in axes))
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def from_partition_spec(pspec: PartitionSpec, rank: int, axis_names: Sequence[str]) -> Spec:
    """``PartitionSpec(None, ('data', 'model'))`` → ``((), (0, 1), ())`` for a rank-3
    tensor (the inverse of :func:`to_partition_spec`); raises ``ValueError`` on unknown
    axes or too many entries."""
    entries = tuple(pspec)
    if len(entries) > rank:
        raise ValueError(f"{pspec} names {len(entries)} dims of a rank-{rank} tensor")
    spec = []
    for entry in entries + (None,) * (rank - len(entries)):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        for name in names:
            if name not in axis_names:
                raise ValueError(f"{pspec} names mesh axis {name!r}; the mesh has "
                                 f"{tuple(axis_names)}")
        spec.append(tuple(axis_names.index(name) for name in names))
    return tuple(spec)


def spec_is_valid(shape: Sequence[int], spec: Spec, mesh_shape: Sequence[int]) -> bool:
    if len(spec) != len(shape):
        return False
    used = [a for axes in spec for a in axes]
    if len(used) != len(set(used)):
        return False
    for size, axes in zip(shape, spec):
        n = 1
        for a in axes:
            n *= mesh_shape[a]
        if size % n:
            return False
    return True


def enumerate_specs(shape: Sequence[int], mesh_shape: Sequence[int]) -> list[Spec]:
    """Every valid spec of a tensor: each mesh axis (of size > 1) splits one dim or none.

    Axes sharing a dim split it in mesh order (major axis first), so that a layout has
    one spelling. The replicated spec comes first.
    """
    axes = [a for a, n in enumerate(mesh_shape) if n > 1]
    rank = len(shape)
    specs: list[Spec] = []
    seen = set()
    for assignment in itertools.product(range(rank + 1), repeat=len(axes)):
        groups: list[list[int]] = [[] for _ in range(rank)]
        for axis, dim in zip(axes, assignment):
            if dim < rank:
                groups[dim].append(axis)
        spec = tuple(tuple(g) for g in groups)
        if spec not in seen and spec_is_valid(shape, spec, mesh_shape):
            seen.add(spec)
            specs.append(spec)
    specs.sort(key=lambda s: (sum(len(a) for a in s), s))
    return specs
