"""``autoshard.parallelize``: a jit-like wrapper that plans once per signature, then runs."""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from typing import Any, Callable

import jax
import numpy as np

from autoshard.distributed.agreement import check_same_plan
from autoshard.intra.annotations import AnnotationError, annotated_layouts
from autoshard.intra.batch import default_batch_argnums
from autoshard.intra.planner import plan_traced
from autoshard.intra.problem import undonated_updates
from autoshard.ir import hlo
from autoshard.ir.call import BoundCall, argument_roles, bind_call, dynamic_arguments
from autoshard.ir.fingerprint import check_fingerprint, fingerprint, statics_text
from autoshard.ir.remat import recompute
from autoshard.ir.trace import TracedFunction, aval_struct, trace, traced_body
from autoshard.pipeline.batch_arguments import infer_batch_argnums, splits_into_microbatches
from autoshard.pipeline.planner import plan_pipeline_step
from autoshard.pipeline.reuse import is_plain_pipeline_plan, reuse_pipeline
from autoshard.pipeline.trace import flat_paths
from autoshard.plan.audit import Audit, PipelineAudit
from autoshard.plan.checks import check_plan_mesh, check_plan_method, loops_misfit, specs_misfit
from autoshard.plan.parts import operand_layouts, value_layouts
from autoshard.plan.record import Plan

from .call_errors import check_untyped_tracers, with_donation_hint
from .cost_model import Cluster, format_bytes, parse_bytes
from .errors import InfeasiblePlanError
from .mesh import default_cluster, make_mesh, mesh_axes
from .methods import METHODS, Annotated, PipeshardParallel, ShardParallel
from .planning_gc import rare_cycle_collection
from .runtime import ShardedProgram, instead_of_explicit, outside_other_meshes, shard_program
from .runtime.fast_call import MISSED, FastCall, with_leaves
from .runtime.sharded import PinnedLoop, with_auto_axes


@dataclasses.dataclass(frozen=True, eq=False)
class _Compiled:
    traced: TracedFunction
    plan: Plan
    program: ShardedProgram | None  # None until first run (planning needs no devices)
    agreed: bool = False  # multi-process: every process was found to hold this plan
    pipeline: object = None  # PipelineLayout for PipeshardParallel plans
    donate: tuple[int, ...] = ()  # donated arguments among the call's (BoundCall.donate)
    call: Any = None  # program.for_call(...): the program called with the call's arguments


@dataclasses.dataclass(frozen=True, eq=False)
class _Placement:
    """Where a function runs and how plans are priced: resolved at the first call (or
    ``.plan``) when no mesh was given, so decorating touches no devices."""

    mesh: object
    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    cluster: Cluster
    memory_budget: int | None


