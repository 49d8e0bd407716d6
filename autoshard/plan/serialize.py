"""Plan ⇄ JSON. The format is versioned; loading validates and says what is wrong.

The file is one JSON object (``"format": "autoshard-plan"``, ``"format_version": 1``)::

    method, fingerprint            str: the method's repr; hash of the input signature
    mesh                           {"shape": [int], "axis_names": [str]}
    cluster                        the object Cluster.to_json() writes
    in_specs, out_specs            spec trees (below): the pytrees of PartitionSpec
    inputs, outputs                [[key path, spec], ...] per flat leaf
    value_specs                    [[value id, spec], ...]   (intermediates pinned; a
                                   value listed twice is pinned to each in turn)
    operand_specs                  [[equation, operand, spec], ...] (likewise resharded)
    cost                           {compute_s, communication_s, resharding_s, peak_memory_bytes}
    solver                         null or {status, objective_s, ..., planning_time_s}
    collectives, top_ops           [{op, kind, seconds}], [{op, source, strategy, seconds}]
    warnings, stages               [str], [stage]: a pipeline stage is {"stage": {layers,
                                   mesh_shape, device_ids, cost: {compute_s, communication_s,
                                   resharding_s, peak_memory_bytes, forward_s, backward_s},
                                   num_microbatches, schedule, apply_cost: null or cost}};
                                   any other JSON value is kept as it is
    programs                       pipeline plans: [{name, inputs: [spec], outputs: [spec],
                                   value_specs, operand_specs, mesh_shape, flops,
                                   bytes_accessed}] per stage, pre-gradient and apply
                                   program (absent in older files, the last three too)
    batch                          {"arguments": ["args[2]", ...], "inferred": bool}: the
                                   batch arguments (absent in older files: none)
    alternatives                   [{method, compute_s, communication_s, resharding_s,
                                   input_s}]: hand-written layouts priced by the same model
                                   (absent in older files: none)
    shapes                         {"inputs": [[int]], "outputs": [[int]]}: the global
                                   shapes of the flat inputs and outputs (absent in older
                                   files; an empty list: not recorded)
    remat                          null or {"turn": int, "segments": [[start, stop]]}: the
                                   forward segments recomputed in the backward pass

A spec is a list with one entry per tensor dim: ``null``, an axis name or a list
of axis names. A spec tree node is ``null`` (a static argument), ``{"spec": …}``,
``{"dict": [[key, node], …]}``, ``{"list": […]}``, ``{"tuple": […]}``,
``{"namedtuple": name, "fields": [[field, node], …]}`` or, for any other pytree
node, ``{"node": type name, "leaves": [[key path, node], …]}``.

Round trip: ``Plan.from_json(p.to_json()).to_json() == p.to_json()`` and every field
compares equal. Namedtuples come back as namedtuples of the same name and fields;
other custom pytree nodes come back as :class:`SpecTreeNode` (same type name and key
paths), since their classes need not be importable where the plan is read.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from autoshard.cost_model import Cluster
from autoshard.errors import PlanFormatError
from autoshard.methods import method_from_dict, method_from_repr, method_to_dict

from .checks import (
    MAX_DEPTH,
    check_costs,
    check_ids,
    check_json_tree,
    check_mesh,
    check_remat,
    check_shapes,
    check_stages,
    deepest_field,
)
from .parts import (
    Alternative,
    Collective,
    OpCost,
    PlanCost,
    ProgramSpecs,
    SolverInfo,
    StageAssignment,
    StageCost,
)

#: version 2 writes the method as an object; version 1 files (the method's repr) still load
FORMAT_VERSION = 2


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
def _spec_to_json(spec: PartitionSpec) -> list:
    return [None if e is None else e if isinstance(e, str) else list(e) for e in spec]


def _spec_from_json(data, where: str, axis_names=None) -> PartitionSpec:
    if not isinstance(data, list):
        raise PlanFormatError(f"{where}: expected a spec (a list of axis names/null), "
                              f"got {_short(data)}")
    entries = []
    for e in data:
        if e is None or isinstance(e, str):
            entries.append(e)
        elif isinstance(e, list) and all(isinstance(a, str) for a in e):
            entries.append(tuple(e))
        else:
            raise PlanFormatError(f"{where}: bad spec entry {_short(e)}; expected null, an "
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


def _tree_to_json(tree) -> Any:
    """Encode a pytree of PartitionSpec/None made of dicts, lists and tuples."""
    if tree is None:
        return None
    if isinstance(tree, PartitionSpec):
        return {"spec": _spec_to_json(tree)}
    if isinstance(tree, SpecTreeNode):
        return {"node": tree.type_name,
                "leaves": [[k, _tree_to_json(v)] for k, v in tree.leaves]}
    if type(tree) is dict:
        return {"dict": [[_key_to_json(k), _tree_to_json(v)] for k, v in tree.items()]}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return {"namedtuple": type(tree).__name__,
                "fields": [[k, _tree_to_json(v)] for k, v in zip(tree._fields, tree)]}
    if type(tree) in (list, tuple):
        return {type(tree).__name__: [_tree_to_json(v) for v in tree]}
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_spec_leaf)[0]
    return {"node": type(tree).__name__,
            "leaves": [[jax.tree_util.keystr(p), _tree_to_json(v)] for p, v in leaves]}


def _key_to_json(key):
    if isinstance(key, (str, int, float, bool)) or key is None:
        return key
    raise TypeError(f"cannot write a plan whose spec tree has a dict key of type "
                    f"{type(key).__name__} ({key!r}); keys must be str, int, float, bool or None")


def _pairs(data, where: str, key_kind=None) -> list:
    if not isinstance(data, list) or not all(isinstance(p, list) and len(p) == 2 for p in data):
        raise PlanFormatError(f"{where}: expected a list of [key, value] pairs, got {_short(data)}")
    if key_kind is not None:
        for k, _ in data:
            if not isinstance(k, key_kind):
                raise PlanFormatError(f"{where}: bad key {_short(k)}")
    return data


def _tree_from_json(data, where: str) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict) or not data:
        raise PlanFormatError(f"{where}: expected a spec tree node (null or an object), "
                              f"got {_short(data)}")
    kind = next(iter(data))
    expected = {"spec": 1, "dict": 1, "list": 1, "tuple": 1, "namedtuple": 2, "node": 2}
    if kind not in expected or len(data) != expected[kind]:
        raise PlanFormatError(f"{where}: unknown spec tree node with keys {sorted(data)}")
    body = data[kind]
    if kind == "spec":
        return _spec_from_json(body, where)
    if kind == "dict":
        return {k: _tree_from_json(v, f"{where}[{k!r}]")
                for k, v in _pairs(body, where, (str, int, float, bool, type(None)))}
    if kind in ("list", "tuple"):
        if not isinstance(body, list):
            raise PlanFormatError(f"{where}: expected a list, got {_short(body)}")
        items = [_tree_from_json(v, f"{where}[{i}]") for i, v in enumerate(body)]
        return items if kind == "list" else tuple(items)
    if kind == "namedtuple":
        if not isinstance(body, str) or "fields" not in data:
            raise PlanFormatError(f"{where}: a namedtuple node needs a name and \"fields\"")
        fields = _pairs(data["fields"], where, str)
        cls = _namedtuple_type(body, tuple(k for k, _ in fields), where)
        return cls(*(_tree_from_json(v, f"{where}.{k}") for k, v in fields))
    if not isinstance(body, str) or "leaves" not in data:
        raise PlanFormatError(f"{where}: a node needs a type name and \"leaves\"")
    leaves = _pairs(data["leaves"], where, str)
    return SpecTreeNode(body, [(k, _tree_from_json(v, f"{where}{k}")) for k, v in leaves])


def _tree_specs(tree) -> list:
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_spec_leaf) if x is not None]


# ---------------------------------------------------------------- plan
def _plain(value):
    """numpy scalars → Python numbers, tuples → lists (so json.dumps accepts them)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _record_to_json(record) -> dict:
    return {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record)}


