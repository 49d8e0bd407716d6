"""What a plan file must be beyond its field types: a bounded JSON tree (depth, integers a
machine word holds, finite numbers), costs that are finite and non-negative, pipeline
stages on disjoint devices, shardings that fit the program they are applied to, and a
plan reused with the method and mesh it was made for.

Every problem is a :class:`~autoshard.PlanFormatError` (or, for :func:`specs_misfit`, a
sentence the caller puts in its ``ValueError``) naming the field.
"""
from __future__ import annotations

import dataclasses
import math
import re

from autoshard.errors import PlanFormatError
from autoshard.ir.program import Literal
from autoshard.ir.remat import Rematerialization

#: JSON nesting a plan file may have: a pytree level takes 3 (an object, its pairs, a
#: pair), so about 60 levels of nested parameters, far beyond real models.
MAX_DEPTH = 200
#: integers a plan may hold (bytes, counts, ids): what an int64 holds.
MAX_INT = 2**63 - 1
#: the largest magnitude of a number: sums of a few stay finite.
MAX_FLOAT = 1e300
#: devices a plan's mesh may have.
MAX_DEVICES = 2**31


def _path_text(path, limit: int = 8) -> str:
    """A linked path ``(parent, key)`` as ``plan.stages[0].stage`` (its first ``limit``
    keys, then ``…``)."""
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    keys.reverse()
    text = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys[:limit])
    return "plan" + text + ("…" if len(keys) > limit else "")


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"\s*:?|[\[\]{}]')


def deepest_field(text: str, max_depth: int = MAX_DEPTH) -> str | None:
    """The top-level field of a plan file's text under which its JSON nests deeper than
    ``max_depth`` (read without parsing, for text too deep for ``json.loads``)."""
    depth, field = 0, None
    for token in _TOKENS.finditer(text):
        t = token.group()
        if t in "[{":
            depth += 1
            if depth > max_depth:
                return field or "?"
        elif t in "]}":
            depth -= 1
        elif depth == 1 and t.endswith(":"):
            field = t.rstrip(": \t\r\n")[1:-1]
    return None


