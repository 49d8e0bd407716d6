"""One pipeline stage as a program: layers ``first..last`` of the forward, differentiated.

The stage's forward is the forward equations of its layers; ``jax.vjp`` of it gives the
stage's backward, so backward work follows its forward layer. The combined program
``(diff inputs, other inputs, output cotangents) → ((outputs,), (grads,))`` is what the
intra-op planner prices and shards on the stage's sub-mesh. It is then split for the
schedule: the *forward* part (what the stage outputs need) runs when a micro-batch arrives
and returns the outputs plus the residuals the backward reads; the *backward* part runs
when the output cotangents come back.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import PartitionSpec

from autoshard.intra.flops import eqn_flops
from autoshard.ir.custom_rules import REMAT_CALLS, with_dissolved
from autoshard.ir.program import Literal, Program
from autoshard.ir.trace import TracedFunction, struct_of_aval, trace
from autoshard.runtime import evaluate_program

from .layers import Layering


@dataclasses.dataclass(frozen=True, eq=False)
class StageProgram:
    """Layers ``first..last``: forward-program value ids it reads and writes, and its
    combined forward+backward program (inputs ordered: differentiated ones first)."""

    first: int
    last: int
    inputs: tuple[int, ...]        # forward-program value ids, in the traced program's order
    diff_in: tuple[bool, ...]      # gets a cotangent back
    batch_in: tuple[bool, ...]     # split per micro-batch (activations, batch data)
    outputs: tuple[int, ...]       # forward-program value ids
    diff_out: tuple[bool, ...]     # receives a cotangent
    traced: TracedFunction         # the combined forward+backward program
    forward_eqns: tuple[int, ...]  # equation indices of traced.program
    backward_eqns: tuple[int, ...]
    residuals: tuple[int, ...]     # traced.program values made by the forward, read by backward
    backward_inputs: tuple[int, ...]  # positions in ``inputs`` the backward reads again
    forward_fraction: float        # share of the stage's flops in the forward part


def _inexact(aval) -> bool:
    return jax.numpy.issubdtype(aval.dtype, np.inexact)


def stage_program(layering: Layering, first: int, last: int, diff_invars, batch_invars,
                  heads: tuple[int, ...] = (0,)) -> StageProgram:
    """Build and trace the stage running layers ``first..last`` of ``layering``
    (``heads``: the forward outputs differentiated, the loss or ``SplitStep.heads``)."""
    F = layering.program
    mine = [e for e, lv in enumerate(layering.layer_of) if first <= lv <= last]
    made = {v for e in mine for v in F.eqns[e].outputs}
    read_later = {a for e, lv in enumerate(layering.layer_of) if lv > last
                  for a in F.eqns[e].inputs if isinstance(a, int)}
    later = read_later | {a for a in F.outvars if isinstance(a, int)}
    inputs, seen = [], set()
    for e in mine:
        for a in F.eqns[e].inputs:
            if isinstance(a, int) and a not in made and a not in seen:
                seen.add(a)
                inputs.append(a)
    for a in F.outvars:  # an output that is an input of the whole forward (rare)
        if last == layering.num_layers - 1 and isinstance(a, int) and a not in made \
                and a not in seen:
            seen.add(a)
            inputs.append(a)
    const_ids = {v for v, _ in F.constants}
    inputs = [a for a in inputs if a not in const_ids]
    outputs = [v for e in mine for v in F.eqns[e].outputs if v in later]
    if last == layering.num_layers - 1:
        outputs += [a for a in F.outvars if isinstance(a, int) and a not in outputs]

    # which values depend on the differentiated forward inputs
    dep = {v: bool(d) for v, d in zip(F.invars, diff_invars)}
    batch = {v: bool(b) for v, b in zip(F.invars, batch_invars)}
    for eqn in F.eqns:
        d = any(dep.get(a, False) for a in eqn.inputs if isinstance(a, int))
        b = any(batch.get(a, False) for a in eqn.inputs if isinstance(a, int))
        for v in eqn.outputs:
            dep[v], batch[v] = d, b or batch.get(v, False)
    is_diff = lambda v: dep.get(v, False) and _inexact(F.avals[v])  # noqa: E731
    inputs = sorted(inputs, key=lambda v: not is_diff(v))  # differentiated first, stable
    diff_in = tuple(is_diff(v) for v in inputs)
    # a cotangent comes back for what later layers read and for the loss; aux outputs
    # (has_aux) are not differentiated
    differentiated = {F.outvars[k] for k in heads}
    diff_out = tuple(is_diff(v) and (v in read_later or v in differentiated) for v in outputs)
    batch_in = tuple(batch.get(v, False) and len(F.avals[v].shape) > 0 for v in inputs)

    # a jax.checkpoint whose body a stage boundary cuts: each part differentiated as it is
    mine_set = set(mine)
    eqns = with_dissolved(F.eqns, REMAT_CALLS, lambda m, inside: m not in mine_set or
                          all(e in mine_set for e in inside))
    sub = Program(F.avals, tuple(inputs), tuple(outputs), tuple(eqns[e] for e in mine),
                  F.constants)
    n_diff = sum(diff_in)

    def combined(diff_vals, other_vals, cts):
        def fwd(dvals):
            outs = evaluate_program(sub, list(dvals) + list(other_vals))
            return [o for o, d in zip(outs, diff_out) if d], list(outs)

        _, vjp, outs = jax.vjp(fwd, list(diff_vals), has_aux=True)
        grads = vjp(list(cts))[0] if n_diff else []
        # nested one level deeper than the inputs, so no output's key path mirrors an
        # input's (which the planner would take for a value carried between steps)
        return (outs,), (list(grads),)

    struct = lambda v: struct_of_aval(F.avals[v])  # noqa: E731
    args = ([struct(v) for v in inputs[:n_diff]], [struct(v) for v in inputs[n_diff:]],
            [struct(v) for v, d in zip(outputs, diff_out) if d])
    traced = trace(combined, args)
    P = traced.program
    n_in, n_out = len(inputs), len(outputs)
    needed = {a for a in P.outvars[:n_out] if isinstance(a, int)}
    forward = set()
    for e in range(len(P.eqns) - 1, -1, -1):
        if any(v in needed for v in P.eqns[e].outputs):
            forward.add(e)
            needed |= {a for a in P.eqns[e].inputs if isinstance(a, int)}
    forward_eqns = tuple(sorted(forward))
    backward_eqns = tuple(e for e in range(len(P.eqns)) if e not in forward)
    fwd_made = {v for e in forward_eqns for v in P.eqns[e].outputs}
    read_by_bwd = [a for e in backward_eqns for a in P.eqns[e].inputs if isinstance(a, int)]
    read_by_bwd += [a for a in P.outvars[n_out:] if isinstance(a, int)]
    residuals = tuple(dict.fromkeys(a for a in read_by_bwd if a in fwd_made))
    stage_in = {v: k for k, v in enumerate(P.invars[:n_in])}
    backward_inputs = tuple(sorted({stage_in[a] for a in read_by_bwd if a in stage_in}))
    flops_f = sum(eqn_flops(P, P.eqns[e]) for e in forward_eqns)
    flops_b = sum(eqn_flops(P, P.eqns[e]) for e in backward_eqns)
    frac = flops_f / (flops_f + flops_b) if flops_f + flops_b > 0 else 1 / 3
    return StageProgram(first, last, tuple(inputs), diff_in, batch_in, tuple(outputs),
                        diff_out, traced, forward_eqns, backward_eqns, residuals,
                        backward_inputs, frac)


def split_programs(stage: StageProgram) -> tuple[Program, Program]:
    """(forward, backward) programs over ``stage.traced.program``'s value ids.

    forward: stage inputs → stage outputs + residuals.
    backward: (inputs at ``backward_inputs``) + residuals + cotangents → input cotangents.
    """
    P = stage.traced.program
    n_in, n_out = len(stage.inputs), len(stage.outputs)
    fwd = Program(P.avals, P.invars[:n_in], tuple(P.outvars[:n_out]) + stage.residuals,
                  tuple(P.eqns[e] for e in stage.forward_eqns), P.constants)
    bwd_in = tuple(P.invars[k] for k in stage.backward_inputs) + stage.residuals \
        + tuple(P.invars[n_in:])
    bwd = Program(P.avals, bwd_in, tuple(P.outvars[n_out:]),
                  tuple(P.eqns[e] for e in stage.backward_eqns), P.constants)
    return fwd, bwd


def residual_layouts(sp: StageProgram, ops: dict, via: dict) -> dict[int, PartitionSpec]:
    """Residual value id → the layout the forward program hands it to the backward in,
    where not as made: the layout each of its backward readers reads it in, when a forward
    reader reads it so too. The stage's plan (one program) reshards such a value once for
    all its readers; split into two programs, the backward would reshard it again, which
    the plan never priced (the audit found an activation of a small LLaMA all-gathered
    twice per stage). ``ops``/``via``: the plan's operand layouts ((equation of the stage
    program, operand) → the spec it is read in / the waypoints before it); a backward
    reader reaching its layout through waypoints keeps the value as made."""
    P = sp.traced.program
    readers: dict[int, list] = {}
    for e in (*sp.forward_eqns, *sp.backward_eqns):
        for k, atom in enumerate(P.eqns[e].inputs):
            if not isinstance(atom, Literal):
                readers.setdefault(atom, []).append((e, k))
    backward = set(sp.backward_eqns)
    out = {}
    for v in sp.residuals:
        late = [ops.get(r) for r in readers.get(v, ()) if r[0] in backward]
        early = {ops.get(r) for r in readers.get(v, ()) if r[0] not in backward}
        if late and late[0] is not None and all(s == late[0] for s in late) \
                and late[0] in early and not any(r in via for r in readers[v]):
            out[v] = late[0]
    return out


def bytes_per_device(aval, spec, mesh_sizes: dict) -> float:
    """Bytes of one shard of ``aval`` laid out as ``spec`` (a PartitionSpec)."""
    n = math.prod(aval.shape) * aval.dtype.itemsize
    for entry in tuple(spec):
        if entry is None:
            continue
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            n /= mesh_sizes.get(axis, 1)
    return float(n)