class ParallelizedFunction:
    """A function parallelized over a mesh; call it like the original.

    Plans once per input signature (tree structure, shapes, dtypes, weak types, static
    arguments, keyword names) and caches the plan and the compiled executable. A call with
    the signature of the call before (a training loop) goes straight to ``jax.jit``'s C++
    dispatch, which checks and places the arguments: no autoshard code runs per step.
    """

    def __init__(self, fun: Callable, *, mesh=None, method=None, cluster: Cluster | None = None,
                 memory_budget: int | str | None = None, batch_argnums=None,
                 static_argnums=None, donate_argnums=None, static_argnames=None,
                 donate_argnames=None, plan: Plan | None = None):
        if not callable(fun):
            raise TypeError(f"parallelize expects a callable, got {type(fun).__name__}")
        method_given = method is not None
        method = ShardParallel() if method is None else method
        if not isinstance(method, METHODS):
            if isinstance(method, type) and issubclass(method, METHODS):
                method = method()
            else:
                names = ", ".join(f"autoshard.{m.__name__}()" for m in METHODS)
                raise TypeError(f"method must be one of {names}; got {method!r}")
        self._fun = fun
        self._method = method
        self._roles = argument_roles(
            fun, static_argnums=static_argnums, static_argnames=static_argnames,
            donate_argnums=donate_argnums, donate_argnames=donate_argnames,
            batch_argnums=batch_argnums)
        self._mesh_arg, self._cluster_arg = mesh, cluster
        self._budget_arg = parse_bytes(memory_budget) if memory_budget is not None else None
        self._placement: _Placement | None = None
        if plan is not None:
            if not isinstance(plan, Plan):
                raise TypeError(f"plan must be an autoshard.Plan (e.g. "
                                f"autoshard.Plan.from_json(text)), got {type(plan).__name__}")
            check_plan_method(plan, method if method_given else None)
            if isinstance(plan.method, PipeshardParallel):
                # the pipeline's micro-batches, schedule and layering come from the plan
                if method_given and method != plan.method:
                    raise ValueError(
                        f"the plan passed to parallelize(plan=...) was made with method "
                        f"{plan.method!r}, but method={method!r} was given: method mismatch "
                        f"(leave method out to reuse the plan as it is)")
                self._method = plan.method
        self._fixed_plan = plan
        if mesh is not None:  # a given mesh is checked now; the default waits for a call
            self._resolve()
        self._cache: dict = {}
        self._layouts: dict = {}  # (number of arguments, keywords) -> BoundCall without args
        self._fast = FastCall()  # the last program run, tried first on the next call
        functools.update_wrapper(self, fun)

    def _resolve(self) -> _Placement:
        """The mesh (default: all devices, one axis), cluster and budget, made once."""
        if self._placement is None:
            mesh = self._mesh_arg if self._mesh_arg is not None else \
                make_mesh((jax.device_count(),), ("devices",))
            shape, names = mesh_axes(mesh)
            mesh = with_auto_axes(mesh)
            cluster = self._cluster_arg if self._cluster_arg is not None else \
                default_cluster(mesh)
            budget = self._budget_arg if self._budget_arg is not None else \
                _default_budget(cluster)
            if self._fixed_plan is not None:
                check_plan_mesh(self._fixed_plan, shape, names)
            self._placement = _Placement(mesh, shape, names, cluster, budget)
        return self._placement

    def __repr__(self):
        if self._placement is None:
            mesh = "all devices (resolved at the first call)"
        else:
            mesh = dict(zip(self._placement.axis_names, self._placement.mesh_shape))
        return (f"ParallelizedFunction({getattr(self._fun, '__name__', self._fun)!r}, "
                f"mesh={mesh}, method={self._method!r})")

    # ------------------------------------------------------------ signature
    def _bind(self, args, kwargs) -> BoundCall:
        """The call laid out positionally, with its static/donated/batch positions (which
        depend only on how many arguments came and the keywords' names: laid out once)."""
        shape = (len(args), tuple(sorted(kwargs)))
        layout = self._layouts.get(shape)
        if layout is None:
            call = bind_call(self._fun, self._roles, tuple(args), dict(kwargs))
            self._layouts[shape] = dataclasses.replace(call, args=())  # keep no arrays
            return call
        return dataclasses.replace(layout, args=tuple(args) + tuple(kwargs[k] for k in shape[1]))

    def _key(self, call: BoundCall) -> Any:
        return self._signature(call)[0]

    def _signature(self, call: BoundCall) -> tuple[Any, list]:
        """(the cache key of ``call``: tree, shapes, dtypes, weak types, static values;
        the flat array leaves of its non-static arguments)."""
        statics = []
        for i in call.static:
            value = call.args[i]
            try:
                hash(value)
            except TypeError:
                where = f"argument {i}" if i < call.num_positional else \
                    f"keyword argument {call.keywords[i - call.num_positional]!r}"
                raise TypeError(f"static {where} must be hashable, got "
                                f"{type(value).__name__}") from None
            statics.append((i, value))
        leaves, treedef = jax.tree_util.tree_flatten(dynamic_arguments(call.args, call.static))
        return (len(call.args), call.keywords, treedef,
                tuple(_leaf_signature(x) for x in leaves), tuple(statics)), leaves

    def _flags(self, call: BoundCall, traced: TracedFunction | None = None
               ) -> tuple[list[bool], list[bool], tuple[int, ...]]:
        """Per flat input of the call: (holds the batch, is donated), and the batch
        arguments. Without ``batch_argnums`` the batch is inferred: from ``traced`` (see
        ``intra.batch``), or for a pipeline from the gradient's inputs."""
        args = call.args
        leaves, paths, _ = flat_paths(args, call.static)
        donated = _under_args(paths, call.donate)
        batch = call.batch
        if batch is None and traced is not None:
            batch = default_batch_argnums(traced, donated)
        elif batch is None:
            dyn = [i for i in range(len(args)) if i not in call.static]
            batch = (dyn[-1],) if dyn else ()
            if batch and isinstance(self._method, PipeshardParallel):
                # x and y of step(params, opt_state, x, y): see PipeshardParallel
                batch = infer_batch_argnums(call.fun, args, call.static, batch[0])
        flags = _under_args(paths, batch)
        if isinstance(self._method, PipeshardParallel):  # scalars and keys are read whole
            flags = [f and splits_into_microbatches(x) for f, x in zip(flags, leaves)]
        return flags, donated, tuple(batch)

    def _compiled(self, call: BoundCall, need_program: bool, key=None) -> _Compiled:
        key = self._key(call) if key is None else key
        entry = self._cache.get(key)
        if entry is None:
            statics = statics_text(key[-1])
            # (traced in the plan's mesh where the caller set one of Explicit axes)
            with rare_cycle_collection(), instead_of_explicit(self._resolve().mesh):
                if isinstance(self._method, PipeshardParallel):
                    entry = self._plan_pipeline(call, statics)
                else:
                    entry = self._plan(call, statics)
            entry = dataclasses.replace(entry, donate=call.donate)
            self._cache[key] = entry
        if need_program and entry.program is None:
            entry = dataclasses.replace(entry, program=self._shard(entry))
            self._cache[key] = entry
        return entry

    def _plan(self, call: BoundCall, statics: str) -> _Compiled:
        start = time.perf_counter()
        where = self._resolve()
        traced = trace(call.fun, call.args, call.static, step_limit=True,
                       rolled_layers=not getattr(self._method, "unroll_scans", False))
        if self._fixed_plan is not None:  # a saved plan: check it, don't solve
            plan = self._reuse_plan(traced, statics)
            return _Compiled(_rematerialized(traced, plan), plan, None)
        batch, donated, batch_args = self._flags(call, traced)
        try:
            plan = plan_traced(traced, mesh_shape=where.mesh_shape,
                               axis_names=where.axis_names, cluster=where.cluster,
                               method=self._method, batch_flat=batch, static_repr=statics,
                               donated_flat=donated, memory_budget=where.memory_budget
                               if isinstance(self._method, ShardParallel) else None,
                               deadline=self._deadline(start),
                               annotations=self._annotations(call, batch, where),
                               rematerialize=True, compiled_peak=self._compiled_peak(call))
        except InfeasiblePlanError as err:
            raise with_donation_hint(err, undonated_updates(traced, donated), call) from None
        plan = dataclasses.replace(plan, batch=_argument_names(call, batch_args),
                                   batch_inferred=call.batch is None)
        self._check_budget(plan)
        return _Compiled(_rematerialized(traced, plan), plan, None)

    def _compiled_peak(self, call: BoundCall):
        """On a mesh of devices in one process, the bytes per device XLA compiles a
        candidate (traced program, plan) into (``memory_analysis``), for the planner to
        check the activations it recomputes against the budget; ``None`` elsewhere (an
        abstract mesh; across processes, where every process must plan alike)."""
        mesh = self._resolve().mesh
        if not isinstance(mesh, jax.sharding.Mesh) or jax.process_count() > 1:
            return None

        def compiled_peak(traced: TracedFunction, plan: Plan) -> float:
            program = _sharded(traced, plan, mesh, call.donate)
            return hlo.memory(program.lower().compile())["total"]
        return compiled_peak

    def _annotations(self, call: BoundCall, batch_flat, where: _Placement):
        """A spec per flat input read off the model's own sharding annotations (see
        ``intra.annotations``): the layout of :class:`Annotated` (whose errors are the
        user's to see), or one more starting plan for the search (``None`` when the
        arguments carry none, or none that fit this mesh)."""
        method = self._method
        if not isinstance(method, (Annotated, ShardParallel)):
            return None
        rules = method.rules if isinstance(method, Annotated) else ()
        try:
            specs, count = annotated_layouts(call.args, call.static, batch_flat,
                                             where.mesh_shape, where.axis_names, rules)
        except AnnotationError:
            if isinstance(method, Annotated):
                raise
            return None
        if count == 0 and isinstance(method, Annotated):
            raise ValueError(
                "method=autoshard.Annotated() found no sharding annotations among the "
                "arguments: annotate the model's parameters (flax linen: "
                "nn.with_partitioning / nn.with_logical_partitioning; nnx: "
                "nnx.with_partitioning or out_sharding=...) and pass them boxed, or choose "
                "another method")
        return specs if count else None

    def _deadline(self, start: float) -> float | None:
        """When the search must end: ``time_limit_s`` wall seconds after planning
        started, in a single process. Across processes, or with the environment variable
        ``AUTOSHARD_DETERMINISTIC=1``, ``None``: the deterministic limit alone, so that
        every process (and every run) finds the same plan (see ``distributed.agreement``)."""
        if not isinstance(self._method, ShardParallel) or jax.process_count() > 1 or \
                os.environ.get(DETERMINISTIC_ENV, "0") not in ("", "0"):
            return None
        return start + self._method.time_limit_s

    def _plan_pipeline(self, call: BoundCall, statics: str) -> _Compiled:
        where = self._resolve()
        batch, donated, batch_args = self._flags(call)
        devices = None
        if isinstance(where.mesh, jax.sharding.Mesh):
            devices = [d.id for d in np.asarray(where.mesh.devices).reshape(-1)]
        if self._fixed_plan is not None:  # a saved plan: rebuild it, solve nothing
            if is_plain_pipeline_plan(self._fixed_plan):  # it kept plain intra-op
                return self._plan(call, statics)
            layout = reuse_pipeline(call.fun, call.args, self._fixed_plan,
                                    static_argnums=call.static, batch_flags=batch,
                                    method=self._method, static_repr=statics,
                                    device_ids=devices)
            return _Compiled(layout.split.traced, self._fixed_plan, None, pipeline=layout)
        step = plan_pipeline_step(
            call.fun, call.args, static_argnums=call.static, batch_flags=batch,
            donated_flags=donated, mesh_shape=where.mesh_shape, axis_names=where.axis_names,
            cluster=where.cluster, method=self._method, memory_budget=where.memory_budget,
            static_repr=statics, device_ids=devices)
        plan = dataclasses.replace(step.plan, batch=_argument_names(call, batch_args),
                                   batch_inferred=call.batch is None)
        self._check_budget(plan)
        return _Compiled(step.traced, plan, None, pipeline=step.layout)

    def _check_budget(self, plan: Plan) -> None:
        """The constrained search re-checks its peak steps; this catches what a
        conservative estimate can still miss, and presets, which are not searched."""
        budget = self._resolve().memory_budget
        if budget is not None and plan.cost.peak_memory_bytes > budget:
            hint = ("" if isinstance(self._method, ShardParallel) else
                    ", or method=autoshard.ShardParallel() to search for a plan that fits")
            raise InfeasiblePlanError(
                f"the plan needs {format_bytes(plan.cost.peak_memory_bytes)} per device, over "
                f"memory_budget={format_bytes(budget)} ({plan.method!r}); give a larger budget "
                f"or use more devices{hint}", plan.cost.peak_memory_bytes, budget)

    def _reuse_plan(self, traced: TracedFunction, statics: str) -> Plan:
        """The fixed plan, after checking it was made for this signature."""
        plan = self._fixed_plan
        check_fingerprint(plan, fingerprint(traced, statics), "plan again")
        try:
            traced = _rematerialized(traced, plan)
        except ValueError as err:
            raise ValueError(f"the plan passed to parallelize(plan=...) has plan.remat {err}; "
                             f"leave plan out to plan again") from None
        misfit = specs_misfit(traced.program, plan.flat_in_specs, plan.flat_out_specs,
                              plan.value_specs, plan.operand_specs) or loops_misfit(
            traced.program, plan.loops, lambda eqn: traced_body(eqn).program)
        if misfit is not None:
            raise ValueError(f"the plan passed to parallelize(plan=...) {misfit}: it was made "
                             f"for another function with the same signature (or the file was "
                             f"edited); leave plan out to plan again")
        return plan

    def _shard(self, entry: _Compiled) -> ShardedProgram:
        mesh = self._resolve().mesh
        if not isinstance(mesh, jax.sharding.Mesh):
            raise ValueError("this function was parallelized over an abstract mesh: it can be "
                             "planned (.plan) but not run or lowered; pass a mesh made by "
                             "autoshard.make_mesh to run it")
        if entry.pipeline is not None:
            from autoshard.pipeline.build import build_pipeline
            return build_pipeline(entry.pipeline, mesh,
                                  donated=_under_args(entry.traced.in_paths, entry.donate))
        return _sharded(entry.traced, entry.plan, mesh, entry.donate)

    def _called(self, entry: _Compiled, call: BoundCall, key) -> _Compiled:
        """``entry`` with its program as called (``ShardedProgram.for_call``): the one
        program that runs, lowers and compiles for this signature."""
        if entry.call is None:
            entry = dataclasses.replace(entry, call=entry.program.for_call(
                call.args, call.static, call.donate, entry.traced.out_tree))
            self._cache[key] = entry
        return entry

    def _agree(self, entry: _Compiled) -> None:
        """Multi-process runs: raise PlanMismatchError unless all processes hold this plan."""
        program = entry.traced.program
        name = getattr(self._fun, "__qualname__", None) or repr(self._fun)
        check_same_plan(entry.plan,
                        f"{name}: {len(program.invars)} inputs, {len(program.outvars)} "
                        f"outputs, {len(program.eqns)} equations, signature "
                        f"{entry.plan.fingerprint}, {entry.plan.method!r}, cluster "
                        f"{entry.plan.cluster.name}")

    # ------------------------------------------------------------ public
    def plan(self, *args, **kwargs) -> Plan:
        """The plan for these arguments (arrays or ShapeDtypeStructs); nothing runs.
        Keyword arguments come after the positional ones in the plan's ``in_specs``, in
        name order (as jax.jit orders them)."""
        return self._compiled(self._bind(args, kwargs), need_program=False).plan

    def lower(self, *args, **kwargs):
        """The ``jax.stages.Lowered`` of the planned program for these arguments.

        A pipeline (:class:`PipeshardParallel`) runs several programs, so it lowers to a
        :class:`~autoshard.runtime.PipelineLowered`: one ``Lowered`` per program by name
        (``"pre-gradient"``, ``"stage 0 forward"``, ``"stage 0 backward"``, …, ``"apply on
        stage 0"`` or ``"apply on the mesh"``), each for its sub-mesh and, for the stages,
        one micro-batch; ``.compile()`` gives their ``Compiled`` objects with
        ``cost_analysis()`` / ``memory_analysis()`` as dicts by name, and ``as_text()``
        all programs under headers. (When the planner kept plain intra-op parallelism,
        one program, this is a plain ``Lowered``, as for :class:`ShardParallel`.)
        """
        return self._staged("lower", args, kwargs)

    def trace(self, *args, **kwargs):
        """The ``jax.stages.Traced`` of the planned program for these arguments (its
        ``jaxpr``, ``out_info``, ``.lower()``), as ``jax.jit(...).trace`` gives."""
        return self._staged("trace", args, kwargs)

    def _staged(self, stage: str, args, kwargs):
        """``jax.jit``'s ``stage`` (``"lower"`` or ``"trace"``) of the planned program, at
        the planned layouts; a pipeline lowers each of its programs and has no one trace."""
        call = self._bind(args, kwargs)
        key = self._key(call)
        entry = self._compiled(call, need_program=True, key=key)
        if not isinstance(entry.program, ShardedProgram):
            if stage == "lower":
                return entry.program.lower()
            raise TypeError("a PipeshardParallel step runs one program per stage, so it has no "
                            "single trace: use .lower(...) for each program's Lowered")
        entry = self._called(entry, call, key)
        return getattr(entry.call, stage)(*with_leaves(call, entry.program.argument_structs()))

    def eval_shape(self, *args, **kwargs):
        """The outputs for these arguments (arrays or ShapeDtypeStructs) as
        ``jax.ShapeDtypeStruct``s laid out as the plan returns them (``sharding``: a
        ``NamedSharding`` on the mesh, abstract or not): planned, nothing compiled or run,
        as ``jax.jit(...).eval_shape``. A pipeline's outputs are on its stages' sub-meshes:
        shapes and dtypes only."""
        call = self._bind(args, kwargs)
        entry = self._compiled(call, need_program=False)
        program = entry.traced.program
        if entry.pipeline is None:
            avals = [program.avals[a] if isinstance(a, int) else jax.typeof(a.value)
                     for a in program.outvars]
        else:   # (traced at one micro-batch's shapes)
            avals = entry.pipeline.split.output_avals(entry.pipeline.method.num_microbatches)
        specs = entry.plan.flat_out_specs if entry.pipeline is None else (None,) * len(avals)
        mesh = self._resolve().mesh
        return jax.tree_util.tree_unflatten(entry.traced.out_tree, [
            jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type, sharding=None
                                 if spec is None else jax.sharding.NamedSharding(mesh, spec))
            for a, spec in zip(avals, specs, strict=True)])

    def clear_cache(self) -> None:
        """Forget every plan and compiled program: the next call plans again."""
        self._cache.clear()
        self._layouts.clear()
        self._fast = FastCall()

    def audit(self, *args, **kwargs) -> Audit | PipelineAudit:
        """The plan for these arguments against its compiled program (:meth:`Plan.audit`;
        a pipeline's, program by program), with XLA's compile log read for involuntary
        rematerializations (compiled afresh for it: a step already run is audited alike)."""
        compiled, log = hlo.fresh_compile(self.lower(*args, **kwargs))
        return self.plan(*args, **kwargs).audit(compiled, log)

    def __call__(self, *args, **kwargs):
        outs = self._fast(args, kwargs)
        if outs is not MISSED:
            return outs
        call = self._bind(args, kwargs)
        key, flat = self._signature(call)
        if isinstance(self._method, PipeshardParallel) and \
                any(isinstance(a, jax.core.Tracer) for a in flat):
            raise TypeError(
                "a PipeshardParallel step runs one program per stage and moves values "
                "between sub-meshes as it goes: call it directly, not inside jax.jit, "
                "jax.vmap or jax.grad (a ShardParallel step may be)")
        check_untyped_tracers(call, flat)
        entry = self._compiled(call, need_program=True, key=key)
        if not entry.agreed:  # before anything moves: a mismatch must not hang a collective
            self._agree(entry)
            entry = dataclasses.replace(entry, agreed=True)
            self._cache[key] = entry
        if not isinstance(entry.program, ShardedProgram):  # a pipeline: several programs
            return jax.tree_util.tree_unflatten(entry.traced.out_tree, entry.program(flat))
        entry = self._called(entry, call, key)
        if jax.process_count() == 1:  # (across processes, host values need place_global)
            # next time jax's own dispatch checks the arguments, with no Python of ours on
            # the way (as in a training loop: the same signature, the state on the mesh)
            self._fast.aim(entry.call, len(args), call.keywords, entry.program.mesh)
        with outside_other_meshes(entry.program.mesh):
            return entry.call(*with_leaves(call, entry.program.place(flat)))


