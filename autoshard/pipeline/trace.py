"""Tracing a step for pipelining: micro-batch shapes, and its three parts.

The step is traced with every batch argument cut to one micro-batch, with its gradient
(``jax.value_and_grad``, ``jax.grad`` or autoshard's) binding the gradient marker
(:func:`~autoshard.pipeline.markers.pipeline_tracing`).
The flat program then splits into the *pre* part (what the gradient's inputs need: runs
once per step), the marker itself (whose ``jaxpr`` is the forward: runs per micro-batch,
in stages) and the *post* part (the apply-gradient: runs once per step).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import numpy as np

from autoshard.ir.custom_rules import USER_BACKWARD_CALLS, backward_is_linear, is_custom_rule
from autoshard.ir.jax_compat import gradient_routing_available
from autoshard.ir.program import Equation, Literal, Program
from autoshard.ir.trace import (
    TracedFunction,
    argument_of,
    argument_path,
    aval_struct,
    flatten_open_jaxpr,
    struct_of_aval,
    trace,
)
from autoshard.ir.user_frames import user_stacklevel

from .batch_epilogue import moved_after_loss, unread_aux_dropped
from .batch_prelude import LossOutputs, moved_into_loss
from .batch_sizes import with_whole_batch_sizes
from .layers import strip_boundaries
from .markers import BOUNDARY_PRIMITIVE, GRAD_PRIMITIVE, pipeline_tracing, value_and_grad
from .microbatch_outputs import (
    MAX,
    MEAN,
    MIN,
    ROWS,
    SAME,
    SAME_VALUE,
    SUM,
    UNVERIFIED,
    combination,
    unverified_ops,
    value_kinds,
)
from .post_reduction import post_reduced
from .random_rows import has_random_draws, reproduce_random_rows, row_table


@dataclasses.dataclass(frozen=True, eq=False)
class SplitStep:
    """The outer program (micro-batch shapes, boundary markers removed) and its parts."""

    traced: TracedFunction            # outer step, program without boundary markers
    grad_eqn: int                     # index of the gradient marker in traced.program
    pre: tuple[int, ...]              # equation indices
    post: tuple[int, ...]
    batch_vids: frozenset             # outer input value ids holding the batch
    forward: TracedFunction           # the loss: inputs = the marker's operands
    diff: tuple[bool, ...]            # per forward input: differentiated
    batch: tuple[bool, ...]           # per forward input: a batch argument
    full_avals: tuple                 # outer inputs at full batch size
    num_aux: int = 0                  # has_aux: forward outputs after the loss (aux leaves)
    # per forward output (the loss, then the aux leaves): how its micro-batches' values
    # combine (microbatch_outputs: "mean", "sum", "same", "max" or "min")
    combinations: tuple[str, ...] = ()
    # the forward outputs the backward passes differentiate: the loss, or (a loss of several
    # combined values, under GPipe: ``post_reduction``) each of them, with its cotangent
    # computed from the totals by ``head_cotangents`` (reading ``cotangent_inputs``)
    heads: tuple[int, ...] = (0,)
    head_cotangents: TracedFunction | None = None
    cotangent_inputs: tuple = ()
    # the step takes no gradient (inference): its whole computation is the forward, pipelined
    # alone (the gradient marker around it differentiates a constant; see ``_forward_only``)
    forward_only: bool = False

    def layer_anchors(self) -> tuple[bool, ...]:
        """Per forward input, whether the layers are cut at the equations reading it
        (``layers.assign_layers``): the differentiated inputs; forward only, the floating
        arrays outside the batch (the parameters)."""
        if not self.forward_only:
            return self.diff
        F = self.forward.program
        return tuple(not b and bool(F.avals[v].shape) and
                     np.issubdtype(F.avals[v].dtype, np.inexact)
                     for v, b in zip(F.invars, self.batch))

    def output_avals(self, num_microbatches: int) -> list:
        """The step's output avals (jax's; a literal output's too) for the whole batch: the
        micro-batch trace's, an aux leaf of one value per example (``ROWS``: concatenated
        from the micro-batches) ``num_microbatches`` times longer."""
        program = self.traced.program
        geqn = program.eqns[self.grad_eqn]
        rows = {v for v, kind in zip(geqn.outputs[1:], self.combinations[1:]) if kind == ROWS}
        return [jax.typeof(a.value) if isinstance(a, Literal) else
                program.avals[a].update(shape=(num_microbatches * program.avals[a].shape[0],
                                               *program.avals[a].shape[1:]))
                if a in rows else program.avals[a] for a in program.outvars]


def flat_paths(args, static_argnums) -> tuple[list, list[str], object]:
    """(leaves, readable key paths, treedef) of the non-static arguments."""
    static = set(static_argnums)
    argnums = [i for i in range(len(args)) if i not in static]
    with_paths, tree = jax.tree_util.tree_flatten_with_path(tuple(args[i] for i in argnums))
    return [x for _, x in with_paths], [argument_path(p, argnums) for p, _ in with_paths], tree


def _fail(message: str):
    raise ValueError(message)


def _raise_if_micro_batch_specific(fun, args, static_argnums, B, full, micro, paths, err
                                   ) -> None:
    """``fun`` failed to trace at micro-batch shapes: if it traces at the full shapes, the
    micro-batching is what broke it (a batch size written into the step), so say that."""
    try:
        with pipeline_tracing():
            trace(fun, args, static_argnums)
    except Exception:  # noqa: BLE001 - it fails at full size too: the original error stands
        return
    changed = next(((p, f.shape, m.shape) for f, m, p in zip(full, micro, paths)
                    if f.shape != m.shape), None)
    if changed is None:
        return
    name = getattr(fun, "__name__", "the function")
    split_args = sorted({argument_of(p) for f, m, p in zip(full, micro, paths)
                         if f.shape != m.shape})
    # arguments all of whose leaves have the batch's leading dimension
    same_lead: dict[int, bool] = {}
    for f, p in zip(full, paths):
        same_lead[argument_of(p)] = same_lead.get(argument_of(p), True) and \
            f.shape[:1] == changed[1][:1]
    unsplit = sorted(a for a, same in same_lead.items() if same and a not in split_args)
    hint = ""
    if unsplit:
        hint = (f"; arguments {unsplit} have the batch's leading dimension {changed[1][0]} "
                f"but are not split: if they hold batch data, pass "
                f"batch_argnums={tuple(sorted(split_args + unsplit))}")
    raise ValueError(
        f"{name} traces with the full batch but fails on one micro-batch "
        f"(num_microbatches={B}: batch argument {changed[0]} goes from {changed[1]} to "
        f"{changed[2]}): "
        f"{type(err).__name__}: {err}\nPipeshardParallel runs the step once per micro-batch, "
        f"so shapes inside it must follow the batch arguments (x.reshape(x.shape[0], ...) "
        f"rather than a fixed batch size), or use num_microbatches=1{hint}. The arguments "
        f"split into micro-batches were {split_args}: those in batch_argnums or, without "
        f"it, the last non-static argument and those PipeshardParallel infers from it (see "
        f"its docstring)") from err


def split_step(fun, args, static_argnums, batch_flags, num_microbatches: int,
               schedule: str = "1f1b", *, forward_only: bool = False) -> SplitStep:
    """Trace ``fun`` at micro-batch shapes and find its pre / gradient / post parts
    (``schedule``: the pipeline's; under ``"gpipe"`` a loss of several combined values is
    differentiated at their totals). A ``fun`` without a gradient is split as
    ``_forward_only(fun)``, with ``forward_only`` set."""
    B = num_microbatches
    leaves, paths, tree = flat_paths(args, static_argnums)
    full, micro = [], []
    for leaf, path, is_batch in zip(leaves, paths, batch_flags):
        aval = aval_struct(leaf)
        shape, dtype, weak = tuple(aval.shape), aval.dtype, aval.weak_type
        full.append(aval)
        if is_batch:
            if shape[0] % B:
                _fail(f"num_microbatches={B} does not divide the batch: {path} has leading "
                      f"dimension {shape[0]}. Use a number of micro-batches that divides "
                      f"{shape[0]}")
            shape = (shape[0] // B,) + shape[1:]
        micro.append(jax.ShapeDtypeStruct(shape, dtype, weak_type=weak))
    dyn = iter(jax.tree_util.tree_unflatten(tree, micro))
    static = set(static_argnums)
    micro_args = tuple(a if i in static else next(dyn) for i, a in enumerate(args))
    try:
        with pipeline_tracing():
            traced = trace(fun, micro_args, static_argnums)
    except (TypeError, ValueError) as err:
        _raise_if_micro_batch_specific(fun, args, static_argnums, B, full, micro, paths, err)
        raise
    program, _ = strip_boundaries(traced.program)
    sources = tuple(s for s, e in zip(traced.sources, traced.program.eqns)
                    if e.primitive.name != BOUNDARY_PRIMITIVE)
    traced = dataclasses.replace(traced, program=program, sources=sources)
    name = getattr(fun, "__name__", "the function")
    grads = [e for e, eqn in enumerate(program.eqns) if eqn.primitive.name == GRAD_PRIMITIVE]
    if not grads and gradient_routing_available() and not forward_only:
        # no gradient: an inference step, whose whole computation is pipelined forward only
        return split_step(_forward_only(fun), args, static_argnums, batch_flags,
                          num_microbatches, schedule, forward_only=True)
    if not grads:
        _fail(f"PipeshardParallel needs {name} to compute its gradient with jax.value_and_grad "
              f"or jax.grad (however imported; flax nnx's and equinox's wrappers call them) "
              f"or autoshard.value_and_grad / autoshard.grad, so it knows where the forward "
              f"and backward passes end; none was found{_no_gradient_hint()}")
    if len(grads) > 1:
        _fail(f"PipeshardParallel supports one gradient (jax.value_and_grad, jax.grad or "
              f"autoshard's) per step; {name} takes {len(grads)} "
              f"({', '.join(sources[e] for e in grads)}): compute them in one call, with "
              f"argnums or a tuple of the arguments")
    g = grads[0]
    batch_vids = frozenset(v for v, b in zip(program.invars, batch_flags) if b)
    geqn = program.eqns[g]
    diff = tuple(geqn.params["diff"])
    batch = tuple(isinstance(a, int) and a in batch_vids for a in geqn.inputs)
    forward = loss_of(geqn)
    aux_paths = tuple(geqn.params.get("aux_paths", ()))
    work = with_batch_work(program, sources, g, batch_vids, forward, diff, batch,
                           traced.in_paths, aux_paths)
    program, sources, g = work.program, work.sources, work.grad_eqn
    forward, diff, batch, aux_paths = work.forward, work.diff, work.batch, work.aux_paths
    whole_work = _whole_batch_work(fun, args, static_argnums, batch_flags) if B > 1 else None
    if whole_work is not None:   # the work outside the loss counts the whole batch
        program = with_whole_batch_sizes(program, whole_work.program, g, batch_vids, sources,
                                         name)
    traced = dataclasses.replace(traced, program=program, sources=sources)
    geqn = program.eqns[g]
    num_aux = len(forward.program.outvars) - 1
    need = {a for a in geqn.inputs if isinstance(a, int)}
    pre = set()
    for e in range(g - 1, -1, -1):
        if any(v in need for v in program.eqns[e].outputs):
            pre.add(e)
            need |= {a for a in program.eqns[e].inputs if isinstance(a, int)}
    post = tuple(e for e in range(len(program.eqns)) if e != g and e not in pre)
    on_batch = set(batch_vids)
    for e, eqn in enumerate(program.eqns):
        if e == g:
            continue
        if any(a in on_batch for a in eqn.inputs if isinstance(a, int)):
            _fail(f"{name} uses the batch outside the function it differentiates "
                  f"({eqn.primitive.name} at {sources[e]}): PipeshardParallel splits the "
                  f"batch into micro-batches only inside the loss. Move this computation into "
                  f"the loss function, or leave that argument out of batch_argnums")
    for o, a in enumerate(program.outvars):
        if isinstance(a, int) and a in batch_vids:
            _fail(f"{name} returns its batch argument ({traced.out_paths[o]}); "
                  f"PipeshardParallel only splits the batch inside the loss")
    for k in range(len(diff)):
        if diff[k] and batch[k]:
            _fail("PipeshardParallel cannot differentiate with respect to a batch argument; "
                  "differentiate with respect to the parameters only")
    whole = None if whole_work is None else whole_work.forward.program
    several_heads = {}   # SplitStep's heads fields, where the loss has several
    if B == 1:   # one micro-batch is the batch
        combinations = (MEAN,) * len(forward.program.outvars)
    else:
        kinds = value_kinds(forward.program, batch, B, whole)
        cut = post_reduced(program, sources, g, forward, diff, kinds, aux_paths,
                           num_microbatches=B, forwards_first=schedule == "gpipe")
        if isinstance(cut, str):
            _fail(f"PipeshardParallel(num_microbatches={B}) in {name}: the loss it "
                  f"differentiates is {cut}, so its gradient cannot be summed from "
                  f"micro-batches into jax.jit's. Make the loss a function of sums or means "
                  f"over the batch (one that depends on the parameters, or several under "
                  f"schedule='gpipe', which runs every forward first), of values that do not "
                  f"depend on the parameters (a count: a masked mean) and of values that do "
                  f"not depend on the batch (a parameter norm), or use num_microbatches=1")
        if cut is None:
            outs = [combination(kinds.get(a) if isinstance(a, int) else SAME_VALUE)
                    for a in forward.program.outvars]
        else:
            n = cut.inserted
            traced = dataclasses.replace(traced, program=cut.program, sources=cut.sources)
            post = tuple(sorted([e if e < g else e + n for e in post] + [*range(g + 1, g + 1 + n)]))
            forward, num_aux = cut.forward, len(cut.forward.program.outvars) - 1
            aux_paths = cut.aux_paths
            outs = [combination(k) for k in cut.kinds]
            if cut.head_cotangents is not None:
                several_heads = dict(heads=cut.heads, head_cotangents=cut.head_cotangents,
                                     cotangent_inputs=cut.cotangent_inputs)
        combinations = _combinations(forward, tuple(outs), B, name, aux_paths, forward_only)
    if B > 1:
        _warn_of_accumulated_custom_gradients(forward, diff, kinds, B, name)
    _check_rows_returned(traced, g, combinations, aux_paths, name)
    split = SplitStep(traced, g, tuple(sorted(pre)), post, batch_vids, forward, diff, batch,
                      tuple(full), num_aux, combinations, **several_heads,
                      forward_only=forward_only)
    if B > 1 and has_random_draws(forward.program):
        rows = {m.shape[0] for m, is_batch in zip(micro, batch_flags) if is_batch}
        split = _random_rows(split, fun, B, rows.pop() if len(rows) == 1 else None, whole)
    return split


def _warn_of_accumulated_custom_gradients(forward: TracedFunction, diff, kinds: dict, B: int,
                                          name: str) -> None:
    """Warn of each ``jax.custom_vjp`` call on a value that depends on the parameters but
    not on the batch (a weight) whose backward is not linear in the cotangent: it runs
    once per micro-batch, on that micro-batch's part of the weight's cotangent, and the
    parts are summed, which is not ``jax.jit``'s gradient."""
    F = forward.program
    on_params = dict(zip(F.invars, diff))
    for e, eqn in enumerate(F.eqns):
        depends = any(on_params.get(a, False) for a in eqn.inputs if isinstance(a, int))
        on_params.update((v, depends) for v in eqn.outputs)
        if not is_custom_rule(eqn) or \
                eqn.params["call_primitive"].name not in USER_BACKWARD_CALLS:
            continue
        operands = eqn.inputs[eqn.params["num_outputs"]:]
        if any(isinstance(a, int) and on_params.get(a, False) and kinds.get(a) == (SAME,)
               for a in operands) and not backward_is_linear(
                   eqn, [struct_of_aval(jax.typeof(a.value) if isinstance(a, Literal) else
                                        F.avals[a]) for a in operands]):
            warnings.warn(
                f"PipeshardParallel(num_microbatches={B}) in {name}: the jax.custom_vjp "
                f"function at {forward.sources[e]} reads a value computed from the parameters "
                f"alone, whose cotangent sums over the batch: its backward runs once per "
                f"micro-batch, on that micro-batch's part, and the parts are summed. Its "
                f"backward is not linear in the cotangent (it clips or normalises it), so "
                f"the gradient differs from jax.jit's; use num_microbatches=1, or apply "
                f"the rule to the summed gradient (in the step, after the gradient)",
                UserWarning, stacklevel=user_stacklevel())


