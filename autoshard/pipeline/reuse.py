"""Running a saved pipeline plan: its layout rebuilt from the plan's stage assignments and
per-program shardings (``Plan.programs``), with nothing planned or solved again.

The step is traced and split as for planning; the plan must have been made for the same
program (fingerprint), layering (the stages' layer ranges) and mesh (the stages' devices).
"""
from __future__ import annotations

import math

from autoshard.ir.fingerprint import check_fingerprint, fingerprint
from autoshard.ir.program import Program
from autoshard.methods import PipeshardParallel
from autoshard.plan.checks import specs_misfit
from autoshard.plan.parts import ProgramSpecs, StageAssignment
from autoshard.plan.record import Plan

from .apply import plan_step_parts
from .layers import assign_layers
from .layout import PipelineLayout, PlannedStage
from .stage_program import stage_program
from .trace import split_step

_AGAIN = "leave plan out to plan the pipeline again"


def _refuse(what: str):
    raise ValueError(f"the pipeline plan passed to parallelize(plan=...) {what}; {_AGAIN}")


def is_plain_pipeline_plan(plan: Plan) -> bool:
    """A PipeshardParallel plan that kept plain intra-op parallelism (one program)."""
    return not plan.programs and len(plan.stages) == 1 and \
        isinstance(plan.stages[0], StageAssignment) and plan.stages[0].num_microbatches == 1


def _check_specs(specs: ProgramSpecs, name: str, program: Program) -> ProgramSpecs:
    if specs.name != name:
        _refuse(f"holds shardings for program {specs.name!r} where this function's pipeline "
                f"has {name!r}: it was made for another function")
    misfit = specs_misfit(program, specs.flat_in_specs, specs.flat_out_specs,
                          specs.value_specs, specs.operand_specs)
    if misfit is not None:
        _refuse(f"shards values that {name} of this function does not have ({name} "
                f"{misfit}): it was made for another function")
    return specs


def reuse_pipeline(fun, args, plan: Plan, *, static_argnums, batch_flags,
                   method: PipeshardParallel, static_repr: str, device_ids) -> PipelineLayout:
    """The :class:`PipelineLayout` of ``plan`` for ``fun`` on these arguments.

    ``device_ids``: the mesh's device ids, row-major (``None``: an abstract mesh, whose
    positions are the ids). ``ValueError`` naming the mismatch when the plan was made for
    another function, signature or mesh.
    """
    records = [st for st in plan.stages if isinstance(st, StageAssignment)]
    if not plan.programs or not records or len(records) != len(plan.stages):
        _refuse("holds no per-program shardings (it was written by an older autoshard, "
                "before pipeline plans kept them)")
    split = split_step(fun, args, static_argnums, batch_flags, method.num_microbatches,
                       method.schedule)
    check_fingerprint(plan, fingerprint(split.traced, static_repr,
                                        argument_avals=split.full_avals), _AGAIN)
    layering = assign_layers(split.forward.program, split.layer_anchors(), split.batch,
                             method.num_layers, split.forward_only)
    layers = [lv for st in records for lv in st.layers]
    if layers != list(range(layering.num_layers)) or any(not st.layers for st in records):
        _refuse(f"runs layers {layers} in its stages, but this function's loss has "
                f"{layering.num_layers} layer(s)")
    ids = list(device_ids) if device_ids is not None else \
        list(range(math.prod(plan.mesh_shape)))
    position = {d: p for p, d in enumerate(ids)}
    S = len(records)
    if len(plan.programs) < S:
        _refuse(f"has {len(plan.programs)} program shardings for {S} stages")
    stages = []
    for s, st in enumerate(records):
        missing = [d for d in st.device_ids if d not in position]
        if missing:
            _refuse(f"puts stage {s} on devices {list(st.device_ids)}, but this mesh has no "
                    f"device(s) {missing} (its devices: {ids}): it was made for another mesh")
        sp = stage_program(layering, st.layers[0], st.layers[-1], split.diff, split.batch,
                           split.heads)
        specs = _check_specs(plan.programs[s], f"stage {s}", sp.traced.program)
        stages.append(PlannedStage(sp, specs, tuple(st.mesh_shape),
                                   tuple(position[d] for d in st.device_ids), None, (0.0, 0.0)))
    saved = iter(plan.programs[S:])

    def plan_part(name: str, program: Program) -> ProgramSpecs:
        specs = next(saved, None)
        if specs is None:
            _refuse(f"has no shardings for this function's {name} program")
        return _check_specs(specs, name, program)

    pre, apply = plan_step_parts(split, tuple(stages), layering, plan.mesh_shape,
                                 plan.axis_names, plan.cluster, method, plan_part=plan_part)
    extra = [p.name for p in saved]
    if extra:
        _refuse(f"has shardings for programs {extra} this function's pipeline does not run")
    return PipelineLayout(split, layering, tuple(stages), pre, apply, method,
                          tuple(plan.axis_names), tuple(plan.mesh_shape))
