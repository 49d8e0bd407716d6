"""From a traced function to a Plan: build the problem, solve it (under a memory budget
when one is given), and record the chosen strategies as a :class:`Plan`."""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from jax.sharding import PartitionSpec

from autoshard import ilp
from autoshard.cost_model import Cluster, MeshCostModel, format_bytes
from autoshard.errors import InfeasiblePlanError
from autoshard.ir.fingerprint import fingerprint
from autoshard.ir.loop_view import loop_view
from autoshard.ir.remat import recompute
from autoshard.ir.specs import Spec
from autoshard.ir.trace import TracedFunction
from autoshard.methods import PRESETS, ShardParallel
from autoshard.plan.record import Plan

from .liveness import live_ranges
from .loop_plans import unspliced
from .memory_points import (
    candidate_steps,
    counted_peak_bytes,
    memory_terms,
    planned_peak_bytes,
    steps_over,
    tensor_bytes,
)
from .plan_record import plan_record
from .problem import ShardingProblem, build_problem, propagated_choices
from .remat import fewest_segments, forward_segments
from .shared_reads import per_use_from_shared, prefer_made_layouts, shared_from_per_use

_log = logging.getLogger("autoshard")
#: a budgeted search also starts from the unconstrained plan moved until it fits
#: (``ilp.fit_to_budget``) when that plan peaks at most this fraction over the budget.
#: Measured on the 70B-shaped GPT on 8x8x8 (h100-80gb, 79 GiB): at 40 layers the optimum
#: peaks 3% over and its repair starts the search at 1.113 s per step, which ends at
#: 1.091 s (from the cheapest preset-like start that fits: 1.270 s); at 80 layers it peaks
#: 105% over, and the repair (3.07 s) is a worse start than a ZeRO-like seed (3.04 s
#: against 2.64 s in the end): halving the memory calls for another layout, not a few moves.
REPAIR_EXCESS = 0.25
#: a deep model's (tied) budgeted plan is that repair, unsearched, when it costs at most
#: this fraction more than the unconstrained plan. Measured on the LLaMA-7B-shaped GPT on
#: 8x8 (h100-80gb, 79 GiB): the unconstrained plan (0.830 s per step) peaks just over the
#: budget, its repair fits at 0.865 s (4.2 % more), and the search from it ran 23 s (LP,
#: CP-SAT's presolve, then a stall) and returned it unchanged (before the values written
#: for reductions were counted: 0.811 s, repaired 0.833 s, 16 s of search, unchanged).
REPAIR_ACCEPTED = 0.05
#: solves again, with the ILP's budget lowered, when the plan's reported peak is over the
#: budget (the ILP's rows count the plan's values, not the layout copies XLA adds)
REPORTED_PEAK_RETRIES = 3
#: the solver's deadline comes this fraction of the problem's build time (strategies and
#: prices) before the caller's, for the work after it: the solver's own (expanding tied
#: classes, polishing, pricing candidates on the whole problem), the plan's peak placed as
#: XLA places it, and the plan record. Measured on the 70B-shaped GPT on 8x8x8 (budgeted,
#: ``time_limit_s=60``): built in 10-13 s, then 1-3 s past the solver's deadline and 1.9-2.3 s
#: of peak and record; planning took 60.3 s with no reserve, 60.1 s with 0.3, 58.7 s with 0.5
POST_SOLVE_RESERVE = 0.5