def with_batch_work(program: Program, sources, g: int, batch_vids, forward: TracedFunction,
                    diff, batch, in_paths, aux_paths) -> LossOutputs:
    """The step and its loss with the work on the batch after the gradient moved into the
    loss (``batch_epilogue``), then the work on it before the gradient (``batch_prelude``:
    the padding weights a metric reads too, once the metric has moved), then without the
    aux leaves nothing reads."""
    work = LossOutputs(program, tuple(sources), g, forward, tuple(diff), tuple(batch),
                       tuple(aux_paths))
    work = moved_after_loss(program, sources, g, batch_vids, forward, diff, batch,
                            aux_paths) or work
    work = moved_into_loss(work.program, work.sources, work.grad_eqn, batch_vids,
                           work.forward, work.diff, work.batch, in_paths,
                           work.aux_paths) or work
    dropped = unread_aux_dropped(work.program, work.grad_eqn, work.forward, work.aux_paths)
    if dropped is not None:
        program, forward, aux_paths = dropped
        work = dataclasses.replace(work, program=program, forward=forward, aux_paths=aux_paths)
    return work


def _whole_batch_work(fun, args, static_argnums, batch_flags) -> LossOutputs | None:
    """The step traced at the whole batch's shapes, with the work on the batch around its
    loss moved into it (:func:`with_batch_work`), as at micro-batch shapes (``None`` where
    it does not trace so): what micro-batching is compared with."""
    try:
        with pipeline_tracing():
            traced = trace(fun, args, static_argnums)
    except Exception:  # noqa: BLE001 - then what needs it falls back (see its callers)
        return None
    program, _ = strip_boundaries(traced.program)
    grads = [e for e, eqn in enumerate(program.eqns) if eqn.primitive.name == GRAD_PRIMITIVE]
    if len(grads) != 1:
        return None
    geqn = program.eqns[grads[0]]
    forward = loss_of(geqn)
    batch_vids = frozenset(v for v, b in zip(program.invars, batch_flags) if b)
    return with_batch_work(program, ("",) * len(program.eqns), grads[0], batch_vids, forward,
                           tuple(geqn.params["diff"]),
                           tuple(isinstance(a, int) and a in batch_vids for a in geqn.inputs),
                           traced.in_paths, ("",) * (len(forward.program.outvars) - 1))


