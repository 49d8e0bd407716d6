"""Planning a loop over layers once (``ir.loop_view``): the view's prices per step, and
its plan read back as the program's.

On the view, a body equation's strategies cost ``length`` times what one step costs
(``compute_s``, ``communication_s``; ``flops``, ``bytes_accessed`` and ``collectives``
stay as the compiled loop holds them: its body once). A tensor use read inside the loop
(by a body equation, by a step's slice, or stacked) is resharded every step: its matrix
is weighted by the length (``Use.weight``); a carry goes back into its entry every step
(a loop-carried use of that weight). A stacked operand or result keeps its leading dim,
the steps, whole: the loop reads and writes one step at a time.

The plan of the view becomes the program's: the loop's operands are read in the layouts
its entries take, its stacked results made in the layouts of their stacks, its carries
left in the layout they entered with; what the view lays out inside the body becomes the
loop's :class:`~autoshard.plan.parts.LoopLayouts`, which the runtime pins inside the
loop's body.
"""
from __future__ import annotations

import dataclasses

from jax.sharding import PartitionSpec

from autoshard.cost_model import MeshCostModel
from autoshard.ir.fingerprint import fingerprint
from autoshard.ir.loop_view import LoopView
from autoshard.ir.program import Literal
from autoshard.ir.specs import from_partition_spec, to_partition_spec
from autoshard.ir.trace import TracedFunction
from autoshard.plan.parts import LoopLayouts
from autoshard.plan.record import Plan

from .strategies import Strategy


def repeated(strategies: tuple[Strategy, ...], times: int, copies: int = 1
             ) -> tuple[Strategy, ...]:
    """``strategies`` of an equation run ``times`` per call: seconds scaled; the compiled
    program's counts (``flops``, ``bytes_accessed``, ``collectives``) those of the
    ``copies`` of it the compiled loop's body holds."""
    return tuple(dataclasses.replace(
        s, compute_s=s.compute_s * times, communication_s=s.communication_s * times,
        all_reduce_latency_s=s.all_reduce_latency_s * times, flops=s.flops * copies,
        bytes_accessed=s.bytes_accessed * copies, collectives=s.collectives * copies)
        for s in strategies)


def within_steps(view: LoopView, eqn: int, strategies: tuple[Strategy, ...]) -> tuple[Strategy, ...]:
    """The strategies view equation ``eqn`` may take: a body equation's repeated, a slice
    of a stacked operand (written by every copy of the body) or a stack with its steps'
    dim whole."""
    origin = view.origins[eqn]
    if origin[0] == "body":
        loop = view.loops[origin[1]]
        return repeated(strategies, loop.length, loop.copies)
    if origin[0] == "slice":  # (each copy of the body slices its own step)
        return repeated(tuple(s for s in strategies if not s.in_specs[0][0]), 1,
                        view.loops[origin[1]].copies)
    if origin[0] == "stack":
        return tuple(s for s in strategies if not s.out_specs[0][0])
    return strategies


def use_weight(view: LoopView, eqn: int) -> float:
    """How many times per call a use read by view equation ``eqn`` is resharded: each
    step's, for a body equation, a step's slice and a stack."""
    origin = view.origins[eqn]
    kind, loop = origin[0], view.loops[origin[1]] if origin[0] != "program" else None
    if kind in ("body", "stack") or kind == "entry" and loop.slices[origin[2]] is not None:
        return float(loop.length)
    return 1.0


