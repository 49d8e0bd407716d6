"""The once-per-step parts of a pipelined step: the pre-gradient program and the
apply-gradient programs, split so that each stage updates the parameters it owns.

Every equation after the gradient is labelled with the stage owning the gradients it reads
(the first stage reading that parameter; the loss belongs to the last stage). Equations
reading no gradient (a step counter, a learning-rate schedule) are shared: each stage that
needs them computes them. An equation mixing stages (global-norm clipping) sends the whole
update to one program on the full mesh.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from jax.sharding import PartitionSpec

from autoshard.intra.planner import plan_traced
from autoshard.ir.program import Program
from autoshard.ir.trace import TracedFunction
from autoshard.plan.record import Plan

from .layout import PlannedApply, apply_name
from .trace import SplitStep


def _sub_traced(program: Program, sources, in_paths, out_paths) -> TracedFunction:
    leaves = lambda n: jax.tree_util.tree_structure((0,) * n)  # noqa: E731
    return TracedFunction(program, leaves(len(program.invars)), leaves(len(program.outvars)),
                          tuple(in_paths), tuple(out_paths), tuple(sources))


def _owners(split: SplitStep, stages) -> dict[int, int]:
    """Forward input index → the first stage reading it."""
    F = split.forward.program
    owner = {}
    for s, st in enumerate(stages):
        for v in st.program.inputs:
            if v in F.invars:
                owner.setdefault(F.invars.index(v), s)
    return owner


def _subprogram(O: Program, eqns, wanted_outputs) -> Program:
    made = {v for e in eqns for v in O.eqns[e].outputs}
    consts = dict(O.constants)
    inputs = []
    for e in eqns:
        for a in O.eqns[e].inputs:
            if isinstance(a, int) and a not in made and a not in consts and a not in inputs:
                inputs.append(a)
    used = {a for e in eqns for a in O.eqns[e].inputs if isinstance(a, int)}
    constants = tuple((v, c) for v, c in O.constants if v in used)
    return Program(O.avals, tuple(inputs), tuple(wanted_outputs),
                   tuple(O.eqns[e] for e in eqns), constants)


FULL_MESH = -1   # where a program runs: a stage index, or the whole mesh


def _where(s: int, stage, mesh_shape) -> int:
    """Stage ``s``'s index, or FULL_MESH when its sub-mesh is the whole mesh, device for
    device (one stage)."""
    full = tuple(stage.mesh_shape) == tuple(mesh_shape) and \
        tuple(stage.positions) == tuple(range(math.prod(mesh_shape)))
    return FULL_MESH if full else s


def boundary_layouts(split: SplitStep, stages, mesh_shape) -> dict[int, tuple[int, PartitionSpec]]:
    """Outer value id → (where, layout) for the values the stage programs hand to the
    once-per-step programs or read from the step's arguments: each gradient as the
    backward of the first stage producing it outputs it (the runtime accumulates it
    there), each step argument a stage reads as the first stage reading it has it."""
    O = split.traced.program
    F = split.forward.program
    geqn = O.eqns[split.grad_eqn]
    n_val = 1 + split.num_aux
    where = [_where(s, st, mesh_shape) for s, st in enumerate(stages)]
    known: dict[int, tuple[int, PartitionSpec]] = {}
    for s, st in enumerate(stages):
        for k, v in enumerate(st.program.inputs):
            if v not in F.invars:
                continue
            atom = geqn.inputs[F.invars.index(v)]
            if isinstance(atom, int) and atom not in split.batch_vids:
                known.setdefault(atom, (where[s], st.plan.flat_in_specs[k]))
    diff_idx = [k for k, d in enumerate(split.diff) if d]
    for g, k in zip(geqn.outputs[n_val:], diff_idx, strict=True):
        for s, st in enumerate(stages):
            sp = st.program
            diff_inputs = [v for v, d in zip(sp.inputs, sp.diff_in) if d]
            if F.invars[k] in diff_inputs:
                spec = st.plan.flat_out_specs[len(sp.outputs) + diff_inputs.index(F.invars[k])]
                known[g] = (where[s], spec)
                break
    return known


def _plan_program(split: SplitStep, eqns, outputs, mesh, layouts: Mapping[int, PartitionSpec],
                  axis_names, cluster, method) -> tuple[Program, Plan]:
    """The outer equations ``eqns`` as a program with ``outputs``, planned on ``mesh`` with
    ``method.stage_method``; inputs found in ``layouts`` (outer value id → spec) are read
    in that layout."""
    traced = split.traced
    O = traced.program
    in_path = dict(zip(O.invars, traced.in_paths))
    out_path = {}
    for a, p in zip(O.outvars, traced.out_paths):
        if isinstance(a, int):
            out_path.setdefault(a, p)
    prog = _subprogram(O, eqns, outputs)
    sub = _sub_traced(prog, [traced.sources[e] for e in eqns],
                      [in_path.get(v, f"value{v}") for v in prog.invars],
                      [out_path.get(v, f"value{v}") for v in prog.outvars])
    in_layouts = {i: layouts[v] for i, v in enumerate(prog.invars) if v in layouts}
    plan = plan_traced(sub, mesh_shape=mesh, axis_names=axis_names, cluster=cluster,
                       method=method.stage_method, batch_flat=[False] * len(prog.invars),
                       in_layouts=in_layouts)
    return prog, plan


def plan_step_parts(split: SplitStep, stages, layering, mesh_shape, axis_names, cluster,
                     method, plan_part=None):
    """(pre-gradient parts, apply parts) as :class:`PlannedApply`. Each part is planned
    with ``method.stage_method``, or by ``plan_part(name, program)`` when given (a saved
    plan's shardings; called in order: the pre-gradient part, then the apply parts).

    A part reads what a program on the same devices hands it in that program's layout
    (:func:`boundary_layouts`; the pre-gradient part's outputs for the apply parts), so
    that nothing is resharded between them unpriced: the apply's outputs carried to the
    next step are priced against those layouts by the carried-value edges."""
    traced = split.traced
    O = traced.program
    geqn = O.eqns[split.grad_eqn]
    outvars = {a for a in O.outvars if isinstance(a, int)}

    known = boundary_layouts(split, stages, mesh_shape) if plan_part is None else {}

    def planned(stage, eqns, outputs, mesh, name=None):
        where = _where(stage, stages[stage], mesh_shape) if stage >= 0 else FULL_MESH
        layouts = {v: spec for v, (w, spec) in known.items() if w == where}
        if plan_part is not None:
            prog = _subprogram(O, eqns, outputs)
            plan = plan_part(name or apply_name(stage), prog)
        else:
            prog, plan = _plan_program(split, eqns, outputs, mesh, layouts, axis_names,
                                       cluster, method)
        return PlannedApply(stage, prog, plan, prog.invars, tuple(outputs))

    pre = ()
    if split.pre:
        read_later = {a for e in split.post for a in O.eqns[e].inputs if isinstance(a, int)}
        read_later |= {a for a in geqn.inputs if isinstance(a, int)} | outvars
        outs = [v for e in split.pre for v in O.eqns[e].outputs if v in read_later]
        pre = (planned(-1, list(split.pre), outs, mesh_shape, "pre-gradient"),)
        known.update((v, (FULL_MESH, spec))
                     for v, spec in zip(pre[0].outputs, pre[0].plan.flat_out_specs))

    if not split.post:
        return pre, ()
    groups = update_groups(split, _owners(split, stages), len(stages) - 1, shared_label=0)
    if groups is None:  # an update mixing stages (e.g. global-norm clipping): one program
        return pre, (planned(-1, list(split.post), _update_outputs(split), mesh_shape),)
    return pre, tuple(planned(s, eqns, outs, stages[s].mesh_shape)
                      for s, (eqns, outs) in sorted(groups.items()))


def update_groups(split: SplitStep, owner: Mapping[int, int], loss_label: int,
                  shared_label: int) -> dict[int, tuple[list[int], list[int]]] | None:
    """The post-gradient equations grouped by the label owning the gradients they read:
    ``label → (equation indices in order, outer values it outputs)``. ``owner``:
    differentiated forward input index → label (missing: 0); the loss's outputs that are
    not scalars have ``loss_label`` (its scalars none: each group reads them); outputs
    reading no gradient (a step counter) go to ``shared_label``,
    and each group computes the gradient-free equations it reads. ``None`` when an equation
    mixes labels (global-norm clipping): the update cannot be split."""
    O = split.traced.program
    geqn = O.eqns[split.grad_eqn]
    outvars = {a for a in O.outvars if isinstance(a, int)}
    n_val = 1 + split.num_aux
    # the loss's scalars (the loss, a metric, a count) are read where needed, unlabelled:
    # moving one between stages costs nothing worth running the update in one program
    # for (a masked mean's gradients are scaled by its count: ``post_reduction``)
    label: dict[int, int] = {v: loss_label for v in geqn.outputs[:n_val] if O.avals[v].shape}
    diff_idx = [k for k, d in enumerate(split.diff) if d]
    for g_out, k in zip(geqn.outputs[n_val:], diff_idx, strict=True):
        label[g_out] = owner.get(k, 0)
    eqn_label: dict[int, int | None] = {}
    for e in split.post:
        ls = {label[a] for a in O.eqns[e].inputs if isinstance(a, int) and a in label}
        if len(ls) > 1:
            return None
        eqn_label[e] = next(iter(ls)) if ls else None
        if ls:
            for v in O.eqns[e].outputs:
                label[v] = eqn_label[e]
    producer = {v: e for e in split.post for v in O.eqns[e].outputs}
    groups: dict[int, set] = {}
    for e, lab in eqn_label.items():
        if lab is not None:
            groups.setdefault(lab, set()).add(e)
    shared_outs = [a for a in outvars if a in producer and eqn_label[producer[a]] is None]
    if shared_outs:
        groups.setdefault(shared_label, set()).update(producer[a] for a in shared_outs)
    out = {}
    for s in sorted(groups):
        eqns = set(groups[s])
        todo = list(eqns)
        while todo:  # pull in the shared (stage-less) equations these read
            e = todo.pop()
            for a in O.eqns[e].inputs:
                p = producer.get(a) if isinstance(a, int) else None
                if p is not None and p not in eqns:
                    eqns.add(p)
                    todo.append(p)
        order = sorted(eqns)
        outs = list(dict.fromkeys(v for e in order for v in O.eqns[e].outputs
                                  if v in outvars and (eqn_label[e] == s or
                                                       (s == shared_label and
                                                        eqn_label[e] is None))))
        if outs:
            out[s] = (order, outs)
    return out


def _update_outputs(split: SplitStep) -> list[int]:
    O = split.traced.program
    outvars = {a for a in O.outvars if isinstance(a, int)}
    return list(dict.fromkeys(v for e in split.post for v in O.eqns[e].outputs
                              if v in outvars))


def whole_update_seconds(split: SplitStep, mesh_shape, axis_names, cluster, method) -> float:
    """Seconds per step of the whole update as one program on the full mesh (what runs when
    an equation mixes stages' gradients)."""
    if not split.post:
        return 0.0
    _, plan = _plan_program(split, list(split.post), _update_outputs(split), mesh_shape, {},
                            axis_names, cluster, method)
    return plan.cost.total_s


def stage_update_seconds(split: SplitStep, stage, first_layer: Mapping[int, int],
                         num_layers: int, mesh_shape, axis_names, cluster, method
                         ) -> float | None:
    """Seconds per step of the apply-gradient program that ``stage`` (a candidate
    :class:`PlannedStage`) would run: the update of the parameters whose first reading
    layer is one of its layers, on its sub-mesh, reading gradients and parameters in the
    layouts its plan gives them, as :func:`plan_step_parts` plans it once stages are
    chosen. ``first_layer``: forward input index → the first layer reading it (missing: 0).
    0.0 without an update; ``None`` when an equation mixes this stage's gradients with
    other stages' (then the whole update runs on the full mesh:
    :func:`whole_update_seconds`)."""
    if not split.post:
        return 0.0
    sp = stage.program
    mine = {k: 0 if sp.first <= first_layer.get(k, 0) <= sp.last else 1
            for k in range(len(split.diff))}
    groups = update_groups(split, mine, 0 if sp.last == num_layers - 1 else 1,
                           shared_label=0 if sp.first == 0 else 1)
    if groups is None:
        return None
    if 0 not in groups:
        return 0.0
    eqns, outs = groups[0]
    layouts = {v: spec for v, (_, spec) in boundary_layouts(split, (stage,), mesh_shape).items()}
    _, plan = _plan_program(split, eqns, outs, stage.mesh_shape, layouts, axis_names, cluster,
                            method)
    return plan.cost.total_s