def _combinations(forward: TracedFunction, kinds: tuple, B: int, name: str,
                  aux_paths: tuple[str, ...] = (), forward_only: bool = False
                  ) -> tuple[str, ...]:
    """How the loss and each aux leaf combine over the ``B`` micro-batches (``kinds``:
    :func:`~.microbatch_outputs.output_combinations`'); a loss or aux leaf that no
    combination recovers exactly is refused, naming what to return instead
    (``forward_only``: the aux leaves are the outputs of a step without a gradient)."""
    if UNVERIFIED in kinds[1:] and forward_only:   # outputs: rows as likely as means
        _fail(f"PipeshardParallel(num_microbatches={B}) in {name} (no gradient: run forward "
              f"only): the step reads the batch through "
              f"{', '.join(unverified_ops(forward.program))}, through which autoshard cannot "
              f"tell how its outputs combine over the micro-batches (concatenated, averaged, "
              f"summed); use num_microbatches=1")
    if UNVERIFIED in kinds:   # averaged, as for a mean over the batch (the usual loss)
        warnings.warn(
            f"PipeshardParallel(num_microbatches={B}) in {name}: the "
            f"{'step' if forward_only else 'loss'} reads the batch "
            f"through {', '.join(unverified_ops(forward.program))}, through which autoshard "
            f"cannot tell whether its outputs are means over the batch; those are averaged "
            f"over the micro-batches, which gives jax.jit's values only for means (of "
            f"per-example terms)", UserWarning, stacklevel=user_stacklevel())
        kinds = tuple(MEAN if k == UNVERIFIED else k for k in kinds)
    if kinds[0] not in (MEAN, SUM, SAME):
        _fail(f"PipeshardParallel(num_microbatches={B}) in {name}: the loss it differentiates "
              f"is {_not_recovered(kinds[0])}, so its gradient cannot be summed from "
              f"micro-batches into jax.jit's. Make the loss a mean over the batch (jnp.mean of "
              f"per-example terms), a sum, or a function of one such value that depends on the "
              f"parameters and of values that do not (a masked mean: (ce * mask).sum() / "
              f"mask.sum()), or use num_microbatches=1{_row_indexing_hint(forward)}")
    for k, (kind, atom) in enumerate(zip(kinds[1:], forward.program.outvars[1:])):
        if kind is None or kind == MEAN and not np.issubdtype(
                forward.program.avals[atom].dtype, np.inexact):
            path = aux_paths[k] if k < len(aux_paths) else f" leaf {k}"
            where = (f"PipeshardParallel(num_microbatches={B}) in {name} (no gradient: run "
                     f"forward only): its output{path}" if forward_only else
                     f"value_and_grad(has_aux=True) in {name}: aux{path}")
            _fail(f"{where} is "
                  f"{_not_recovered(kind)}, which the {B} micro-batches' values cannot give "
                  f"exactly as jax.jit computes it on the whole batch. Return a mean, sum, "
                  f"maximum or minimum over the batch, one value per example, or a value that "
                  f"does not depend on the batch, or use num_microbatches=1"
                  f"{_row_indexing_hint(forward)}" +
                  (f". If {name} trains a model, take its gradient with jax.value_and_grad or "
                   f"jax.grad: one taken with jax.vjp, jax.jacrev or a custom rule outside "
                   f"such a call is not seen, and the step runs forward only"
                   if forward_only else ""))
    return kinds


