"""Tracing: a user function and example arguments → a flat :class:`Program`.

Calls that only structure the program (``jit``/``pjit``, ``closed_call``,
``custom_jvp_call``, ``custom_vjp_call``, ``remat``/``checkpoint``; a
``custom_linear_solve``, as the solve it runs) are inlined
(a ``jax.checkpoint`` block recomputed in the backward pass behind an
``optimization_barrier`` per operand, as jax lowers it, so the user's remat survives),
and ``lax.scan`` loops (layers scanned over stacked weights, and their transposes
in the backward pass) are unrolled into one copy of the body per step, up to
``MAX_UNROLLED_EQUATIONS`` equations (and ``MAX_UNROLLED_STEPS`` steps when asked), so
every step's ops are sharded like any others and a pipeline can cut between them (the
slices by which their backward reads the steps' stacked values are forwarded as XLA's
simplifier forwards them: ``simplify``); asked for ``rolled_layers`` (ShardParallel and the
presets), a scan whose body contracts stays a loop, planned once (``loop_view``). A
``lax.cond`` whose branches are elementwise work is computed as every branch and a
``select_n`` (``selects_branches``). Every remaining
equation is a primitive the strategy rules understand (or a control-flow primitive they
treat conservatively: ``while``, other ``cond`` equations; the scans left are planned on
``loop_view``).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from .custom_rules import CUSTOM_RULE_CALLS, KEPT_CALLS, custom_rule_primitive, rule_params
from .jax_compat import (
    inlined_call,
    join_scopes,
    name_stack,
    optimization_barrier_primitive,
    recomputes_in_backward,
    select_n_primitive,
    source_summary,
    trace_as_user_function,
)
from .program import Equation, Literal, Program
from .signature import equation_signature
from .simplify import cse_key, forwarded

#: a scan is unrolled when its body's equations × its length stay within this ...
MAX_UNROLLED_EQUATIONS = 50_000
#: ... and, planning ShardParallel or a preset (``trace(..., step_limit=True)``), its
#: length within this: layers scanned over stacked weights (a 405B-shaped model has 126),
#: not a recurrence over time steps, which runs as one loop (a scan whose body contracts
#: stays one whatever its length, unless ``ShardParallel(unroll_scans=True)``). Measured, an RNN scanned over
#: 200 steps (batch 64, hidden 256, 2x4): unrolled, 24 s to plan and compile, 389 ms a
#: step; as one loop, 0.9 s and 391 ms. A pipeline unrolls it: its analysis of the
#: micro-batches follows rows through unrolled steps, not through a loop.
MAX_UNROLLED_STEPS = 128


def _count_equations(jaxpr) -> int:
    """Equations of ``jaxpr`` with inlined calls and nested scans counted as unrolled."""
    total = 0
    for eqn in jaxpr.eqns:
        call = inlined_call(eqn, eqn.invars)
        callee = None if call is None else call[0]
        if eqn.primitive.name == "scan":
            total += eqn.params["length"] * _count_equations(eqn.params["jaxpr"].jaxpr)
        elif callee is not None:
            total += _count_equations(getattr(callee, "jaxpr", callee))
        else:
            total += 1
    return total


def unrolls(eqn, step_limit: bool = False, rolled_layers: bool = False) -> bool:
    """Whether ``eqn`` is a ``lax.scan`` that tracing unrolls (see the module docstring;
    ``step_limit``: ``MAX_UNROLLED_STEPS`` applies too; ``rolled_layers``: a scan whose
    body contracts, layers scanned over stacked weights, stays a loop, planned once)."""
    return eqn.primitive.name == "scan" and (
        not step_limit or eqn.params["length"] <= MAX_UNROLLED_STEPS) and not (
        rolled_layers and _contracts(eqn.params["jaxpr"].jaxpr)) and (
        eqn.params["length"] * _count_equations(eqn.params["jaxpr"].jaxpr)
        <= MAX_UNROLLED_EQUATIONS)


#: collectives that ``jax.vmap`` rewrites, over the axis it names, into the same collective
#: over positional axes: outside ``shard_map`` (no named axis left), a plain reduction
_POSITIONAL_REDUCTIONS = {"psum": jnp.sum, "pmax": jnp.max, "pmin": jnp.min}


def _positional_only(eqn) -> bool:
    """Whether ``eqn`` is a ``psum`` / ``pmax`` / ``pmin`` over positional axes alone (an
    equinox ``BatchNorm``'s mean over its vmapped batch), which reduces its operands' dims
    and communicates nothing."""
    return eqn.primitive.name in _POSITIONAL_REDUCTIONS and \
        eqn.params.get("axis_index_groups") is None and \
        all(isinstance(a, (int, np.integer)) for a in eqn.params.get("axes", (None,)))


def _positional_reduction(eqn) -> jcore.ClosedJaxpr:
    """``eqn`` (see :func:`_positional_only`) as the reductions of each operand over
    its axes (``reduce_sum`` and kin), of the result types ``eqn`` has; over no axis (a
    ``pmean``'s transpose, vmapped), its operands themselves."""
    reduce, axes = _POSITIONAL_REDUCTIONS[eqn.primitive.name], tuple(eqn.params["axes"])

    def run(*operands):
        return [reduce(x, axis=axes).astype(v.aval.dtype) if axes else x
                for x, v in zip(operands, eqn.outvars, strict=True)]

    return jax.make_jaxpr(run)(*[struct_of_aval(v.aval) for v in eqn.invars])


def _rewritten(eqn, step_limit: bool, rolled_layers: bool) -> jcore.ClosedJaxpr | None:
    """The jax code ``eqn`` is traced as instead, if any: a scan unrolled (``unrolls``),
    a collective over positional axes as its reduction (``_positional_only``)."""
    if unrolls(eqn, step_limit, rolled_layers):
        return _unrolled_scan(eqn)
    if _positional_only(eqn):
        return _positional_reduction(eqn)
    return None


def _unrolled_scan(eqn) -> jcore.ClosedJaxpr:
    """The scan as straight-line code: the body traced once per step, ``xs`` sliced, the
    per-step ``ys`` stacked, in the scan's order (``reverse`` included)."""
    params = eqn.params
    n_consts, n_carry, length = params["num_consts"], params["num_carry"], params["length"]
    body = jcore.jaxpr_as_fun(params["jaxpr"])
    y_avals = [v.aval for v in eqn.outvars[n_carry:]]

    def run(*args):
        consts, carry = args[:n_consts], list(args[n_consts:n_consts + n_carry])
        xs = args[n_consts + n_carry:]
        ys = [None] * length
        for i in (reversed(range(length)) if params["reverse"] else range(length)):
            x_i = [jax.lax.index_in_dim(x, i, keepdims=False) for x in xs]
            out = body(*consts, *carry, *x_i)
            carry, ys[i] = list(out[:n_carry]), out[n_carry:]
        stacked = [jax.lax.concatenate([jax.lax.expand_dims(y[k], (0,)) for y in ys], 0)
                   if length else jnp.zeros(a.shape, a.dtype) for k, a in enumerate(y_avals)]
        return carry + stacked

    return jax.make_jaxpr(run)(*[struct_of_aval(v.aval) for v in eqn.invars])


class SourceSummaries(Sequence[str]):
    """Each equation's :func:`source_summary`, made when first read: a deep model's
    tens of thousands of equations are summarised only where a message or a plan's
    summary names one (summarising them all took a fifth of tracing an 80-layer GPT).

    ``source_infos[e]``: (the equation's source info, those of the calls it was inlined
    from, outermost first). An equation jax made inside a call of its own (the body of
    ``jnp.linalg.cholesky``'s ``jit``) has no user frame: it is summarised by the
    innermost call that has one."""

    __slots__ = ("_infos", "_made")

    def __init__(self, source_infos: Sequence[tuple[Any, tuple]]):
        self._infos = tuple(source_infos)
        self._made: list[str | None] = [None] * len(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __getitem__(self, e):
        if isinstance(e, slice):
            return tuple(self[i] for i in range(*e.indices(len(self))))
        made = self._made[e]
        if made is None:
            info, callers = self._infos[e]
            made = source_summary(info)
            for caller in reversed(callers):
                if made:
                    break
                made = source_summary(caller)
            self._made[e] = made
        return made

    def __repr__(self) -> str:
        return f"SourceSummaries({len(self)} equations)"


@dataclasses.dataclass(frozen=True, eq=False)
class TracedFunction:
    """A traced function: its flat program plus the pytree structure around it.

    ``in_paths``/``out_paths`` are readable key paths of the flat leaves
    (``"[0]['layers'][1]['w']"``); ``sources[e]`` says where equation ``e``
    came from in user code, ``scopes[e]`` under which module path (jax's name stack:
    ``"jvp(ResNet18)/Block_0/Conv_1"``, empty where the code names none). ``in_tree``
    is the structure of the non-static arguments;
    ``static_argnums`` the positions of the static ones among all ``num_args``.
    """

    program: Program
    in_tree: Any
    out_tree: Any
    in_paths: tuple[str, ...]
    out_paths: tuple[str, ...]
    sources: Sequence[str]
    scopes: tuple[str, ...] = ()
    static_argnums: tuple[int, ...] = ()
    num_args: int | None = None

    @functools.cached_property
    def signatures(self) -> tuple[str, ...]:
        """``equation_signature`` of each equation, computed once: the fingerprint and the
        strategy memo both key on them."""
        program = self.program
        return tuple(equation_signature(eqn, [None if isinstance(a, Literal) else program.avals[a]
                                              for a in eqn.inputs],
                                        [program.avals[v] for v in eqn.outputs])
                     for eqn in program.eqns)

    def input_tree(self, flat: Sequence) -> tuple:
        """``flat`` (one entry per flat input) as the arguments' pytrees, one per argument,
        ``None`` in the place of a static argument (as ``Plan.in_specs`` holds them)."""
        dyn = list(jax.tree_util.tree_unflatten(self.in_tree, list(flat)))
        num_args = len(dyn) + len(self.static_argnums) if self.num_args is None \
            else self.num_args
        rest = iter(dyn)
        return tuple(None if i in self.static_argnums else next(rest) for i in range(num_args))

    def output_tree(self, flat: Sequence):
        """``flat`` (one entry per flat output) as the function's output pytree."""
        return jax.tree_util.tree_unflatten(self.out_tree, list(flat))

    def __repr__(self):
        return (f"TracedFunction({len(self.program.invars)} inputs, "
                f"{len(self.program.outvars)} outputs, {len(self.program.eqns)} equations)")


def _is_array_like(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct,
                             bool, int, float, complex))


def check_arguments(dyn_args: Sequence, argnums: Sequence[int]) -> None:
    """Raise ``TypeError`` naming every leaf that is not an array, number or ShapeDtypeStruct."""
    bad = []
    for argnum, arg in zip(argnums, dyn_args):
        for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
            if not _is_array_like(leaf):
                bad.append(f"args[{argnum}]{jax.tree_util.keystr(path)}: {type(leaf).__name__}")
    if bad:
        raise TypeError(
            "autoshard.parallelize: every argument leaf must be an array, a Python/NumPy "
            "number or a jax.ShapeDtypeStruct, but these are not:\n  " + "\n  ".join(bad)
            + "\nPass such arguments through static_argnums (they must then be hashable), "
            "or close over them in the function.")


def aval_struct(leaf) -> jax.ShapeDtypeStruct:
    """The abstract value jax.jit traces ``leaf`` with: shape, canonical dtype and weak type
    (a Python scalar, or an array made from one, is weakly typed: ``int8 array * 3`` stays
    int8). A ShapeDtypeStruct keeps its own ``weak_type``; its sharding is dropped."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, weak_type=leaf.weak_type)
    aval = jax.typeof(leaf)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def struct_of_aval(aval) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct for a traced aval (a program value), weak type included."""
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


def trace(fn, args: Sequence, static_argnums: Sequence[int] = (), *,
          step_limit: bool = False, rolled_layers: bool = False) -> TracedFunction:
    """Trace ``fn(*args)`` (static args taken as given) into a :class:`TracedFunction`;
    ``step_limit``: scans of more than ``MAX_UNROLLED_STEPS`` steps stay loops;
    ``rolled_layers``: so do scans whose body contracts (``unrolls``)."""
    static = set(static_argnums)
    argnums = [i for i in range(len(args)) if i not in static]
    dyn_args = [args[i] for i in argnums]
    check_arguments(dyn_args, argnums)
    leaves_with_paths, in_tree = jax.tree_util.tree_flatten_with_path(tuple(dyn_args))
    in_paths = tuple(argument_path(p, argnums) for p, _ in leaves_with_paths)
    avals = [aval_struct(leaf) for _, leaf in leaves_with_paths]
    out_tree_box = []

    def flat_fn(*flat):
        dyn = jax.tree_util.tree_unflatten(in_tree, flat)
        full = list(args)
        for i, a in zip(argnums, dyn):
            full[i] = a
        out = fn(*full)
        out_flat, out_tree = jax.tree_util.tree_flatten_with_path(out)
        out_tree_box.append((jax.tree_util.tree_structure(out),
                             tuple(jax.tree_util.keystr(p) for p, _ in out_flat)))
        return [leaf for _, leaf in out_flat]

    trace_as_user_function(flat_fn, fn, args, static_argnums, len(avals))
    closed = jax.make_jaxpr(flat_fn)(*avals)
    out_tree, out_paths = out_tree_box[-1]
    traced = _flatten_program(closed, in_tree, out_tree, in_paths, out_paths,
                              step_limit=step_limit, rolled_layers=rolled_layers)
    return dataclasses.replace(traced, static_argnums=tuple(sorted(static)),
                               num_args=len(args))


def traced_body(eqn) -> TracedFunction:
    """The body of scan ``eqn`` as a program of its own: inputs its consts, carries and
    one step of its stacked operands; outputs its carries and one step of its results
    (a scan inside it unrolled, as ``step_limit`` allows)."""
    closed = eqn.params["jaxpr"]
    return trace(jcore.jaxpr_as_fun(closed), [struct_of_aval(a) for a in closed.in_avals],
                 step_limit=True)


def argument_path(path, argnums) -> str:
    """A key path into the tuple of the dynamic arguments as the user reads it:
    ``(SequenceKey(1), DictKey('w'))`` with ``argnums`` ``[0, 2]`` → ``"args[2]['w']"``."""
    head, rest = path[0], path[1:]
    return f"args[{argnums[head.idx]}]" + jax.tree_util.keystr(tuple(rest))


def argument_of(path: str) -> int:
    """The argument number of a flat input path, :func:`argument_path`'s inverse
    (``"args[2]['x']"`` → 2)."""
    return int(path[len("args["):path.index("]")])


def flatten_open_jaxpr(jaxpr, in_paths, out_paths, keep_custom_rules: bool = False
                       ) -> TracedFunction:
    """Flatten a jaxpr whose constvars, then invars, become the program's inputs
    (``keep_custom_rules``: for a program autoshard differentiates itself, see
    :mod:`.custom_rules`)."""
    n = len(jaxpr.constvars) + len(jaxpr.invars)
    tree = jax.tree_util.tree_structure((0,) * n)
    out_tree = jax.tree_util.tree_structure([0] * len(jaxpr.outvars))
    return _flatten_program(jcore.ClosedJaxpr(jaxpr, [None] * len(jaxpr.constvars)), tree,
                            out_tree, in_paths, out_paths, consts_as_inputs=True,
                            keep_custom_rules=keep_custom_rules)


#: primitives whose presence in a ``cond``'s branches keeps it a ``cond``: computing every
#: branch would repeat a contraction's arithmetic
_CONTRACTIONS = frozenset({"dot_general", "conv_general_dilated"})


def selects_branches(eqn) -> bool:
    """Whether tracing computes the ``lax.cond`` (or ``lax.switch``) ``eqn`` as all its
    branches and a ``select_n`` of their results: when no branch has side effects, makes
    keys, or contracts (a dot, a convolution), so that computing every branch is
    elementwise work, which XLA fuses. Its ops are then sharded like any others, where a
    ``cond`` runs replicated: optax's ``MultiSteps`` (gradient accumulation) applies its
    inner optimizer in a ``cond``, whose replicated update gathered every parameter each
    step (a 2-layer MLP on 2x4: 8.2 ms per step modelled and 74 MiB per device, against
    1.7 ms and 6 MiB with plain adam). Values are the selected branch's, as under
    ``jax.jit``: a branch not taken may compute infinities or NaNs the select drops."""
    if eqn.primitive.name != "cond" or eqn.effects:
        return False
    if any(jax.dtypes.issubdtype(v.aval.dtype, jax.dtypes.extended) for v in eqn.outvars):
        return False
    return not any(_contracts(b.jaxpr) for b in eqn.params["branches"])


def _contracts(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.effects or eqn.primitive.name in _CONTRACTIONS:
            return True
        for value in eqn.params.values():
            values = value if isinstance(value, (tuple, list)) else (value,)
            for inner in values:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns") and _contracts(inner):
                    return True
    return False


def _flatten_program(closed, in_tree, out_tree, in_paths, out_paths,
                     consts_as_inputs: bool = False, keep_custom_rules: bool = False,
                     step_limit: bool = False, rolled_layers: bool = False) -> TracedFunction:
    avals: list = []
    eqns: list[Equation] = []
    sources: list = []  # each equation's jax source info, and its callers' (SourceSummaries)
    constants: list[tuple[int, Any]] = []

    def new_value(aval) -> int:
        avals.append(aval)
        return len(avals) - 1

    scopes: list[str] = []
    effectful: set[int] = set()  # equations with side effects
    made_by: dict[int, Equation] = {}  # value id -> the equation that made it
    computed: dict[tuple, tuple] = {}  # ``simplify.cse_key`` -> the first one's outputs
    rule_bodies: dict[int, int] = {}  # a custom rule equation -> where its inlined body starts

    def barrier(atom, eqn, scope, callers):
        """``atom`` through an optimization barrier of its own, as jax lowers the operands
        of a ``jax.checkpoint`` block recomputed in the backward pass (so that XLA's CSE
        keeps the recomputation: the user asked not to store those activations)."""
        if isinstance(atom, Literal):
            return atom
        out = new_value(avals[atom])
        eqns.append(Equation(optimization_barrier_primitive(), {}, (atom,), (out,)))
        sources.append((eqn.source_info, callers))
        scopes.append(scope)
        return out

    def kept_rule(eqn, start, outs, ins, callers, scope) -> list:
        """After ``eqn``'s body (equations ``start`` on, making ``outs`` from ``ins``), its
        rule equation (:mod:`.custom_rules`), whose results replace ``outs``."""
        made = tuple(new_value(v.aval) for v in eqn.outvars)
        rule_bodies[len(eqns)] = start
        eqns.append(Equation(custom_rule_primitive(), rule_params(eqn, len(outs), len(eqns) - start),
                             (*outs, *ins), made, eqn.source_info))
        sources.append((eqn.source_info, callers))
        scopes.append(scope)
        return list(made)

    def inline(jaxpr, consts, in_atoms, const_atoms=None, scope="", callers=(),
               in_rule=False):
        env: dict = {}
        for var, atom in zip(jaxpr.constvars, const_atoms or (), strict=False):
            env[var] = atom
        for var, const in zip(jaxpr.constvars if const_atoms is None else (), consts):
            vid = new_value(var.aval)
            constants.append((vid, const))
            env[var] = vid
        for var, atom in zip(jaxpr.invars, in_atoms, strict=True):
            env[var] = atom

        def read(atom):
            return Literal(atom.val) if isinstance(atom, jcore.Literal) else env[atom]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            here = join_scopes(scope, name_stack(eqn.source_info))
            rewritten = _rewritten(eqn, step_limit, rolled_layers)
            if rewritten is not None:
                outs = inline(rewritten.jaxpr, rewritten.consts, ins, scope=here,
                              callers=callers + (eqn.source_info,), in_rule=in_rule)
                for var, atom in zip(eqn.outvars, outs, strict=True):
                    env[var] = atom
                continue
            if selects_branches(eqn):
                within = callers + (eqn.source_info,)
                start = len(eqns)
                taken = [inline(b.jaxpr, b.consts, ins[1:], scope=here, callers=within,
                                in_rule=in_rule) for b in eqn.params["branches"]]
                selected = []
                for k, var in enumerate(eqn.outvars):
                    cases = [outs[k] for outs in taken]
                    if all(c == cases[0] for c in cases):
                        selected.append(cases[0])
                        continue
                    out = new_value(var.aval)
                    eqns.append(Equation(select_n_primitive(), {}, (ins[0], *cases), (out,)))
                    sources.append((eqn.source_info, callers))
                    scopes.append(here)
                    selected.append(out)
                if keep_custom_rules and not in_rule:
                    selected = kept_rule(eqn, start, selected, ins, callers, here)
                for var, atom in zip(eqn.outvars, selected, strict=True):
                    env[var] = atom
                continue
            call = inlined_call(eqn, ins)
            if call is not None:
                operands = ins
                callee, ins = call
                if recomputes_in_backward(eqn):
                    ins = [barrier(a, eqn, here, callers) for a in ins]
                within = callers + (eqn.source_info,)
                # (inside a user's rule, its call covers any other; inside a checkpoint,
                # which a stage may dissolve, a user's rule is kept too)
                rule = keep_custom_rules and not in_rule and eqn.primitive.name in KEPT_CALLS
                user_rule = rule and eqn.primitive.name in CUSTOM_RULE_CALLS
                start = len(eqns)
                if isinstance(callee, jcore.ClosedJaxpr):
                    outs = inline(callee.jaxpr, callee.consts, ins, scope=here, callers=within,
                                  in_rule=in_rule or user_rule)
                else:
                    outs = inline(callee, (), ins, scope=here, callers=within,
                                  in_rule=in_rule or user_rule)
                if rule:
                    outs = kept_rule(eqn, start, outs, operands, callers, here)
                for var, atom in zip(eqn.outvars, outs, strict=True):
                    env[var] = atom
                continue
            name = eqn.primitive.name
            same = None if eqn.effects else forwarded(name, eqn.params, ins, made_by.get,
                                                     lambda v: tuple(avals[v].shape))
            if same is not None:  # XLA's simplifier returns the operand itself
                env[eqn.outvars[0]] = same
                continue
            key = None if eqn.effects else cse_key(name, eqn.params, ins)
            if key is not None and key in computed:  # XLA's CSE computes it once
                for var, vid in zip(eqn.outvars, computed[key]):
                    env[var] = vid
                continue
            out_ids = tuple(new_value(v.aval) for v in eqn.outvars)
            if key is not None:
                computed[key] = out_ids
            if eqn.effects:  # a debug print, a callback: runs whether its result is read
                effectful.add(len(eqns))
            eqns.append(Equation(eqn.primitive, dict(eqn.params), tuple(ins), out_ids,
                                 eqn.source_info))
            made_by.update((vid, eqns[-1]) for vid in out_ids)
            sources.append((eqn.source_info, callers))
            scopes.append(here)
            for var, vid in zip(eqn.outvars, out_ids):
                env[var] = vid
        return [read(a) for a in jaxpr.outvars]

    if consts_as_inputs:
        const_ids = [new_value(v.aval) for v in closed.jaxpr.constvars]
        invars = tuple(const_ids) + tuple(new_value(v.aval) for v in closed.jaxpr.invars)
        outvars = inline(closed.jaxpr, (), invars[len(const_ids):], const_ids)
    else:
        invars = tuple(new_value(v.aval) for v in closed.jaxpr.invars)
        outvars = inline(closed.jaxpr, closed.consts, invars)
    kept = live_equations(eqns, outvars, effectful)
    for m, start in rule_bodies.items():  # its body's equations that are kept
        eqn = eqns[m]
        eqns[m] = dataclasses.replace(eqn, params={
            **eqn.params, "num_inlined": bisect.bisect_left(kept, m) - bisect.bisect_left(kept, start)})
    program = Program(tuple(avals), invars, tuple(outvars), tuple(eqns[e] for e in kept),
                      tuple(constants))
    return TracedFunction(program, in_tree, out_tree, in_paths, tuple(out_paths),
                          SourceSummaries([sources[e] for e in kept]),
                          scopes=tuple(scopes[e] for e in kept))


def live_equations(eqns: Sequence[Equation], outvars, effectful: set[int]) -> list[int]:
    """Indices of the equations the outputs need, or with side effects, in order: XLA
    removes the others (the loss of a step that returns only its gradient), so they are
    neither planned nor priced."""
    live = {a for a in outvars if not isinstance(a, Literal)}
    kept = []
    for e in range(len(eqns) - 1, -1, -1):
        eqn = eqns[e]
        if e in effectful or any(v in live for v in eqn.outputs):
            kept.append(e)
            live.update(a for a in eqn.inputs if not isinstance(a, Literal))
    return kept[::-1]