_FIELDS = ("format", "format_version", "method", "fingerprint", "mesh", "cluster", "in_specs",
           "out_specs", "inputs", "outputs", "value_specs", "operand_specs", "cost", "solver",
           "collectives", "top_ops", "warnings", "stages", "programs", "batch",
           "alternatives", "shapes", "remat")


def plan_to_dict(plan) -> dict:
    """The JSON object of ``plan`` (a :class:`~autoshard.Plan`)."""
    values, operands = _value_specs_to_json(plan.value_specs, plan.operand_specs)
    data = {
        "format": "autoshard-plan",
        "format_version": FORMAT_VERSION,
        "method": method_to_dict(plan.method),
        "fingerprint": plan.fingerprint,
        "mesh": {"shape": [int(n) for n in plan.mesh_shape],
                 "axis_names": list(plan.axis_names)},
        "cluster": json.loads(plan.cluster.to_json()),
        "in_specs": _tree_to_json(plan.in_specs),
        "out_specs": _tree_to_json(plan.out_specs),
        "inputs": [[p, _spec_to_json(s)] for p, s in zip(plan.in_paths, plan.flat_in_specs,
                                                         strict=True)],
        "outputs": [[p, _spec_to_json(s)] for p, s in zip(plan.out_paths, plan.flat_out_specs,
                                                          strict=True)],
        "value_specs": values,
        "operand_specs": operands,
        "cost": _record_to_json(plan.cost),
        "solver": None if plan.solver is None else _record_to_json(plan.solver),
        "collectives": [_record_to_json(c) for c in plan.collectives],
        "top_ops": [_record_to_json(o) for o in plan.top_ops],
        "warnings": list(plan.warnings),
        "stages": [_stage_to_json(st) for st in plan.stages],
        "programs": [_program_to_json(p) for p in plan.programs],
        "batch": {"arguments": list(plan.batch), "inferred": plan.batch_inferred},
        "alternatives": [_record_to_json(a) for a in plan.alternatives],
        "shapes": {"inputs": [list(s) for s in plan.in_shapes],
                   "outputs": [list(s) for s in plan.out_shapes]},
        "remat": None if plan.remat is None else {
            "turn": plan.remat.turn, "segments": [list(s) for s in plan.remat.segments]},
    }
    assert tuple(data) == _FIELDS
    return data


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number",
                        "list": "a list", "dict": "an object"}.get(k.__name__, k.__name__)
                       for k in kinds)


