"""Plan ⇄ JSON. The format is versioned; loading validates and says what is wrong."""
from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import PartitionSpec

from ._plan import FORMAT_VERSION, Collective, OpCost, Plan, PlanCost, SolverInfo
from .cost_model import Cluster


class PlanFormatError(ValueError):
    """A plan file that cannot be read: the message names the field and the problem."""


# ---------------------------------------------------------------- specs
def _spec_to_json(spec: PartitionSpec) -> list:
    return [None if e is None else e if isinstance(e, str) else list(e) for e in spec]


def _spec_from_json(data, where: str) -> PartitionSpec:
    if not isinstance(data, list):
        raise PlanFormatError(f"{where}: expected a list of axis names/null, got {data!r}")
    entries = []
    for e in data:
        if e is None or isinstance(e, str):
            entries.append(e)
        elif isinstance(e, list) and all(isinstance(a, str) for a in e):
            entries.append(tuple(e))
        else:
            raise PlanFormatError(f"{where}: bad entry {e!r}; expected null, an axis name "
                                  "or a list of axis names")
    return PartitionSpec(*entries)


def _tree_to_json(tree) -> Any:
    """Encode a pytree of PartitionSpec/None made of dicts, lists and tuples."""
    if tree is None:
        return None
    if isinstance(tree, PartitionSpec):
        return {"spec": _spec_to_json(tree)}
    if isinstance(tree, dict):
        return {"dict": [[k, _tree_to_json(v)] for k, v in tree.items()]}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return {"namedtuple": type(tree).__name__,
                "fields": [[k, _tree_to_json(v)] for k, v in zip(tree._fields, tree)]}
    if isinstance(tree, (list, tuple)):
        return {type(tree).__name__: [_tree_to_json(v) for v in tree]}
    import jax
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)[0]
    return {"node": type(tree).__name__,
            "leaves": [[jax.tree_util.keystr(p), _tree_to_json(v)] for p, v in leaves]}


def _tree_from_json(data, where: str) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict) or len(data) not in (1, 2):
        raise PlanFormatError(f"{where}: expected a spec tree node, got {data!r:.80}")
    if "spec" in data:
        return _spec_from_json(data["spec"], where)
    if "dict" in data:
        return {k: _tree_from_json(v, f"{where}[{k!r}]") for k, v in data["dict"]}
    if "list" in data:
        return [_tree_from_json(v, f"{where}[{i}]") for i, v in enumerate(data["list"])]
    if "tuple" in data:
        return tuple(_tree_from_json(v, f"{where}[{i}]") for i, v in enumerate(data["tuple"]))
    if "namedtuple" in data:  # restored as a dict of its fields
        return {k: _tree_from_json(v, f"{where}.{k}") for k, v in data["fields"]}
    if "node" in data:  # restored as a dict keyed by path
        return {k: _tree_from_json(v, f"{where}{k}") for k, v in data["leaves"]}
    raise PlanFormatError(f"{where}: unknown spec tree node with keys {sorted(data)}")


# ---------------------------------------------------------------- plan
def plan_to_dict(plan: Plan) -> dict:
    return {
        "format": "autoshard-plan",
        "format_version": FORMAT_VERSION,
        "method": plan.method,
        "fingerprint": plan.fingerprint,
        "mesh": {"shape": list(plan.mesh_shape), "axis_names": list(plan.axis_names)},
        "cluster": plan.cluster.to_json(),
        "in_specs": _tree_to_json(plan.in_specs),
        "out_specs": _tree_to_json(plan.out_specs),
        "inputs": [[p, _spec_to_json(s)] for p, s in zip(plan.in_paths, plan.flat_in_specs)],
        "outputs": [[p, _spec_to_json(s)] for p, s in zip(plan.out_paths, plan.flat_out_specs)],
        "value_specs": [[v, _spec_to_json(s)] for v, s in plan.value_specs],
        "operand_specs": [[e, k, _spec_to_json(s)] for e, k, s in plan.operand_specs],
        "cost": dataclasses.asdict(plan.cost),
        "solver": None if plan.solver is None else dataclasses.asdict(plan.solver),
        "collectives": [dataclasses.asdict(c) for c in plan.collectives],
        "top_ops": [dataclasses.asdict(o) for o in plan.top_ops],
        "warnings": list(plan.warnings),
        "stages": list(plan.stages),
    }


def _get(data: dict, key: str, kind, where="plan"):
    if key not in data:
        raise PlanFormatError(f"{where}: missing field {key!r}")
    value = data[key]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise PlanFormatError(f"{where}.{key}: expected {names}, got {type(value).__name__}")
    return value


def _record(cls, data, where):
    if not isinstance(data, dict):
        raise PlanFormatError(f"{where}: expected an object, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in data]
    if missing:
        raise PlanFormatError(f"{where}: missing field(s) {missing}")
    return cls(**{n: data[n] for n in names})


def plan_from_dict(data) -> Plan:
    if not isinstance(data, dict) or data.get("format") != "autoshard-plan":
        raise PlanFormatError("not an autoshard plan file (expected an object with "
                              "\"format\": \"autoshard-plan\")")
    version = _get(data, "format_version", int)
    if version != FORMAT_VERSION:
        raise PlanFormatError(f"plan format version {version} is not supported "
                              f"(this autoshard reads version {FORMAT_VERSION})")
    mesh = _get(data, "mesh", dict)
    shape = tuple(_get(mesh, "shape", list, "plan.mesh"))
    names = tuple(_get(mesh, "axis_names", list, "plan.mesh"))
    if len(shape) != len(names) or not all(isinstance(n, int) and n > 0 for n in shape):
        raise PlanFormatError(f"plan.mesh: shape {shape} and axis names {names} do not match")
    try:
        cluster = Cluster.from_json(_get(data, "cluster", str))
    except ValueError as err:
        raise PlanFormatError(f"plan.cluster: {err}") from None
    inputs = _get(data, "inputs", list)
    outputs = _get(data, "outputs", list)
    solver = data.get("solver")
    return Plan(
        method=_get(data, "method", str),
        mesh_shape=shape, axis_names=names, cluster=cluster,
        in_specs=_tree_from_json(data.get("in_specs"), "plan.in_specs"),
        out_specs=_tree_from_json(data.get("out_specs"), "plan.out_specs"),
        cost=_record(PlanCost, _get(data, "cost", dict), "plan.cost"),
        solver=None if solver is None else _record(SolverInfo, solver, "plan.solver"),
        fingerprint=_get(data, "fingerprint", str),
        in_paths=tuple(p for p, _ in inputs), out_paths=tuple(p for p, _ in outputs),
        flat_in_specs=tuple(_spec_from_json(s, f"plan.inputs[{p!r}]") for p, s in inputs),
        flat_out_specs=tuple(_spec_from_json(s, f"plan.outputs[{p!r}]") for p, s in outputs),
        value_specs=tuple((int(v), _spec_from_json(s, "plan.value_specs"))
                          for v, s in _get(data, "value_specs", list)),
        operand_specs=tuple((int(e), int(k), _spec_from_json(s, "plan.operand_specs"))
                            for e, k, s in _get(data, "operand_specs", list)),
        collectives=tuple(_record(Collective, c, "plan.collectives")
                          for c in _get(data, "collectives", list)),
        top_ops=tuple(_record(OpCost, o, "plan.top_ops") for o in _get(data, "top_ops", list)),
        warnings=tuple(_get(data, "warnings", list)),
        stages=tuple(_get(data, "stages", list)),
    )