def _bad_number(value) -> str | None:
    """Why a JSON number cannot be in a plan, or ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) > MAX_INT:
        return f"an integer of {len(str(abs(value)))} digits, beyond 64 bits"
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= MAX_FLOAT):
        return f"{value!r}, not a finite number (within ±{MAX_FLOAT:g})"
    return None


def check_json_tree(data, max_depth: int = MAX_DEPTH) -> None:
    """``PlanFormatError`` naming the place where ``data`` (a parsed plan file) nests
    deeper than ``max_depth`` or holds NaN, an infinity, or an integer beyond 64 bits.
    Iterative, so no file can exhaust the stack here."""
    stack = [(data, 0, None)]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= max_depth:
                raise PlanFormatError(f"{_path_text(path)}: nested deeper than {max_depth} "
                                      f"levels; a plan file is never this deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, depth + 1, (path, k)) for k, v in items)
        elif isinstance(value, (int, float)):
            problem = _bad_number(value)
            if problem is not None:
                raise PlanFormatError(f"{_path_text(path)}: got {problem}")


#: rounding a planner's sums may leave below zero (seconds); a corrupt cost is far below
_ROUNDING = 1e-9
#: solver figures that may be negative: an objective and its bound are differences
_SIGNED = frozenset({"objective_s", "lower_bound_s"})


def check_costs(record, where: str):
    """``record`` (a cost or statistics record) after checking that its numbers are
    finite and not negative (a cost or a count below zero is a corrupt file)."""
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if not math.isfinite(value) or value < -_ROUNDING and field.name not in _SIGNED:
            raise PlanFormatError(f"{where}.{field.name}: expected a finite number >= 0, "
                                  f"got {value!r}")
    return record


def check_ids(items, where: str, what: str) -> None:
    """``PlanFormatError`` unless every id in ``items`` is an integer >= 0."""
    for i, value in enumerate(items):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PlanFormatError(f"{where}[{i}]: expected {what} (an integer >= 0), got "
                                  f"{value!r}")


def check_mesh(shape, where: str = "plan.mesh.shape") -> None:
    """``PlanFormatError`` when a mesh has more than :data:`MAX_DEVICES` devices."""
    if math.prod(shape) > MAX_DEVICES:
        raise PlanFormatError(f"{where}: {list(shape)} makes {math.prod(shape)} devices, more "
                              f"than {MAX_DEVICES}")


def check_stages(stages, where: str = "plan.stages") -> None:
    """Pipeline stages (``StageAssignment`` records among ``stages``): each sub-mesh
    holds as many distinct devices as its shape says, no device is in two stages, and all
    stages agree on the micro-batches and schedule."""
    owner: dict[int, int] = {}
    first = None
    for s, stage in enumerate(stages):
        if not hasattr(stage, "device_ids"):
            continue
        at = f"{where}[{s}].stage"
        check_mesh(stage.mesh_shape, f"{at}.mesh_shape")
        if not stage.mesh_shape or any(n < 1 for n in stage.mesh_shape):
            raise PlanFormatError(f"{at}.mesh_shape: expected positive sizes, got "
                                  f"{list(stage.mesh_shape)}")
        check_ids(stage.device_ids, f"{at}.device_ids", "a device id")
        check_ids(stage.layers, f"{at}.layers", "a layer number")
        if len(stage.device_ids) != math.prod(stage.mesh_shape):
            raise PlanFormatError(f"{at}.device_ids: {len(stage.device_ids)} devices for a "
                                  f"sub-mesh of shape {list(stage.mesh_shape)}")
        for d in stage.device_ids:
            if d in owner:
                other = "itself" if owner[d] == s else f"stage {owner[d]}"
                raise PlanFormatError(f"{at}.device_ids: device {d} is also in {other}; "
                                      f"pipeline stages run on disjoint devices")
            owner[d] = s
        if stage.num_microbatches < 1:
            raise PlanFormatError(f"{at}.num_microbatches: expected >= 1, got "
                                  f"{stage.num_microbatches}")
        if first is None:
            first = stage
        elif (stage.num_microbatches, stage.schedule) != (first.num_microbatches,
                                                          first.schedule):
            raise PlanFormatError(f"{at}: {stage.num_microbatches} micro-batches under "
                                  f"{stage.schedule}, but the first stage has "
                                  f"{first.num_microbatches} under {first.schedule}")


def specs_misfit(program, flat_in, flat_out, value_specs, operand_specs) -> str | None:
    """Why shardings do not fit ``program`` (another number of inputs or outputs, a spec
    with more entries than its value has dimensions, a value or equation it lacks, an
    operand index past an equation's operands or on a literal), or ``None`` when they fit."""
    if (len(flat_in), len(flat_out)) != (len(program.invars), len(program.outvars)):
        return (f"has {len(flat_in)} inputs and {len(flat_out)} outputs, but the program has "
                f"{len(program.invars)} and {len(program.outvars)}")
    avals = program.avals
    for kind, values, specs in (("input", program.invars, flat_in),
                                ("output", program.outvars, flat_out)):
        for i, (v, spec) in enumerate(zip(values, specs)):
            rank = len(avals[v].shape) if not isinstance(v, Literal) else 0
            if len(spec) > rank:
                return f"gives {kind} {i} the spec {spec}, but it has {rank} dimension(s)"
    for v, spec in value_specs:
        if not 0 <= v < len(avals):
            return f"pins value {v}, but the program has {len(avals)} values"
        if len(spec) > len(avals[v].shape):
            return (f"pins value {v} to {spec}, but it has {len(avals[v].shape)} "
                    f"dimension(s)")
    for e, k, spec in operand_specs:
        if not 0 <= e < len(program.eqns):
            return (f"reshards an operand of equation {e}, but the program has "
                    f"{len(program.eqns)} equations")
        inputs = program.eqns[e].inputs
        if not 0 <= k < len(inputs) or isinstance(inputs[k], Literal):
            return (f"reshards operand {k} of equation {e} ({program.eqns[e].primitive.name}), "
                    f"which has {len(inputs)} operand(s)"
                    + (", that one a constant" if 0 <= k < len(inputs) else ""))
        if len(spec) > len(avals[inputs[k]].shape):
            return (f"reshards operand {k} of equation {e} to {spec}, but it has "
                    f"{len(avals[inputs[k]].shape)} dimension(s)")
    return None


def loops_misfit(program, loops, body_of) -> str | None:
    """Why a plan's :class:`~autoshard.plan.parts.LoopLayouts` do not fit ``program`` (an
    equation that is no scan, a body the layouts do not fit: :func:`specs_misfit`), or
    ``None``; ``body_of(eqn)``: a scan equation's body as a program of its own."""
    for loop in loops:
        if not 0 <= loop.eqn < len(program.eqns) or \
                program.eqns[loop.eqn].primitive.name != "scan":
            return (f"pins layouts inside a loop at equation {loop.eqn}, but that equation "
                    f"is not a scan of the program")
        body = body_of(program.eqns[loop.eqn])
        misfit = specs_misfit(body, loop.flat_in_specs, loop.flat_out_specs, loop.value_specs,
                              loop.operand_specs)
        if misfit is not None:
            return f"(inside the loop at equation {loop.eqn}) {misfit}"
    return None


def check_shapes(items: list, where: str, count: int) -> tuple[tuple[int, ...], ...]:
    """A plan file's shapes of its flat inputs or outputs: empty (not recorded), or one
    list of dim sizes per input/output; ``PlanFormatError`` naming the entry otherwise."""
    if items and len(items) != count:
        raise PlanFormatError(f"{where}: {len(items)} shapes for {count} values")
    result = []
    for i, shape in enumerate(items):
        if not isinstance(shape, list):
            raise PlanFormatError(f"{where}[{i}]: expected a list of dim sizes, got "
                                  f"{type(shape).__name__}")
        check_ids(shape, f"{where}[{i}]", "a dim size")
        if len(shape) > 64 or any(d >= 2**62 for d in shape):
            raise PlanFormatError(f"{where}[{i}]: not an array shape ({len(shape)} dims, "
                                  f"largest {max(shape, default=0)})")
        result.append(tuple(shape))
    return tuple(result)


def check_remat(data, where: str = "plan.remat") -> Rematerialization | None:
    """The :class:`Rematerialization` ``data`` describes (``None`` for ``null``): ``{"turn":
    equation, "segments": [[start, stop], ...]}``, ordered disjoint ranges before the turn."""
    if data is None:
        return None
    is_index = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0  # noqa: E731
    if not isinstance(data, dict) or set(data) != {"turn", "segments"} or \
            not is_index(data["turn"]) or not isinstance(data["segments"], list) or \
            not all(isinstance(s, list) and len(s) == 2 and all(map(is_index, s))
                    for s in data["segments"]):
        raise PlanFormatError(f"{where}: expected null or {{\"turn\": equation, \"segments\": "
                              f"[[start, stop], ...]}} with non-negative integers, got "
                              f"{str(data)[:80]}")
    try:
        return Rematerialization(data["turn"], tuple(tuple(s) for s in data["segments"]))
    except ValueError as err:
        raise PlanFormatError(f"{where}: {err}") from None


def check_plan_method(plan, method) -> None:
    """``ValueError`` when ``method`` (if given) is not the kind of method that made ``plan``
    (a :class:`~autoshard.Plan`)."""
    if method is not None and type(plan.method) is not type(method):
        raise ValueError(
            f"the plan passed to parallelize(plan=...) was made with method {plan.method!r}, "
            f"but method={method!r} was given: method mismatch (leave method out to reuse "
            f"the plan as it is)")


def check_plan_mesh(plan, mesh_shape, axis_names) -> None:
    """``ValueError`` unless ``plan`` was made for a mesh of this shape and these names."""
    if tuple(plan.mesh_shape) != tuple(mesh_shape) or tuple(plan.axis_names) != tuple(axis_names):
        what = "shape" if tuple(plan.mesh_shape) != tuple(mesh_shape) else "axis names"
        raise ValueError(
            f"the plan passed to parallelize(plan=...) was made for another mesh: mesh "
            f"{what} mismatch (plan {dict(zip(plan.axis_names, plan.mesh_shape))}, mesh "
            f"{dict(zip(axis_names, mesh_shape))})")