def plan_traced(traced: TracedFunction, *, mesh_shape: tuple[int, ...],
                axis_names: tuple[str, ...], cluster: Cluster, method,
                batch_flat: Sequence[bool], static_repr: str = "",
                donated_flat: Sequence[bool] = (), memory_budget: float | None = None,
                in_layouts: Mapping[int, PartitionSpec] | None = None,
                carried: Sequence[tuple[int, int]] = (), carried_weight: float = 1.0,
                deadline: float | None = None,
                annotations: Sequence[Spec] | None = None, rematerialize: bool = False,
                compiled_peak: Callable[[TracedFunction, Plan], float] | None = None) -> Plan:
    """Plan ``traced`` on a mesh of ``mesh_shape`` with ``method``; with ``memory_budget``
    (bytes per device) the estimated peak memory of the plan stays within it.

    ``in_layouts``: flat input index → the layout that input already has on this mesh
    (another program, run before on the same devices, made it or reads it so). The plan
    reads it in that layout, whatever ``method`` allows, and prices no copy from the host
    for it; a pipeline uses this so that its programs agree at their boundaries.

    ``carried``: (flat output, flat input) pairs priced as carried (the output is read
    in that input's layout later), besides those :func:`carried_pairs` finds by key path;
    a pipeline stage pairs each parameter's gradient with the parameter, which the
    apply-gradient program reads in the stage's layout. Their resharding is priced at
    ``carried_weight`` times its cost (a stage that runs B times per step pays it once:
    1/B).

    ``deadline``: ``time.perf_counter()`` seconds by which the solver must be done (it
    then returns the best plan found so far); ``None``: the method's deterministic
    limit alone, so that every process of a multi-process run finds the same plan.

    ``annotations``: a spec per flat input read off the model's own sharding annotations
    (``intra.annotations``): the layout of :class:`~autoshard.Annotated`, and one more
    starting plan for the search.

    ``rematerialize``: when no plan of ``traced`` meets ``memory_budget`` and the method is
    :class:`~autoshard.ShardParallel` with ``remat=True``, plan the program that recomputes
    the fewest forward segments in the backward pass that lets one fit (``intra.remat``);
    the plan's ``remat`` names them, and what runs is ``ir.remat.recompute(traced,
    plan.remat)``. ``compiled_peak(traced, plan)``: the bytes per device XLA compiles a
    candidate into (on a mesh of real devices); each count of recomputed segments must fit
    by it as well as by the model."""
    plan = functools.partial(
        _plan_program, mesh_shape=mesh_shape, axis_names=axis_names, cluster=cluster,
        method=method, batch_flat=batch_flat, static_repr=static_repr,
        donated_flat=donated_flat, memory_budget=memory_budget, in_layouts=in_layouts,
        carried=carried, carried_weight=carried_weight, deadline=deadline,
        annotations=annotations)
    may_recompute = rematerialize and memory_budget is not None and \
        isinstance(method, ShardParallel) and method.remat
    found = None
    try:
        found = plan(traced)
        return _within(found, memory_budget) if may_recompute else found
    except InfeasiblePlanError as err:
        # cut the forward only now: most budgeted plans fit without recomputing
        candidates = forward_segments(traced.program) if may_recompute else None
        if candidates is None:
            if found is not None:
                return found  # over the budget: the caller's budget check reports it
            raise
        storing = err
    signature = fingerprint(traced, static_repr)  # a saved plan is checked against the call's

    rewritten = functools.cache(lambda remat: recompute(traced, remat))

    def recomputing(remat):
        found = _within(plan(rewritten(remat)), memory_budget)
        return dataclasses.replace(found, remat=remat, fingerprint=signature)

    def compiled_within(found):
        return _within(found, memory_budget, compiled_peak(rewritten(found.remat), found))

    return fewest_segments(candidates, recomputing, storing,
                           None if compiled_peak is None else compiled_within)


def _within(plan: Plan, budget: float, compiled: float | None = None) -> Plan:
    """``plan``; :class:`InfeasiblePlanError` when its modelled peak (or ``compiled``, the
    bytes per device XLA compiled it into) exceeds ``budget``."""
    peak = plan.cost.peak_memory_bytes if compiled is None else compiled
    if peak > budget:
        what = "the plan needs" if compiled is None else "XLA compiles the plan into"
        raise InfeasiblePlanError(f"{what} {format_bytes(peak)} per device, over "
                                  f"memory_budget={format_bytes(budget)}", peak, budget)
    return plan