def _sharded(traced: TracedFunction, plan: Plan, mesh, donate_argnums) -> ShardedProgram:
    """``traced``'s program as ``plan`` lays it out on ``mesh`` (one program, not a
    pipeline), donating the leaves under ``donate_argnums``."""
    flags = _under_args(traced.in_paths, donate_argnums)
    operands, via = operand_layouts(plan.operand_specs)
    values, values_via = value_layouts(plan.value_specs)
    return shard_program(traced.program, mesh, plan.flat_in_specs, plan.flat_out_specs,
                         value_specs=values, operand_specs=operands,
                         donate_argnums=[i for i, d in enumerate(flags) if d],
                         operand_via=via, value_via=values_via,
                         loops=_pinned_loops(traced.program, plan.loops))


def _pinned_loops(program, loops) -> dict:
    """``loops`` (a plan's :class:`LoopLayouts`) as the runtime pins them: equation ->
    :class:`~autoshard.runtime.sharded.PinnedLoop`, its body traced as it was planned."""
    pinned = {}
    for loop in loops:
        body = traced_body(program.eqns[loop.eqn]).program
        operands, via = operand_layouts(loop.operand_specs)
        values, values_via = value_layouts(loop.value_specs)
        pinned[loop.eqn] = PinnedLoop(body, loop.flat_in_specs, loop.flat_out_specs, values,
                                      operands, via, values_via, loop.in_via, loop.out_via)
    return pinned


