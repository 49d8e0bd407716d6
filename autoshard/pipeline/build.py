"""From a :class:`PipelineLayout` and a concrete mesh to a runnable
:class:`~autoshard.runtime.PipelineProgram` (sub-meshes, sharded stage programs, keys)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec

from autoshard.ir.program import Literal
from autoshard.plan.parts import operand_layouts, value_layouts
from autoshard.runtime import PipelineProgram, PipelineStage, StepProgram, shard_program

from .layout import PipelineLayout, PlannedApply, apply_name
from .microbatch_outputs import SAME, SUM
from .partial_grads import deferred_backward, reduction_program, stage_partial_gradients
from .stage_program import residual_layouts, split_programs


def submesh(mesh: Mesh, positions, shape, axis_names) -> Mesh:
    flat = np.asarray(mesh.devices).reshape(-1)
    devices = np.array([flat[p] for p in positions], dtype=object).reshape(shape)
    return Mesh(devices, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))


def _step_program(part: PlannedApply, mesh: Mesh, name: str, donate=()) -> StepProgram:
    plan = part.plan
    operands, via = operand_layouts(plan.operand_specs)
    values, values_via = value_layouts(plan.value_specs)
    program = shard_program(part.program, mesh, plan.flat_in_specs, plan.flat_out_specs,
                            value_specs=values, operand_specs=operands,
                            donate_argnums=donate, operand_via=via, value_via=values_via)
    return StepProgram(program, tuple(("v", v) for v in part.inputs),
                       tuple(("v", v) for v in part.outputs), name)


def _apply_donations(apply, donated_vids, outvars) -> list[tuple[int, ...]]:
    """Per apply program, the inputs it donates: donated step arguments that no later
    apply program reads, that are not returned as they are, and that an output of the same
    shape and dtype can reuse (jax warns about a donation nothing reuses)."""
    out = []
    for i, part in enumerate(apply):
        read_later = {v for later in apply[i + 1:] for v in later.inputs}
        avals = part.program.avals
        free = [(avals[v].shape, avals[v].dtype) for v in part.outputs]
        donate = []
        for k, v in enumerate(part.inputs):
            kind = (avals[v].shape, avals[v].dtype)
            if v in donated_vids and v not in read_later and v not in outvars and kind in free:
                free.remove(kind)
                donate.append(k)
        out.append(tuple(donate))
    return out


def build_pipeline(layout: PipelineLayout, mesh: Mesh, donated=None) -> PipelineProgram:
    """``donated``: per outer input, whether it is donated (``donate_argnums``): the apply
    programs that read them last donate their buffers to the updated values, and the
    pipeline deletes the donated arrays at the end of the step, as ``jax.jit`` does."""
    split = layout.split
    O = split.traced.program
    F = split.forward.program
    geqn = O.eqns[split.grad_eqn]
    names = layout.axis_names
    meshes = [submesh(mesh, st.positions, st.mesh_shape, names) for st in layout.stages]
    constants = [(("v", v), c) for v, c in O.constants]
    fkey = {}
    for k, (v, atom) in enumerate(zip(F.invars, geqn.inputs)):
        if isinstance(atom, Literal):
            fkey[v] = ("v", "literal", k)
            constants.append((fkey[v], atom.value))
        elif atom in split.batch_vids:
            fkey[v] = ("mb", atom)
        else:
            fkey[v] = ("v", atom)
    diff_idx = [k for k, d in enumerate(split.diff) if d]
    n_val = 1 + split.num_aux
    grad_key = {F.invars[k]: ("v", g)
                for k, g in zip(diff_idx, geqn.outputs[n_val:], strict=True)}
    aux = []  # (the last stage's activation key, the step key, how micro-batches combine)
    aux_once = []  # (activation, step key) of aux leaves every micro-batch computes alike
    for atom, out, kind in zip(F.outvars[1:], geqn.outputs[1:n_val], split.combinations[1:],
                               strict=True):
        if isinstance(atom, Literal):
            constants.append((("v", out), jnp.asarray(atom.value, O.avals[out].dtype)))
        elif kind == SAME:
            aux_once.append((("act", atom), ("v", out)))
        else:
            aux.append((("act", atom), ("v", out), kind))
    key = lambda v: fkey.get(v, ("act", v))  # noqa: E731

    stages = []
    produced = set()
    for st, sub in zip(layout.stages, meshes):
        sp, plan = st.program, st.plan
        P = sp.traced.program
        fwd, bwd = split_programs(sp)
        pos = {v: k for k, v in enumerate(P.invars)}
        value_specs, values_via = value_layouts(plan.value_specs)
        spec = lambda v: plan.flat_in_specs[pos[v]] if v in pos else \
            value_specs.get(v, PartitionSpec())  # noqa: E731
        n_out = len(sp.outputs)
        fwd_index = {e: i for i, e in enumerate(sp.forward_eqns)}
        bwd_index = {e: i for i, e in enumerate(sp.backward_eqns)}
        ops, via = operand_layouts(plan.operand_specs)
        handed = residual_layouts(sp, ops, via)
        forward = shard_program(
            fwd, sub, [spec(v) for v in fwd.invars],
            list(plan.flat_out_specs[:n_out]) + [handed.get(v, spec(v)) for v in sp.residuals],
            value_specs=value_specs,
            operand_specs={(fwd_index[e], k): s for (e, k), s in ops.items() if e in fwd_index},
            operand_via={(fwd_index[e], k): c for (e, k), c in via.items() if e in fwd_index},
            value_via=values_via)
        targets = []
        for v, d in zip(sp.inputs, sp.diff_in):
            if d:
                targets.append(grad_key[v] if v in grad_key else ("ct", v))
                if v in grad_key:
                    produced.add(v)
        out_specs = list(plan.flat_out_specs[n_out:])
        partials = stage_partial_gradients(sp, plan, names, st.mesh_shape,
                                           layout.method.num_microbatches, set(F.invars))
        reduce = None
        if partials:  # the batch reduction of these gradients runs once per step
            bwd, value_specs, bwd_ops = deferred_backward(
                P, bwd, sp.backward_eqns, partials, plan, names, st.mesh_shape)
            for p in partials:
                out_specs[p.output] = p.partial_spec
            reduce = shard_program(
                reduction_program([bwd.avals[bwd.outvars[p.output]] for p in partials]), sub,
                [p.partial_spec for p in partials], [p.spec for p in partials])
            bwd_via = values_via = {}  # (the deferred program's values are its own)
        else:
            bwd_ops = {(bwd_index[e], k): s for (e, k), s in ops.items() if e in bwd_index}
            bwd_via = {(bwd_index[e], k): c for (e, k), c in via.items() if e in bwd_index}
        backward = shard_program(bwd, sub, [handed.get(v, spec(v)) for v in bwd.invars],
                                 out_specs, value_specs={**value_specs, **handed},
                                 operand_specs=bwd_ops,
                                 operand_via=bwd_via, value_via=values_via)
        stages.append(PipelineStage(
            forward, backward, tuple(key(v) for v in sp.inputs),
            tuple(("act", v) for v in sp.outputs),
            tuple(p for p, d in enumerate(sp.diff_out) if d), sp.backward_inputs,
            tuple(targets), reduce, tuple(p.output for p in partials)))
    # (forward only, no backward runs: the constant's gradient is zero)
    zero = tuple((grad_key[v], tuple(F.avals[v].shape), F.avals[v].dtype)
                 for v in grad_key if v not in produced or split.forward_only)
    pre = tuple(_step_program(p, mesh, "pre-gradient") for p in layout.pre)
    donated = [False] * len(O.invars) if donated is None else list(donated)
    donated_vids = {v for v, d in zip(O.invars, donated, strict=True) if d}
    outvars = {a for a in O.outvars if isinstance(a, int)}
    apply = tuple(_step_program(a, meshes[a.stage] if a.stage >= 0 else mesh,
                                apply_name(a.stage), donate)
                  for a, donate in zip(layout.apply,
                                       _apply_donations(layout.apply, donated_vids, outvars)))
    loss = layout.layering.program.outvars[0]
    cotangents = None
    if split.head_cotangents is not None:  # a loss of several values: theirs at the totals
        program = split.head_cotangents.program
        inputs = []
        for k, atom in enumerate(split.cotangent_inputs):
            if isinstance(atom, Literal):
                inputs.append(("v", "literal cotangent input", k))
                constants.append((inputs[-1], atom.value))
            else:
                inputs.append(("v", atom))
        cotangents = StepProgram(
            shard_program(program, meshes[-1], [PartitionSpec()] * len(program.invars),
                          [PartitionSpec()] * len(program.outvars)),
            tuple(inputs), tuple(("head ct", F.outvars[h]) for h in split.heads),
            "head cotangents")
    outputs = tuple(("literal", a.value) if isinstance(a, Literal) else ("v", a)
                    for a in O.outvars)
    return PipelineProgram(
        invars=tuple(("v", v) for v in O.invars),
        # the batch arguments, and constants split like them (random_rows' row tables)
        batch=tuple((("v", v), ("mb", v)) for v in (*O.invars, *(c for c, _ in O.constants))
                    if v in split.batch_vids),
        constants=tuple(constants), pre=pre, stages=tuple(stages),
        loss=(("act", loss), ("v", geqn.outputs[0])), loss_sum=split.combinations[0] == SUM,
        aux=tuple(aux),
        aux_once=tuple(aux_once), zero_grads=zero,
        apply=apply, cotangents=cotangents,
        outputs=outputs, donated=tuple(k for k, d in enumerate(donated) if d),
        num_microbatches=layout.method.num_microbatches,
        schedule=layout.method.schedule, mesh=mesh, forward_only=split.forward_only)