def _plan_program(traced: TracedFunction, *, mesh_shape, axis_names, cluster, method,
                  batch_flat, static_repr, donated_flat, memory_budget, in_layouts, carried,
                  carried_weight, deadline, annotations) -> Plan:
    """:func:`plan_traced` of ``traced`` as it is."""
    start = time.perf_counter()
    model = MeshCostModel(cluster, tuple(mesh_shape))
    view = loop_view(traced)
    if view is not None:  # its loops over layers planned once, on the view of them
        original, traced = traced, view.traced
    program = traced.program
    _log.info("planning %r on mesh %s: %d equations", method,
              "x".join(map(str, mesh_shape)), len(program.eqns))
    problem = build_problem(traced, model, method, batch_flat=batch_flat,
                            axis_names=axis_names, donated_flat=donated_flat,
                            in_layouts=in_layouts, carried=carried,
                            carried_weight=carried_weight, annotations=annotations,
                            view=view)
    request = problem.request
    donated = [v for v, d in zip(program.invars, donated_flat) if d]
    if deadline is not None:  # leave the work after the solve its time
        deadline -= POST_SOLVE_RESERVE * (time.perf_counter() - start)
    if isinstance(method, PRESETS):  # a fixed layout: XLA propagates it, we price that
        choices = propagated_choices(problem, model.mesh_shape)
        plan = plan_record(traced, problem, choices, None, method=method, model=model,
                           cluster=cluster, axis_names=axis_names, static_repr=static_repr,
                           donated=donated, start=start)
        # (nothing pinned, in a loop either: XLA lays its body out from its operands, as it
        # does for jax.jit with the same shardings)
        return plan if view is None else dataclasses.replace(
            plan, fingerprint=fingerprint(original, static_repr))
    _log.info("solving: time limit %g s%s%s", request.time_limit_s,
              ", repeated layers tied" if request.tie_repeats else "",
              f", memory budget {format_bytes(memory_budget)}" if memory_budget else "")
    result, peak = _solve_within_budget(problem, model, donated, memory_budget, deadline)
    choices = result.choices if memory_budget is not None else \
        prefer_made_layouts(problem.graph, problem.grouping, request, result.choices)
    _log.info("solved: %s (%s), %.4g s per step, gap %.2f%%, %d variables (%.2f s, LP %.2f s)",
              result.status, result.stats.solver_status, result.objective, 100 * result.gap,
              result.num_variables, result.solve_time_s, result.stats.lp_time_s)
    plan = plan_record(traced, problem, choices, result, method=method, model=model,
                       cluster=cluster, axis_names=axis_names, static_repr=static_repr,
                       donated=donated, start=start, peak_bytes=peak)
    return plan if view is None else unspliced(plan, view, original, static_repr, model)


def _solve_within_budget(problem: ShardingProblem, model: MeshCostModel, donated,
                         budget: float | None, deadline: float | None
                         ) -> tuple[ilp.IntraOpResult, int | None]:
    """Solve; with a budget, first without it (repeated layers tied, often one LP), then
    within the ILP's memory rows (``_within_rows``). While the plan's reported peak
    (``planned_peak_bytes``: values placed as XLA places them, with the layout copies XLA
    makes, which the rows leave out) exceeds ``budget``, solve the rows again with a budget
    that excess below what they count for the plan (at most ``REPORTED_PEAK_RETRIES`` times;
    a lowered budget no plan meets ends it, and the caller's budget check reports the last
    plan's peak). Returns (the result, its reported peak; None without a budget)."""
    graph, grouping = problem.graph, problem.grouping
    program = graph.traced.program
    request = _until(problem.request, deadline)
    # the ILP's memory terms need no plan: with a budget they are priced while the LP runs
    memory = None if budget is None else functools.cache(lambda: tensor_bytes(
        graph, grouping, model, live_ranges(program, donated, *graph.loop_buffers),
        problem.merged, donated=donated))
    if problem.per_use is not None:
        free = _solve_shared(problem, request, deadline, meanwhile=memory)
    else:
        free = ilp.solve_intra_op(request, starting_plan=_hint(problem, meanwhile=memory))
    if memory is None:
        return free, None
    tensors = memory()

    def reported(result):
        return planned_peak_bytes(graph, model, grouping.expand(result.choices), donated,
                                  problem.merged)

    result = _within_rows(problem, model, request, free, tensors, budget, deadline)
    peak, rows_budget, earlier = reported(result), budget, [result.choices]
    for _ in range(REPORTED_PEAK_RETRIES):
        if peak <= budget:
            break
        # below what the rows count for this plan, by the excess: the plan no longer fits them
        counted = counted_peak_bytes(tensors, result.choices, len(program.eqns))
        rows_budget = min(rows_budget, counted) - (peak - budget)
        _log.info("the plan peaks at %s per device placed as XLA places it, over the budget: "
                  "solving again with %s for the ILP's memory rows", format_bytes(peak),
                  format_bytes(rows_budget))
        try:
            result = _within_rows(problem, model, request, free, tensors, rows_budget, deadline,
                                  earlier=earlier)
        except InfeasiblePlanError:
            break
        peak = reported(result)
        earlier.append(result.choices)
    return result, peak