def _rematerialized(traced: TracedFunction, plan: Plan) -> TracedFunction:
    """The program ``plan`` runs: ``traced`` with its ``remat`` segments recomputed."""
    return traced if plan.remat is None else recompute(traced, plan.remat)


def _leaf_signature(leaf) -> tuple:
    """What a plan depends on of one argument leaf: shape, dtype and weak type (a Python
    scalar is weakly typed, so ``int8 array * 3`` stays int8, as under jax.jit). A
    ``jax.Array`` (the common case, every step) is read directly: no abstract value made."""
    weak = getattr(leaf, "weak_type", None)  # typed PRNG key arrays have none
    if weak is not None and isinstance(leaf, jax.Array):
        return (leaf.shape, leaf.dtype, weak)
    try:
        aval = aval_struct(leaf)
    except (TypeError, ValueError, OverflowError):  # not an array: trace() says so
        return (type(leaf).__module__, type(leaf).__qualname__)
    return (tuple(aval.shape), aval.dtype, bool(aval.weak_type))


#: set to 1 to plan as ``jax.distributed`` processes do in a single process too: with
#: CP-SAT's deterministic limit instead of the wall clock, so every run finds the same plan
DETERMINISTIC_ENV = "AUTOSHARD_DETERMINISTIC"


def _argument_names(call: BoundCall, argnums) -> tuple[str, ...]:
    """``args[i]`` for each argument, with its keyword for one passed by keyword."""
    return tuple(f"args[{i}]" if i < call.num_positional else
                 f"args[{i}] ({call.keywords[i - call.num_positional]}=)" for i in argnums)