def _check_rows_returned(traced: TracedFunction, g: int, combinations, aux_paths,
                         name: str) -> None:
    """An aux leaf holding one value per example (``ROWS``: the micro-batches' values
    concatenated) may only be returned as it is: the work after the gradient runs at one
    micro-batch's shapes. ValueError naming the equation that reads one."""
    program = traced.program
    geqn = program.eqns[g]
    for k, kind in enumerate(combinations[1:]):
        if kind != ROWS:
            continue
        out = geqn.outputs[1 + k]
        for e, eqn in enumerate(program.eqns):
            if out in eqn.inputs:
                where = f"aux{aux_paths[k]}" if k < len(aux_paths) else f"aux leaf {k}"
                _fail(f"value_and_grad(has_aux=True) in {name}: {where} holds one value per "
                      f"example, which PipeshardParallel concatenates from the micro-batches, "
                      f"and {eqn.primitive.name} at {traced.sources[e]} reads it after the "
                      f"gradient. Compute what it is needed for inside the loss function (an "
                      f"aux mean or sum), return it as it is, or use num_microbatches=1")


def _row_indexing_hint(forward: TracedFunction) -> str:
    """A hint where the loss picks an element per row by indexing with ``jnp.arange`` over
    the rows (``logp[jnp.arange(n), labels]``: a gather whose indices are made from an
    ``iota``), which the micro-batch analysis reads as picking rows of the whole batch."""
    F = forward.program
    made = {v: eqn for eqn in F.eqns for v in eqn.outputs}
    for e, eqn in enumerate(F.eqns):
        if eqn.primitive.name != "gather" or not all(isinstance(a, int) for a in eqn.inputs):
            continue
        picks = eqn.params["dimension_numbers"].start_index_map
        rows = F.avals[eqn.inputs[0]].shape[:1]
        if len(picks) < 2 or picks[0] != 0:   # x[i, j]: a row and an element of it
            continue
        stack, seen = [eqn.inputs[1]], set()
        while stack:
            producer = made.get(stack.pop())
            if producer is None or id(producer) in seen:
                continue
            seen.add(id(producer))
            if producer.primitive.name == "iota" and \
                    F.avals[producer.outputs[0]].shape[:1] == rows:
                return (f". The loss indexes its rows with jnp.arange (at {forward.sources[e]}), "
                        f"as in logp[jnp.arange(n), labels], which is read as picking rows of "
                        f"the whole batch; jnp.take_along_axis(logp, labels[:, None], axis=-1) "
                        f"picks the same values row by row")
            stack += [a for a in producer.inputs if isinstance(a, int)]
    return ""


