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
    loops                          [{equation, inputs: [spec], outputs: [spec], value_specs,
                                   operand_specs, inputs_via: [[spec]], outputs_via:
                                   [[spec]]}]: the layouts pinned inside each
                                   loop over layers planned once, its body's value ids and
                                   equations (absent in older files: none)

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

import dataclasses
import json

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
    LoopLayouts,
    OpCost,
    PlanCost,
    ProgramSpecs,
    SolverInfo,
    StageAssignment,
    StageCost,
)
from .spec_trees import SpecTreeNode as SpecTreeNode
from .spec_trees import key_value_pairs, short, spec_from_json, spec_to_json, tree_from_json, tree_specs, tree_to_json

#: version 2 writes the method as an object; version 1 files (the method's repr) still load
FORMAT_VERSION = 2


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
           "alternatives", "shapes", "remat", "loops")


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
        "in_specs": tree_to_json(plan.in_specs),
        "out_specs": tree_to_json(plan.out_specs),
        "inputs": [[p, spec_to_json(s)] for p, s in zip(plan.in_paths, plan.flat_in_specs,
                                                         strict=True)],
        "outputs": [[p, spec_to_json(s)] for p, s in zip(plan.out_paths, plan.flat_out_specs,
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
        "loops": [_loop_to_json(loop) for loop in plan.loops],
    }
    assert tuple(data) == _FIELDS
    return data


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number",
                        "list": "a list", "dict": "an object"}.get(k.__name__, k.__name__)
                       for k in kinds)