def _within_rows(problem: ShardingProblem, model: MeshCostModel, request: ilp.IntraOpRequest,
                 free: ilp.IntraOpResult, tensors, budget: float,
                 deadline: float | None, earlier: Sequence[Sequence[int]] = ()
                 ) -> ilp.IntraOpResult:
    """``free`` (the plan without a budget) when its whole liveness profile fits ``budget``
    by the ILP's count of ``tensors``: optimal under the budget too. Otherwise constrain the
    candidate peak steps, then check the plan's whole liveness profile and add the steps it
    overflows, until none does (at most 8 solves). ``earlier``: plans of earlier searches
    (for a higher budget), starts when they fit or are moved to fit as the free plan is.

    A plan that overflows steps its search did not constrain overflows them by little: the
    next search starts from it moved until it fits (``ilp.fit_to_budget``), not from priced
    memory again. Measured on the 70B-shaped GPT on 8x8x8 (h100-80gb, 79 GiB, 60 s): the
    first search ends at 3.107 s per step, over the budget at steps it did not constrain;
    the second, from the free plan's priced probes in the little time left, ended at
    3.575 s per step (45.2 GiB); from the first plan repaired it ends at 3.109 s (60.8 GiB)."""
    program = problem.graph.traced.program
    if not steps_over(tensors, free.choices, len(program.eqns), budget):
        return free
    steps = candidate_steps(tensors, len(program.eqns))
    fits: list = list(problem.starting_plans().seeds) + [free.choices]
    earlier = list(earlier)
    for _ in range(8):
        constrained = _until(request, deadline).with_options(
            memory_terms=memory_terms(tensors, steps), memory_budget=float(budget))
        constrained, hint = budgeted_start(constrained, free.choices, fits, earlier)
        try:
            result = _near_free(constrained, free, hint) or ilp.solve_intra_op(constrained)
        except ilp.InfeasibleError as err:
            raise InfeasiblePlanError(
                f"memory_budget={format_bytes(budget)} per device cannot be met on a "
                f"{'x'.join(map(str, model.mesh_shape))} mesh: the smallest peak any plan reaches is "
                f"about {format_bytes(err.min_peak_bytes)} per device (liveness estimate). "
                f"Give memory_budget >= {format_bytes(err.min_peak_bytes)}, use more devices, "
                f"or shrink the model or batch", err.min_peak_bytes, budget) from None
        missed = set(steps_over(tensors, result.choices, len(program.eqns), budget)) - set(steps)
        if not missed:
            return result
        earlier.append(result.choices)
        steps = sorted(set(steps) | missed)
    return result


def budgeted_start(request: ilp.IntraOpRequest, free: Sequence[int],
                   fits: Sequence[Sequence[int]], earlier: Sequence[Sequence[int]] = ()
                   ) -> tuple[ilp.IntraOpRequest, tuple[int, ...] | None]:
    """(``request`` with its search's start, the start: None if no plan fits). The start
    is the cheapest of ``fits`` (plans that may fit), ``free`` (the plan without a budget)
    and ``earlier`` (plans of earlier searches), those two moved until they fit when they
    peak at most ``REPAIR_EXCESS`` over the budget. When none of them is that near, the
    request is also guided by ``free`` (priced memory finds starts near the budget)."""
    repaired = [r for r in (ilp.fit_to_budget(request, c, max_excess=REPAIR_EXCESS)
                            for c in [free, *earlier]) if r is not None]
    hint = ilp.best_assignment(request, [*fits, *repaired])
    if hint is not None:
        request = request.with_options(hint=hint)
    if not repaired:  # too far over for a few moves: priced memory finds starts
        request = request.with_options(guide=tuple(free))
    return request, hint


def _near_free(request: ilp.IntraOpRequest, free: ilp.IntraOpResult,
               hint: Sequence[int] | None) -> ilp.IntraOpResult | None:
    """``hint`` as the result, unsearched, when ``request`` ties repeated layers (a deep
    model, whose budgeted search is long) and ``hint`` costs at most ``REPAIR_ACCEPTED``
    more than ``free`` (the plan without a budget); else None. Its lower bound is
    ``free``'s (a bound on the problem without the budget bounds it with one too)."""
    if hint is None or not request.tie_repeats:
        return None
    objective = ilp.evaluate(request, hint).objective
    if objective > free.objective * (1 + REPAIR_ACCEPTED):
        return None
    _log.info("budget met by moving the plan without one: %.4g s per step (%.4g without "
              "the budget), not searched further", objective, free.objective)
    lower = min(objective, free.lower_bound)
    return dataclasses.replace(free, choices=tuple(hint), objective=objective, lower_bound=lower,
                               gap=(objective - lower) / objective if objective else 0.0,
                               status="FEASIBLE")