def _not_recovered(kind: str | None) -> str:
    return {MAX: "a maximum over the batch", MIN: "a minimum over the batch",
            MEAN: "an integer mean over the batch"}.get(
        kind, "not a mean, sum, maximum or minimum over the batch, nor a function of such "
              "values (a batch statistic fed back into each row, as batch normalization does, "
              "or one row of the batch)")


def _forward_only(fun):
    """``fun`` (a step without a gradient) as a step whose gradient marker holds all of it:
    the marker's loss is a constant it differentiates, ``fun``'s outputs its aux, combined
    over the micro-batches as each is over the batch (rows concatenated, means averaged)."""
    @functools.wraps(fun)
    def step(*args):
        def loss(anchor):
            return anchor, fun(*args)
        (_, outputs), _ = value_and_grad(loss, has_aux=True)(jax.numpy.zeros((), np.float32))
        return outputs
    return step


def _no_gradient_hint() -> str:
    """Why a gradient may not have been seen, for the error saying none was."""
    if not gradient_routing_available():
        return (f" (this jax, {jax.__version__}, does not let autoshard see jax.value_and_grad "
                f"calls: use autoshard.value_and_grad)")
    return (". Gradients taken with jax.vjp, jax.jacrev or a custom rule outside such a call "
            "are not seen: call jax.value_and_grad on the loss instead")


