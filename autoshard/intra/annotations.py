"""The model's own sharding annotations, read off the arguments' pytree.

What a flax model's authors wrote about its layout:

* flax linen boxes: ``nn.with_partitioning(init, ("data", "model"))`` gives
  ``nn.Partitioned`` (mesh axis names), ``nn.with_logical_partitioning(init, ("embed",
  "mlp"))`` gives ``nn.LogicallyPartitioned`` (logical names). Optax states built from
  boxed parameters carry the same boxes.
* flax nnx variables: the ``out_sharding`` metadata (``nnx.with_partitioning``,
  ``nnx.Param(value, out_sharding=...)``; ``sharding_names`` / ``sharding`` in older
  releases), which ``nnx.Optimizer`` copies onto its state.

Logical names map to mesh axes by rules in flax's form: ``(("batch", "data"), ("mlp",
"model"), ("embed", None))``, in order, a rule applying when its axes are not used by
another dim of the same array (as ``flax.linen.logical_to_mesh_axes``). Without rules,
those the boxes carry or flax's current ``nn.logical_axis_rules`` context apply. A name
that is a mesh axis stands for itself. Nothing here imports flax.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from autoshard.ir.specs import Spec, replicated, spec_is_valid
from autoshard.ir.trace import argument_path, aval_struct

from .presets import split_leading

#: an annotation per dim: None, a name, or a tuple of names
Names = tuple


class AnnotationError(ValueError):
    """Annotations that cannot be laid out on the mesh (an unknown name, a dim the named
    axes do not divide, a rank mismatch)."""


def annotation_names(node) -> Names | None:
    """The per-dim names ``node`` annotates its array with, or None when ``node`` is not
    a flax annotation."""
    module = type(node).__module__ or ""
    if not module.startswith("flax."):
        return None
    names = getattr(node, "names", None)  # linen Partitioned / LogicallyPartitioned
    if isinstance(names, (tuple, list)) and callable(getattr(node, "unbox", None)):
        return tuple(names)
    get_metadata = getattr(node, "get_metadata", None)  # nnx Variable
    if callable(get_metadata) and not isinstance(node, type):
        try:
            metadata = get_metadata()
        except Exception:  # noqa: BLE001 - not the nnx API we know: no annotation
            return None
        for key in ("out_sharding", "sharding_names", "sharding"):
            value = metadata.get(key) if isinstance(metadata, dict) else None
            if isinstance(value, NamedSharding):
                value = value.spec
            if isinstance(value, (tuple, list, PartitionSpec)):
                return tuple(value)
    return None


def _rules_of(node, rules) -> Sequence:
    """The rules for ``node``'s logical names: given ones, else the box's own, else
    flax's current ``logical_axis_rules`` context."""
    if rules:
        return rules
    own = getattr(node, "rules", None)
    if own:
        return tuple(own)
    spmd = sys.modules.get("flax.core.spmd")
    current = getattr(spmd, "get_logical_axis_rules", None)
    return tuple(current() or ()) if callable(current) else ()


def _mesh_axes(names: Names, rules, axis_names: Sequence[str], where: str
               ) -> tuple[tuple[str, ...], ...]:
    """Per dim, the mesh axes ``names`` map to: rules first, in order, each applying
    where its axes are still free (flax's ``logical_to_mesh_axes``); then names that are
    mesh axes themselves. ``AnnotationError`` for a name that is neither."""
    def axes_of(logical, target) -> tuple[str, ...]:
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        unknown = [a for a in axes if a not in axis_names]
        if unknown:
            raise AnnotationError(f"the rule ({logical!r}, {target!r}) names mesh axes "
                                  f"{unknown} that the mesh {tuple(axis_names)} lacks")
        return axes

    result: list[tuple[str, ...] | None] = [None] * len(names)
    used: set[str] = set()
    for logical, target in rules:
        for d, name in enumerate(names):
            axes = axes_of(logical, target) if name == logical else None
            if result[d] is None and axes is not None and not used & set(axes):
                result[d] = axes
                used |= set(axes)
    for d, name in enumerate(names):
        if result[d] is not None or name is None:
            continue
        parts = (name,) if isinstance(name, str) else \
            tuple(name) if isinstance(name, (tuple, list)) else None
        if parts is None:  # PartitionSpec.UNCONSTRAINED and the like: no constraint
            result[d] = ()
        elif all(isinstance(p, str) and p in axis_names for p in parts):
            if used & set(parts):
                raise AnnotationError(f"{where} is annotated {names}: mesh axes {parts} are "
                                      f"used by two of its dims")
            result[d] = parts
            used |= set(parts)
        elif any(logical == name for logical, _ in rules):
            result[d] = ()  # every rule's axes are taken by other dims: replicated, as flax
        else:
            raise AnnotationError(
                f"{where} is annotated {names}: {name!r} is neither a mesh axis "
                f"{tuple(axis_names)} nor a logical name with a rule; add ({name!r}, "
                f"<a mesh axis, or None to keep that dim whole>) to Annotated(rules=...)")
    return tuple(r or () for r in result)