def _check(value, kind, where: str):
    """``value`` if it is a ``kind`` (bool is never an int or float here)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise PlanFormatError(f"{where}: expected {_type_name(kind)}, got {_short(value)}")
    return value


def _get(data: dict, key: str, kind, where="plan"):
    if key not in data:
        raise PlanFormatError(f"{where}: missing field {key!r}")
    return data[key] if kind is None else _check(data[key], kind, f"{where}.{key}")


_NUMBER = (int, float)
_FIELD_KINDS = {"str": str, "int": int, "float": _NUMBER}


def _record(cls, data, where):
    if not isinstance(data, dict):
        raise PlanFormatError(f"{where}: expected an object, got {_short(data)}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PlanFormatError(f"{where}: missing field(s) {missing}")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise PlanFormatError(f"{where}: unknown field(s) {unknown}; expected {names}")
    values = {}
    for f in fields:
        if f.name not in data:  # an optional field an older file lacks
            continue
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        value = data[f.name]
        if type_name in _FIELD_KINDS:
            _check(value, _FIELD_KINDS[type_name], f"{where}.{f.name}")
        elif type_name == "tuple[str, ...]":
            _check(value, list, f"{where}.{f.name}")
            value = tuple(_check(x, str, f"{where}.{f.name}[{i}]") for i, x in enumerate(value))
        elif type_name == "bool":
            _check(value, bool, f"{where}.{f.name}")
        values[f.name] = value
    return cls(**values)


def _value_specs_to_json(value_specs, operand_specs):
    return ([[int(v), _spec_to_json(s)] for v, s in value_specs],
            [[int(e), int(k), _spec_to_json(s)] for e, k, s in operand_specs])


def _value_specs_from_json(data, where, axis_names):
    value_specs = []
    for i, item in enumerate(_get(data, "value_specs", list, where)):
        at = f"{where}.value_specs[{i}]"
        if not (isinstance(item, list) and len(item) == 2):
            raise PlanFormatError(f"{at}: expected [value id, spec], got {_short(item)}")
        check_ids(item[:1], at, "a value id")
        value_specs.append((item[0], _spec_from_json(item[1], at, axis_names)))
    operand_specs = []
    for i, item in enumerate(_get(data, "operand_specs", list, where)):
        at = f"{where}.operand_specs[{i}]"
        if not (isinstance(item, list) and len(item) == 3):
            raise PlanFormatError(f"{at}: expected [equation, operand, spec], "
                                  f"got {_short(item)}")
        check_ids(item[:2], at, "an equation or operand number")
        operand_specs.append((item[0], item[1], _spec_from_json(item[2], at, axis_names)))
    return tuple(value_specs), tuple(operand_specs)


def _program_to_json(program: ProgramSpecs) -> dict:
    values, operands = _value_specs_to_json(program.value_specs, program.operand_specs)
    return {"name": program.name,
            "inputs": [_spec_to_json(s) for s in program.flat_in_specs],
            "outputs": [_spec_to_json(s) for s in program.flat_out_specs],
            "value_specs": values, "operand_specs": operands, "mesh_shape":
            list(program.mesh_shape), "flops": program.flops, "bytes_accessed": program.bytes_accessed}


def _program_from_json(data, where, axis_names) -> ProgramSpecs:
    if not isinstance(data, dict):
        raise PlanFormatError(f"{where}: expected an object, got {_short(data)}")
    fields = {"name", "inputs", "outputs", "value_specs", "operand_specs"}
    work = {"mesh_shape", "flops", "bytes_accessed"}  # absent in older files
    if not fields <= set(data) <= fields | work:
        raise PlanFormatError(f"{where}: expected the fields {sorted(fields)} (and "
                              f"optionally {sorted(work)}), got {sorted(data)}")
    specs = {key: tuple(_spec_from_json(x, f"{where}.{key}[{i}]", axis_names)
                        for i, x in enumerate(_get(data, key, list, where)))
             for key in ("inputs", "outputs")}
    values, operands = _value_specs_from_json(data, where, axis_names)
    mesh_shape = _get(data, "mesh_shape", list, where) if "mesh_shape" in data else []
    check_ids(mesh_shape, f"{where}.mesh_shape", "a mesh axis size")
    work = {key: float(_get(data, key, _NUMBER, where)) if key in data else 0.0
            for key in ("flops", "bytes_accessed")}
    return ProgramSpecs(_get(data, "name", str, where), specs["inputs"], specs["outputs"],
                        values, operands, tuple(mesh_shape), **work)


def _stage_to_json(stage):
    if not isinstance(stage, StageAssignment):
        return _plain(stage)
    data = _record_to_json(stage)
    data["cost"] = _record_to_json(stage.cost)
    data["apply_cost"] = None if stage.apply_cost is None else _record_to_json(stage.apply_cost)
    return {"stage": data}


def _stage_from_json(item, where):
    if not (isinstance(item, dict) and set(item) == {"stage"}):
        return _freeze(item)
    data = item["stage"]
    if not isinstance(data, dict):
        raise PlanFormatError(f"{where}.stage: expected an object, got {_short(data)}")
    data = dict(data)
    for key in ("cost", "apply_cost"):
        if key not in data:
            raise PlanFormatError(f"{where}.stage: missing field(s) ['{key}']")
    data["cost"] = check_costs(_record(StageCost, data["cost"], f"{where}.stage.cost"),
                               f"{where}.stage.cost")
    if data["apply_cost"] is not None:
        data["apply_cost"] = check_costs(_record(PlanCost, data["apply_cost"],
                                                 f"{where}.stage.apply_cost"),
                                         f"{where}.stage.apply_cost")
    for key in ("layers", "mesh_shape", "device_ids"):
        value = data.get(key)
        if not (isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                                for x in value)):
            raise PlanFormatError(f"{where}.stage.{key}: expected a list of integers, got "
                                  f"{_short(value)}")
        data[key] = tuple(value)
    stage = _record(StageAssignment, data, f"{where}.stage")
    if stage.schedule not in ("1f1b", "gpipe"):
        raise PlanFormatError(f"{where}.stage.schedule: expected '1f1b' or 'gpipe', got "
                              f"{_short(stage.schedule)}")
    return stage


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def _flat_specs(data, key, axis_names) -> tuple[tuple[str, ...], tuple[PartitionSpec, ...]]:
    pairs = _pairs(_get(data, key, list), f"plan.{key}", str)
    paths = tuple(p for p, _ in pairs)
    specs = tuple(_spec_from_json(s, f"plan.{key}[{p!r}]", axis_names) for p, s in pairs)
    return paths, specs


def _check_tree(tree, flat, tree_key, flat_key):
    specs = _tree_specs(tree)
    if len(specs) != len(flat):
        raise PlanFormatError(f"plan.{tree_key}: has {len(specs)} specs but plan.{flat_key} "
                              f"has {len(flat)}")
    for i, (a, b) in enumerate(zip(specs, flat)):
        if a != b:
            raise PlanFormatError(f"plan.{tree_key}: leaf {i} is {a} but plan.{flat_key}[{i}] "
                                  f"is {b}")


def plan_fields_from_dict(data) -> dict:
    """The fields of the :class:`~autoshard.Plan` a JSON object describes, checked."""
    if not isinstance(data, dict) or data.get("format") != "autoshard-plan":
        raise PlanFormatError("not an autoshard plan file (expected a JSON object with "
                              "\"format\": \"autoshard-plan\")")
    check_json_tree(data)
    version = _get(data, "format_version", int)
    if version not in (1, FORMAT_VERSION):
        raise PlanFormatError(f"plan.format_version: version {version} is not supported "
                              f"(this autoshard reads versions 1 to {FORMAT_VERSION})")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise PlanFormatError(f"plan: unknown field(s) {unknown}")
    mesh = _get(data, "mesh", dict)
    shape = tuple(_get(mesh, "shape", list, "plan.mesh"))
    names = tuple(_get(mesh, "axis_names", list, "plan.mesh"))
    if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                            for n in shape):
        raise PlanFormatError(f"plan.mesh.shape: expected a non-empty list of positive "
                              f"integers, got {_short(list(shape))}")
    if len(shape) != len(names) or len(set(names)) != len(names) or \
            not all(isinstance(n, str) and n for n in names):
        raise PlanFormatError(f"plan.mesh.axis_names: need {len(shape)} distinct names for "
                              f"shape {list(shape)}, got {_short(list(names))}")
    check_mesh(shape)
    cluster_data = _get(data, "cluster", (dict, str))
    try:
        cluster = Cluster.from_json(cluster_data if isinstance(cluster_data, str)
                                    else json.dumps(cluster_data))
    except ValueError as err:
        raise PlanFormatError(f"plan.cluster: {err}") from None
    in_paths, flat_in = _flat_specs(data, "inputs", names)
    out_paths, flat_out = _flat_specs(data, "outputs", names)
    in_specs = _tree_from_json(_get(data, "in_specs", None), "plan.in_specs")
    out_specs = _tree_from_json(_get(data, "out_specs", None), "plan.out_specs")
    _check_tree(in_specs, flat_in, "in_specs", "inputs")
    _check_tree(out_specs, flat_out, "out_specs", "outputs")

    value_specs, operand_specs = _value_specs_from_json(data, "plan", names)
    programs = data.get("programs", [])   # absent in files written before pipelines kept it
    _check(programs, list, "plan.programs")
    solver = _get(data, "solver", (dict, type(None)))
    warnings = _get(data, "warnings", list)
    for i, w in enumerate(warnings):
        _check(w, str, f"plan.warnings[{i}]")
    stages = tuple(_stage_from_json(st, f"plan.stages[{i}]")
                   for i, st in enumerate(_get(data, "stages", list)))
    check_stages(stages)
    batch = data.get("batch", {"arguments": [], "inferred": False})  # absent in older files
    _check(batch, dict, "plan.batch")
    arguments = _get(batch, "arguments", list, "plan.batch")
    for i, a in enumerate(arguments):
        _check(a, str, f"plan.batch.arguments[{i}]")
    inferred = _get(batch, "inferred", bool, "plan.batch")
    alternatives = data.get("alternatives", [])  # absent in older files
    _check(alternatives, list, "plan.alternatives")
    shapes = data.get("shapes", {"inputs": [], "outputs": []})  # absent in older files
    _check(shapes, dict, "plan.shapes")
    in_shapes = check_shapes(_get(shapes, "inputs", list, "plan.shapes"), "plan.shapes.inputs",
                             len(flat_in))
    out_shapes = check_shapes(_get(shapes, "outputs", list, "plan.shapes"),
                              "plan.shapes.outputs", len(flat_out))
    return dict(
        method=_method_from_json(_get(data, "method", str if version == 1 else dict), version),
        mesh_shape=shape, axis_names=names, cluster=cluster,
        in_specs=in_specs, out_specs=out_specs,
        cost=check_costs(_record(PlanCost, _get(data, "cost", dict), "plan.cost"), "plan.cost"),
        solver=None if solver is None else check_costs(_record(SolverInfo, solver, "plan.solver"),
                                                       "plan.solver"),
        fingerprint=_get(data, "fingerprint", str),
        in_paths=in_paths, out_paths=out_paths, flat_in_specs=flat_in, flat_out_specs=flat_out,
        value_specs=tuple(value_specs), operand_specs=tuple(operand_specs),
        collectives=tuple(check_costs(_record(Collective, c, f"plan.collectives[{i}]"),
                                      f"plan.collectives[{i}]")
                          for i, c in enumerate(_get(data, "collectives", list))),
        top_ops=tuple(check_costs(_record(OpCost, o, f"plan.top_ops[{i}]"), f"plan.top_ops[{i}]")
                      for i, o in enumerate(_get(data, "top_ops", list))),
        warnings=tuple(warnings),
        stages=stages,
        programs=tuple(_program_from_json(p, f"plan.programs[{i}]", names)
                       for i, p in enumerate(programs)),
        batch=tuple(arguments), batch_inferred=inferred,
        alternatives=tuple(
            check_costs(_record(Alternative, a, f"plan.alternatives[{i}]"),
                        f"plan.alternatives[{i}]") for i, a in enumerate(alternatives)),
        in_shapes=in_shapes, out_shapes=out_shapes, remat=check_remat(data.get("remat")),
    )


def plan_fields_from_json(text: str | bytes) -> dict:
    """The fields of the :class:`~autoshard.Plan` a plan file describes, checked."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as err:
        raise PlanFormatError(f"plan file is not valid JSON: {err}") from None
    except RecursionError:
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        raise PlanFormatError(f"plan.{deepest_field(text)}: nested deeper than {MAX_DEPTH} "
                              f"levels, too deep to read; a plan file is never this "
                              f"deep") from None
    return plan_fields_from_dict(data)


def _method_from_json(data, version: int):
    try:
        return method_from_dict(data) if version > 1 else method_from_repr(data)
    except ValueError as err:
        raise PlanFormatError(f"plan.method: {err}") from None