def loss_of(geqn) -> TracedFunction:
    """The function the gradient marker ``geqn`` differentiates, flat: its inputs the
    marker's operands, its outputs the loss, then the aux leaves."""
    jaxpr, n = geqn.params["jaxpr"], len(geqn.inputs)
    return flatten_open_jaxpr(jaxpr, tuple(f"loss_input[{k}]" for k in range(n)),
                              ("loss",) + tuple(f"aux[{k}]" for k in range(len(jaxpr.outvars) - 1)),
                              keep_custom_rules=True)  # the stages are differentiated again


def _random_rows(split: SplitStep, fun, B: int, micro_rows, full: Program | None
                 ) -> SplitStep:
    """Random draws in the loss that follow the batch, made per micro-batch as ``jax.jit``
    makes them for the whole batch (:mod:`.random_rows`): the row tables become constants
    of the outer program, batch values read by the gradient marker. Draws that cannot be
    reproduced are warned about. ``full``: the loss traced at the whole batch's shapes."""
    name = getattr(fun, "__name__", "the function")
    rows = reproduce_random_rows(split.forward, full, B, micro_rows)
    if rows.problems:
        warnings.warn(
            f"PipeshardParallel(num_microbatches={B}): the loss in {name} draws random "
            f"numbers that follow the batch, which the pipeline cannot draw as jax.jit does: "
            f"{'; '.join(rows.problems)}. Each of the {B} micro-batches draws these at its "
            f"own shape{f' ({micro_rows} rows)' if micro_rows else ''} from the same key, so "
            f"every micro-batch gets the "
            f"same values, where jax.jit draws different ones for each row of the whole "
            f"batch: dropout masks or noise, and so the loss and the gradients, differ from "
            f"jax.jit's. To get jax.jit's values, draw from jax's default PRNG (threefry2x32 "
            f"with jax_threefry_partitionable=True) with the batch as the leading dimension, "
            f"or use num_microbatches=1", UserWarning, stacklevel=user_stacklevel())
    if not rows.strides:
        return split
    O = split.traced.program
    F = rows.forward.program
    avals, constants = list(O.avals), list(O.constants)
    tables = []
    for stride, v in zip(rows.strides, F.invars[len(split.diff):], strict=True):
        tables.append(len(avals))
        avals.append(F.avals[v])
        constants.append((tables[-1], row_table(micro_rows * B, stride)))
    geqn = O.eqns[split.grad_eqn]
    diff = split.diff + (False,) * len(tables)
    eqns = list(O.eqns)
    eqns[split.grad_eqn] = Equation(geqn.primitive, {**geqn.params, "diff": diff},
                                    tuple(geqn.inputs) + tuple(tables), geqn.outputs,
                                    geqn.source_info)
    program = Program(tuple(avals), O.invars, O.outvars, tuple(eqns), tuple(constants))
    return dataclasses.replace(
        split, traced=dataclasses.replace(split.traced, program=program),
        batch_vids=split.batch_vids | frozenset(tables), forward=rows.forward, diff=diff,
        batch=split.batch + (True,) * len(tables))