def _check(value, kind, where: str):
    """``value`` if it is a ``kind`` (bool is never an int or float here)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise PlanFormatError(f"{where}: expected {_type_name(kind)}, got {short(value)}")
    return value


def _get(data: dict, key: str, kind, where="plan"):
    if key not in data:
        raise PlanFormatError(f"{where}: missing field {key!r}")
    return data[key] if kind is None else _check(data[key], kind, f"{where}.{key}")


_NUMBER = (int, float)
_FIELD_KINDS = {"str": str, "int": int, "float": _NUMBER}


def _record(cls, data, where):
    if not isinstance(data, dict):
        raise PlanFormatError(f"{where}: expected an object, got {short(data)}")
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
    return ([[int(v), spec_to_json(s)] for v, s in value_specs],
            [[int(e), int(k), spec_to_json(s)] for e, k, s in operand_specs])


def _value_specs_from_json(data, where, axis_names):
    value_specs = []
    for i, item in enumerate(_get(data, "value_specs", list, where)):
        at = f"{where}.value_specs[{i}]"
        if not (isinstance(item, list) and len(item) == 2):
            raise PlanFormatError(f"{at}: expected [value id, spec], got {short(item)}")
        check_ids(item[:1], at, "a value id")
        value_specs.append((item[0], spec_from_json(item[1], at, axis_names)))
    operand_specs = []
    for i, item in enumerate(_get(data, "operand_specs", list, where)):
        at = f"{where}.operand_specs[{i}]"
        if not (isinstance(item, list) and len(item) == 3):
            raise PlanFormatError(f"{at}: expected [equation, operand, spec], "
                                  f"got {short(item)}")
        check_ids(item[:2], at, "an equation or operand number")
        operand_specs.append((item[0], item[1], spec_from_json(item[2], at, axis_names)))
    return tuple(value_specs), tuple(operand_specs)


def _program_to_json(program: ProgramSpecs) -> dict:
    values, operands = _value_specs_to_json(program.value_specs, program.operand_specs)
    return {"name": program.name,
            "inputs": [spec_to_json(s) for s in program.flat_in_specs],
            "outputs": [spec_to_json(s) for s in program.flat_out_specs],
            "value_specs": values, "operand_specs": operands, "mesh_shape":
            list(program.mesh_shape), "flops": program.flops, "bytes_accessed": program.bytes_accessed}


def _program_from_json(data, where, axis_names) -> ProgramSpecs:
    if not isinstance(data, dict):
        raise PlanFormatError(f"{where}: expected an object, got {short(data)}")
    fields = {"name", "inputs", "outputs", "value_specs", "operand_specs"}
    work = {"mesh_shape", "flops", "bytes_accessed"}  # absent in older files
    if not fields <= set(data) <= fields | work:
        raise PlanFormatError(f"{where}: expected the fields {sorted(fields)} (and "
                              f"optionally {sorted(work)}), got {sorted(data)}")
    specs = {key: tuple(spec_from_json(x, f"{where}.{key}[{i}]", axis_names)
                        for i, x in enumerate(_get(data, key, list, where)))
             for key in ("inputs", "outputs")}
    values, operands = _value_specs_from_json(data, where, axis_names)
    mesh_shape = _get(data, "mesh_shape", list, where) if "mesh_shape" in data else []
    check_ids(mesh_shape, f"{where}.mesh_shape", "a mesh axis size")
    work = {key: float(_get(data, key, _NUMBER, where)) if key in data else 0.0
            for key in ("flops", "bytes_accessed")}
    return ProgramSpecs(_get(data, "name", str, where), specs["inputs"], specs["outputs"],
                        values, operands, tuple(mesh_shape), **work)


def _loop_to_json(loop: LoopLayouts) -> dict:
    values, operands = _value_specs_to_json(loop.value_specs, loop.operand_specs)
    return {"equation": int(loop.eqn),
            "inputs": [spec_to_json(s) for s in loop.flat_in_specs],
            "outputs": [spec_to_json(s) for s in loop.flat_out_specs],
            "value_specs": values, "operand_specs": operands,
            "inputs_via": [[spec_to_json(s) for s in chain] for chain in loop.in_via],
            "outputs_via": [[spec_to_json(s) for s in chain] for chain in loop.out_via]}


def _loop_from_json(data, where, axis_names) -> LoopLayouts:
    fields = {"equation", "inputs", "outputs", "value_specs", "operand_specs", "inputs_via",
              "outputs_via"}
    if not isinstance(data, dict) or set(data) != fields:
        raise PlanFormatError(f"{where}: expected an object with the fields {sorted(fields)}, "
                              f"got {short(data if not isinstance(data, dict) else sorted(data))}")
    check_ids([data["equation"]], f"{where}.equation", "an equation number")
    specs = {key: tuple(spec_from_json(x, f"{where}.{key}[{i}]", axis_names)
                        for i, x in enumerate(_get(data, key, list, where)))
             for key in ("inputs", "outputs")}
    via = {key: tuple(tuple(spec_from_json(x, f"{where}.{key}[{i}][{j}]", axis_names)
                            for j, x in enumerate(_check(chain, list, f"{where}.{key}[{i}]")))
                      for i, chain in enumerate(_get(data, key, list, where)))
           for key in ("inputs_via", "outputs_via")}
    for key, flat in (("inputs_via", "inputs"), ("outputs_via", "outputs")):
        if via[key] and len(via[key]) != len(specs[flat]):
            raise PlanFormatError(f"{where}.{key}: expected one list per entry of {flat} "
                                  f"({len(specs[flat])}), got {len(via[key])}")
    return LoopLayouts(data["equation"], specs["inputs"], specs["outputs"],
                       *_value_specs_from_json(data, where, axis_names), via["inputs_via"],
                       via["outputs_via"])


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
        raise PlanFormatError(f"{where}.stage: expected an object, got {short(data)}")
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
                                  f"{short(value)}")
        data[key] = tuple(value)
    stage = _record(StageAssignment, data, f"{where}.stage")
    if stage.schedule not in ("1f1b", "gpipe"):
        raise PlanFormatError(f"{where}.stage.schedule: expected '1f1b' or 'gpipe', got "
                              f"{short(stage.schedule)}")
    return stage


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def _flat_specs(data, key, axis_names) -> tuple[tuple[str, ...], tuple[PartitionSpec, ...]]:
    pairs = key_value_pairs(_get(data, key, list), f"plan.{key}", str)
    paths = tuple(p for p, _ in pairs)
    specs = tuple(spec_from_json(s, f"plan.{key}[{p!r}]", axis_names) for p, s in pairs)
    return paths, specs


def _check_tree(tree, flat, tree_key, flat_key):
    specs = tree_specs(tree)
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
                              f"integers, got {short(list(shape))}")
    if len(shape) != len(names) or len(set(names)) != len(names) or \
            not all(isinstance(n, str) and n for n in names):
        raise PlanFormatError(f"plan.mesh.axis_names: need {len(shape)} distinct names for "
                              f"shape {list(shape)}, got {short(list(names))}")
    check_mesh(shape)
    cluster_data = _get(data, "cluster", (dict, str))
    try:
        cluster = Cluster.from_json(cluster_data if isinstance(cluster_data, str)
                                    else json.dumps(cluster_data))
    except ValueError as err:
        raise PlanFormatError(f"plan.cluster: {err}") from None
    in_paths, flat_in = _flat_specs(data, "inputs", names)
    out_paths, flat_out = _flat_specs(data, "outputs", names)
    in_specs = tree_from_json(_get(data, "in_specs", None), "plan.in_specs")
    out_specs = tree_from_json(_get(data, "out_specs", None), "plan.out_specs")
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
        loops=tuple(_loop_from_json(x, f"plan.loops[{i}]", names)
                    for i, x in enumerate(_check(data.get("loops", []), list, "plan.loops"))),
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