def annotated_layouts(args, static_argnums: Sequence[int], batch_flat: Sequence[bool],
                      mesh_shape: Sequence[int], axis_names: Sequence[str], rules=()
                      ) -> tuple[tuple[Spec, ...], int]:
    """(one spec per flat input of the call, how many inputs carry an annotation).

    An annotated input takes its annotation's layout; an unannotated batch input is
    split on its leading dim over the axes the rules give ``"batch"`` (else every mesh
    axis but the last, as :class:`~autoshard.Megatron` does, or every axis of a 1-D
    mesh); every other input is replicated. ``AnnotationError`` names the pytree path of
    an annotation that the mesh cannot hold."""
    static = set(static_argnums)
    argnums = [i for i in range(len(args)) if i not in static]
    tree = tuple(args[i] for i in argnums)
    nodes, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: annotation_names(x) is not None)
    axis_names = tuple(axis_names)
    batch_axes = _batch_axes(rules, mesh_shape, axis_names)
    specs: list[Spec] = []
    annotated = 0
    for path, node in nodes:
        names = annotation_names(node)
        leaves = jax.tree_util.tree_leaves(node) if names is not None else [node]
        for leaf in leaves:
            k = len(specs)
            shape = tuple(aval_struct(leaf).shape)
            where = argument_path(path, argnums)
            if names is None:
                specs.append(split_leading(shape, mesh_shape, batch_axes)
                             if batch_flat[k] and shape else replicated(len(shape)))
                continue
            if len(names) > len(shape):
                raise AnnotationError(f"{where} has shape {shape} but is annotated {names} "
                                      f"({len(names)} dims)")
            axes = _mesh_axes(names, _rules_of(node, rules), axis_names, where)
            spec = tuple(tuple(axis_names.index(a) for a in dim) for dim in axes) + \
                ((),) * (len(shape) - len(names))
            if not spec_is_valid(shape, spec, mesh_shape):
                sizes = dict(zip(axis_names, mesh_shape))
                raise AnnotationError(
                    f"{where} (shape {shape}) is annotated {names}, laid out as "
                    f"{PartitionSpec(*(a or None for a in axes))} on the mesh {sizes}: the "
                    f"axes do not divide its dims")
            specs.append(spec)
            annotated += 1
    if len(specs) != len(batch_flat):
        raise AnnotationError(f"found {len(specs)} array leaves among the annotations, "
                              f"expected {len(batch_flat)}")
    return tuple(specs), annotated


def _batch_axes(rules, mesh_shape, axis_names) -> tuple[int, ...]:
    """Mesh axes (indices) the batch's leading dim is split over."""
    for logical, target in rules or ():
        if logical == "batch":
            names = () if target is None else (target,) if isinstance(target, str) \
                else tuple(target)
            return tuple(axis_names.index(n) for n in names if n in axis_names)
    axes = [a for a, n in enumerate(mesh_shape) if n > 1]
    return tuple(axes[:-1]) if len(axes) > 1 else tuple(axes)


__all__ = ["AnnotationError", "annotated_layouts", "annotation_names"]