def unspliced(plan: Plan, view: LoopView, traced: TracedFunction, static_repr: str,
              model: MeshCostModel) -> Plan:
    """``plan`` (of ``view``) as the plan of ``traced``'s program (module docstring); a
    resharding inside a loop goes through the waypoints ``model`` prices it by."""
    program = view.program
    made = dict(plan.value_specs)  # (the last layout a value is pinned to: its own)
    chains: dict[tuple[int, int], list[PartitionSpec]] = {}  # an operand's, in turn
    for e, k, spec in plan.operand_specs:
        chains.setdefault((e, k), []).append(spec)
    read = {key: chain[-1] for key, chain in chains.items()}  # the layout it is read in
    made.update(zip(view.traced.program.invars, plan.flat_in_specs, strict=True))

    def layout(atom) -> PartitionSpec:
        return PartitionSpec() if isinstance(atom, Literal) else made.get(atom, PartitionSpec())

    # a reader of a loop's carry reads it, after the loop, in the layout it entered with
    # (the loop's state has one), not in the layout the body made it in, as on the view
    carried = {(e, k) for e, eqn in enumerate(program.eqns) for k, atom in enumerate(eqn.inputs)
               if not isinstance(atom, Literal) and atom in view.renamed}
    value_specs = [(v, s) for v, s in plan.value_specs
                   if v < len(program.avals) and v not in view.renamed]
    operand_specs, inside = [], [[] for _ in view.loops]
    for e, k, spec in plan.operand_specs:
        origin = view.origins[e]
        if origin[0] == "program" and (origin[1], k) not in carried:
            operand_specs.append((origin[1], k, spec))
        elif origin[0] == "body":
            inside[origin[1]].append((origin[2], k, spec))
        elif origin[0] in ("slice", "entry") and \
                view.loops[origin[1]].slices[origin[2]] in (None, e) and \
                (view.loops[origin[1]].eqn, origin[2]) not in carried:
            operand_specs.append((view.loops[origin[1]].eqn, origin[2], spec))
    reading = _view_readers(view)
    loops, carry_in = [], {}
    for loop, pinned in zip(view.loops, inside, strict=True):
        body, offset = loop.body, loop.offset
        scan = program.eqns[loop.eqn]
        n_consts, n_carry = scan.params["num_consts"], scan.params["num_carry"]
        inputs = set(body.invars)
        values = [(v - offset, s) for v, s in plan.value_specs
                  if offset <= v < offset + len(body.avals) and v - offset not in inputs]
        flat_in = tuple(layout(v + offset) for v in body.invars)
        outs = [a if isinstance(a, Literal) else a + offset for a in body.outvars]
        # a step's slice read in another layout than the loop holds it in: through the
        # waypoints the squeeze making the body's input was priced by (the step's dim left
        # out); a stacked result, likewise into its stack
        in_via = tuple(() if first is None else tuple(
            PartitionSpec(*spec[1:]) for spec in chains.get((entry, 0), [])[:-1])
            for entry, first in zip(loop.entries, loop.slices, strict=True))
        # a carry leaves each step in the layout it entered with: made in another, it is
        # resharded at the end of the body, as the loop-carried use prices it
        flat_out = tuple(flat_in[n_consts:n_consts + n_carry]) + tuple(
            read.get((stack, 0), layout(outs[n_carry + j]))
            for j, stack in enumerate(loop.stacks))
        out_via = tuple(_waypoints(model, plan.axis_names, body, body.outvars[k],
                                   layout(outs[k]), flat_out[k]) for k in range(n_carry)) + \
            tuple(tuple(chains.get((stack, 0), [])[:-1]) for stack in loop.stacks)
        loops.append(LoopLayouts(loop.eqn, flat_in, flat_out, tuple(values), tuple(pinned),
                                 in_via, out_via))
        for k in range(n_carry):
            carry_in[scan.outputs[k]] = flat_in[n_consts + k]
            value_specs.append((scan.outputs[k], flat_in[n_consts + k]))
    for e, k in sorted(carried):
        atom = program.eqns[e].inputs[k]
        reader = reading[e, k]
        wanted = read.get((reader, k if view.origins[reader][0] == "program" else 0),
                          layout(view.renamed[atom]))
        if wanted != carry_in[atom]:
            operand_specs += [(e, k, spec) for spec in (*_waypoints(
                model, plan.axis_names, program, atom, carry_in[atom], wanted), wanted)]
    return dataclasses.replace(plan, fingerprint=fingerprint(traced, static_repr),
                               value_specs=tuple(value_specs),
                               operand_specs=tuple(operand_specs), loops=tuple(loops))


def _waypoints(model: MeshCostModel, axis_names, program, atom, src: PartitionSpec,
               dst: PartitionSpec) -> tuple[PartitionSpec, ...]:
    """The layouts ``model`` reshards ``program``'s value ``atom`` through from ``src`` to
    ``dst``."""
    if isinstance(atom, Literal) or src == dst:
        return ()
    shape = tuple(program.avals[atom].shape)
    src_spec, dst_spec = (from_partition_spec(p, len(shape), axis_names) for p in (src, dst))
    return tuple(to_partition_spec(spec, axis_names)
                 for spec in model.resharding_waypoints(shape, src_spec, dst_spec))


def _view_readers(view: LoopView) -> dict[tuple[int, int], int]:
    """(program equation, operand) -> the view's equation that reads that operand: the
    equation itself, or for a loop's operand the entry or slice that reads it."""
    reading = {}
    for e, origin in enumerate(view.origins):
        if origin[0] == "program":
            for k in range(len(view.program.eqns[origin[1]].inputs)):
                reading[origin[1], k] = e
    for loop in view.loops:
        for k, (entry, first) in enumerate(zip(loop.entries, loop.slices, strict=True)):
            reading[loop.eqn, k] = entry if first is None else first
    return reading
