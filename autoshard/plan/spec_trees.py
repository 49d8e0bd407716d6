"""Pytrees of ``PartitionSpec`` (a plan's ``in_specs`` / ``out_specs``) and single specs
⇄ JSON, for :mod:`.serialize`; loading says what is wrong, where."""
from __future__ import annotations

import collections
from typing import Any

import jax
from jax.sharding import PartitionSpec

from autoshard.errors import PlanFormatError


def short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class SpecTreeNode:
    """Stands in for a custom pytree node of a loaded plan's spec tree.

    ``type_name``: the original node's class name; ``leaves``: ``((key path, spec
    or None), …)`` as the original flattened. A pytree whose leaves are the specs.
    """

    __slots__ = ("type_name", "leaves")

    def __init__(self, type_name: str, leaves):
        self.type_name = type_name
        self.leaves = tuple((str(k), v) for k, v in leaves)

    def __eq__(self, other):
        return isinstance(other, SpecTreeNode) and (self.type_name, self.leaves) == \
            (other.type_name, other.leaves)

    def __hash__(self):
        return hash((self.type_name, self.leaves))

    def __repr__(self):
        inner = ", ".join(f"{k}: {v}" for k, v in self.leaves)
        return f"{self.type_name}({inner})"


jax.tree_util.register_pytree_node(
    SpecTreeNode,
    lambda n: ([v for _, v in n.leaves], (n.type_name, tuple(k for k, _ in n.leaves))),
    lambda aux, children: SpecTreeNode(aux[0], zip(aux[1], children)))

_NAMEDTUPLES: dict[tuple[str, tuple[str, ...]], type] = {}


def _namedtuple_type(name: str, fields: tuple[str, ...], where: str) -> type:
    key = (name, fields)
    if key not in _NAMEDTUPLES:
        try:
            _NAMEDTUPLES[key] = collections.namedtuple(name, fields)
        except (ValueError, TypeError) as err:
            raise PlanFormatError(f"{where}: bad namedtuple {name!r} with fields "
                                  f"{list(fields)}: {err}") from None
    return _NAMEDTUPLES[key]


# ---------------------------------------------------------------- specs
def spec_to_json(spec: PartitionSpec) -> list:
    return [None if e is None else e if isinstance(e, str) else list(e) for e in spec]


def spec_from_json(data, where: str, axis_names=None) -> PartitionSpec:
    if not isinstance(data, list):
        raise PlanFormatError(f"{where}: expected a spec (a list of axis names/null), "
                              f"got {short(data)}")
    entries = []
    for e in data:
        if e is None or isinstance(e, str):
            entries.append(e)
        elif isinstance(e, list) and all(isinstance(a, str) for a in e):
            entries.append(tuple(e))
        else:
            raise PlanFormatError(f"{where}: bad spec entry {short(e)}; expected null, an "
                                  "axis name or a list of axis names")
    if axis_names is not None:
        for e in entries:
            for name in (() if e is None else (e,) if isinstance(e, str) else e):
                if name not in axis_names:
                    raise PlanFormatError(f"{where}: spec names mesh axis {name!r}, but the "
                                          f"plan's mesh axes are {list(axis_names)}")
    return PartitionSpec(*entries)


def _is_spec_leaf(x) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def tree_to_json(tree) -> Any:
    """Encode a pytree of PartitionSpec/None made of dicts, lists and tuples."""
    if tree is None:
        return None
    if isinstance(tree, PartitionSpec):
        return {"spec": spec_to_json(tree)}
    if isinstance(tree, SpecTreeNode):
        return {"node": tree.type_name,
                "leaves": [[k, tree_to_json(v)] for k, v in tree.leaves]}
    if type(tree) is dict:
        return {"dict": [[_key_to_json(k), tree_to_json(v)] for k, v in tree.items()]}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return {"namedtuple": type(tree).__name__,
                "fields": [[k, tree_to_json(v)] for k, v in zip(tree._fields, tree)]}
    if type(tree) in (list, tuple):
        return {type(tree).__name__: [tree_to_json(v) for v in tree]}
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_spec_leaf)[0]
    return {"node": type(tree).__name__,
            "leaves": [[jax.tree_util.keystr(p), tree_to_json(v)] for p, v in leaves]}


def _key_to_json(key):
    if isinstance(key, (str, int, float, bool)) or key is None:
        return key
    raise TypeError(f"cannot write a plan whose spec tree has a dict key of type "
                    f"{type(key).__name__} ({key!r}); keys must be str, int, float, bool or None")


def key_value_pairs(data, where: str, key_kind=None) -> list:
    if not isinstance(data, list) or not all(isinstance(p, list) and len(p) == 2 for p in data):
        raise PlanFormatError(f"{where}: expected a list of [key, value] pairs, got {short(data)}")
    if key_kind is not None:
        for k, _ in data:
            if not isinstance(k, key_kind):
                raise PlanFormatError(f"{where}: bad key {short(k)}")
    return data


def tree_from_json(data, where: str) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict) or not data:
        raise PlanFormatError(f"{where}: expected a spec tree node (null or an object), "
                              f"got {short(data)}")
    kind = next(iter(data))
    expected = {"spec": 1, "dict": 1, "list": 1, "tuple": 1, "namedtuple": 2, "node": 2}
    if kind not in expected or len(data) != expected[kind]:
        raise PlanFormatError(f"{where}: unknown spec tree node with keys {sorted(data)}")
    body = data[kind]
    if kind == "spec":
        return spec_from_json(body, where)
    if kind == "dict":
        return {k: tree_from_json(v, f"{where}[{k!r}]")
                for k, v in key_value_pairs(body, where, (str, int, float, bool, type(None)))}
    if kind in ("list", "tuple"):
        if not isinstance(body, list):
            raise PlanFormatError(f"{where}: expected a list, got {short(body)}")
        items = [tree_from_json(v, f"{where}[{i}]") for i, v in enumerate(body)]
        return items if kind == "list" else tuple(items)
    if kind == "namedtuple":
        if not isinstance(body, str) or "fields" not in data:
            raise PlanFormatError(f"{where}: a namedtuple node needs a name and \"fields\"")
        fields = key_value_pairs(data["fields"], where, str)
        cls = _namedtuple_type(body, tuple(k for k, _ in fields), where)
        return cls(*(tree_from_json(v, f"{where}.{k}") for k, v in fields))
    if not isinstance(body, str) or "leaves" not in data:
        raise PlanFormatError(f"{where}: a node needs a type name and \"leaves\"")
    leaves = key_value_pairs(data["leaves"], where, str)
    return SpecTreeNode(body, [(k, tree_from_json(v, f"{where}{k}")) for k, v in leaves])


def tree_specs(tree) -> list:
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_spec_leaf) if x is not None]


# ---------------------------------------------------------------- plan