def _under_args(paths, argnums) -> list[bool]:
    """Per flat input path (``args[2]['x']``): whether it belongs to one of ``argnums``."""
    def under(path, i):
        head = f"args[{i}]"
        return path.startswith(head) and not path[len(head):][:1].isdigit()
    return [any(under(p, i) for i in argnums) for p in paths]


def _default_budget(cluster: Cluster) -> int | None:
    """A cluster that declares a memory reserve (the GPU presets) gives its device memory
    less the reserve; otherwise (the host CPU) no budget unless one is given."""
    if cluster.memory_reserve > 0:
        return cluster.device_memory - cluster.memory_reserve
    return None


def parallelize(fun: Callable | None = None, *, mesh=None, method=None,
                cluster: Cluster | None = None, memory_budget: int | str | None = None,
                batch_argnums: int | Sequence[int] | None = None,
                static_argnums: int | Sequence[int] | None = None,
                donate_argnums: int | Sequence[int] | None = None,
                static_argnames: str | Sequence[str] | None = None,
                donate_argnames: str | Sequence[str] | None = None, plan: Plan | None = None):
    """Parallelize ``fun`` over ``mesh`` (jit-like; also usable as a decorator).

    ``mesh``: default, every device on one axis, made at the first call (so decorating
    at import time touches no devices, e.g. before ``jax.distributed.initialize()``). A
    mesh of Explicit axes (``jax.make_mesh``'s default) is taken with Auto axes: the plan
    lays every value out, as ``jax.jit`` does on Auto axes, and the outputs are on that
    mesh. Arguments may be on any mesh (they are moved to the plan's layouts), and the
    step may be called under ``jax.set_mesh`` of any mesh.
    ``method``: :class:`ShardParallel` (ILP, default), a preset (:class:`DataParallel`,
    :class:`ZeRO3`, :class:`Megatron`, :class:`Annotated`: the model's own annotations)
    or :class:`PipeshardParallel` (pipeline stages on sub-meshes; the step takes one
    gradient, with ``jax.value_and_grad`` / ``jax.grad`` or autoshard's). ``batch_argnums``:
    the arguments holding the batch (default: inferred, ``plan.batch`` says which: the
    arguments that are not returned at their key path or donated, not PRNG keys or
    scalars, and share the last such one's leading dim; under :class:`PipeshardParallel`
    the last non-static one that is not a key or scalar, and those it infers as batch
    data, see there); presets split those on their leading dim.
    ``memory_budget``: bytes per device (``"16GiB"``) that the plan's estimated peak
    must fit (default: the cluster's device memory less its reserve for GPU presets,
    none on the host CPU); the ILP then trades speed for memory, and
    :class:`InfeasiblePlanError` names the smallest feasible peak.
    ``static_argnums`` / ``static_argnames`` / ``donate_argnums`` / ``donate_argnames``
    as in ``jax.jit``: numbers are checked against the function's signature (negative
    ones count from its last positional parameter), names are inferred from numbers and
    numbers from names, and calls may pass arguments by keyword
    (``step(params, batch=b)``). ``plan``: a saved :class:`Plan` (``Plan.from_json``) to
    run as it is, without solving; ``ValueError`` if it was made for another mesh,
    method or input signature.
    """
    kwargs = dict(mesh=mesh, method=method, cluster=cluster, memory_budget=memory_budget,
                  batch_argnums=batch_argnums, static_argnums=static_argnums,
                  donate_argnums=donate_argnums, static_argnames=static_argnames,
                  donate_argnames=donate_argnames, plan=plan)
    if fun is None:
        return lambda f: ParallelizedFunction(f, **kwargs)
    return ParallelizedFunction(fun, **kwargs)