def _solve_shared(problem: ShardingProblem, request: ilp.IntraOpRequest,
                  deadline: float | None, meanwhile: Callable[[], object] | None = None
                  ) -> ilp.IntraOpResult:
    """Solve the problem whose reshardings are shared by a value's readers (read nodes);
    never dearer than the optimum of the same problem priced per use (sharing a
    resharding only removes cost).

    Solved whole, its LP is usually integral, and then optimal. Where read nodes make it
    fractional, CP-SAT rarely closes the gap in minutes; instead the problem priced per
    use (strong LP) is solved too, and the better of its optimum, shared, and the LP's
    rounding is the plan. Solved over neighbourhoods (a 3-axis mesh), the per-use problem
    is solved first (from the starting plan, read nodes dropped) and the shared rounds
    start from its optimum, shared: rounds from a preset-like plan stop in worse plans
    once read nodes couple the moves. ``meanwhile``: as in :func:`_hint`."""
    if ilp.solved_in_neighbourhoods(request):
        per_use = _per_use_shared(problem, request, deadline)
        starts = (problem.starting_plans().hint, per_use.choices)
        hint = ilp.best_assignment(request, [c for c in starts if c is not None])
        return _never_dearer(request, ilp.solve_intra_op(
            _until(request, deadline).with_options(hint=hint)), per_use)
    shared = ilp.solve_intra_op(request.with_options(search=False),
                                starting_plan=_hint(problem, meanwhile))
    if shared.stats.lp_integral:
        return shared
    per_use = _per_use_shared(problem, request, deadline)
    _log.info("shared reshardings: LP fractional, %.4g s per step from its rounding, %.4g "
              "from the per-use optimum", shared.objective, per_use.objective)
    return _never_dearer(request, shared, per_use)


def _per_use_shared(problem: ShardingProblem, request: ilp.IntraOpRequest,
                    deadline: float | None) -> ilp.IntraOpResult:
    """The optimum of the problem priced per use, as choices of the shared problem
    (each read node in the layout its readers share best), priced with shared reads and
    reported FEASIBLE (optimal per use, not proven so shared)."""
    per_use_request, per_use_grouping = problem.per_use()
    hint = problem.starting_plans().hint
    if hint is not None:
        hint = per_use_from_shared(problem.graph, problem.grouping, per_use_grouping, hint)
    per_use = ilp.solve_intra_op(_until(per_use_request, deadline).with_options(
        tie_repeats=request.tie_repeats, gap_limit=request.gap_limit, hint=hint))
    choices = shared_from_per_use(problem.graph, problem.grouping, request, per_use_grouping,
                                  per_use.choices)
    objective = ilp.evaluate(request, choices).objective
    return dataclasses.replace(per_use, choices=choices, objective=objective,
                               lower_bound=min(objective, per_use.lower_bound),
                               status="FEASIBLE")


def _hint(problem: ShardingProblem, meanwhile: Callable[[], object] | None = None):
    """The problem's starting plan, made when first called (``ilp.solve_intra_op`` calls
    it while its LP relaxation runs); ``meanwhile`` (a cached call whose result the caller
    needs later) is called then too, its Python work overlapping the LP's."""
    def hint():
        plan = problem.starting_plans().hint
        if meanwhile is not None:
            meanwhile()
        return plan
    return hint


def _never_dearer(request: ilp.IntraOpRequest, shared: ilp.IntraOpResult,
                  per_use: ilp.IntraOpResult) -> ilp.IntraOpResult:
    """``shared`` unless ``per_use`` (choices of the same request) is cheaper; then
    ``per_use`` with the shared solve's lower bound (valid for both) and both times."""
    if ilp.best_assignment(request, [shared.choices, per_use.choices]) == shared.choices:
        return shared
    objective = per_use.objective
    lower = min(objective, max(0.0, shared.lower_bound))  # seconds are never negative
    return dataclasses.replace(
        per_use, lower_bound=lower, gap=(objective - lower) / objective if objective else 0.0,
        solve_time_s=shared.solve_time_s + per_use.solve_time_s)


def _until(request: ilp.IntraOpRequest, deadline: float | None) -> ilp.IntraOpRequest:
    """``request`` with the wall-clock seconds left until ``deadline`` (if any)."""
    if deadline is None:
        return request
    return request.with_options(wall_time_limit_s=max(0.0, deadline - time.perf_counter()))
