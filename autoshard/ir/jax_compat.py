"""The one adapter to jax's internals: what autoshard reads of jax beyond its public API.

Everything version-specific lives here (jax 0.10 is pinned in pyproject.toml): the names
and parameters of call-like primitives that only structure a program (inlined by the
tracer), where an equation came from in user code, binding an equation's primitive
again outside a trace, and routing ``jax.value_and_grad``'s differentiation
(:func:`value_and_grad_routed`, for pipelines). The rest of autoshard uses public APIs
(``jax.extend.core``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import types
from collections.abc import Sequence

import jax
import jax.extend.core as jcore
from jax.extend import source_info_util

# Call-like primitives (name → the parameters that may hold the callee's jaxpr, first
# match wins): they only structure a program, so the tracer inlines them. ``eval_jaxpr``
# is the name jax's next release gives the ``closed_call`` steps of a scan's gradient.
INLINED_CALLS: dict[str, tuple[str, ...]] = {
    "pjit": ("jaxpr",),
    "jit": ("jaxpr",),
    "closed_call": ("call_jaxpr",),
    "core_call": ("call_jaxpr",),
    "eval_jaxpr": ("call_jaxpr", "jaxpr"),
    "custom_jvp_call": ("call_jaxpr",),
    "custom_vjp_call": ("call_jaxpr",),
    "custom_vjp_call_jaxpr": ("fun_jaxpr",),
    "remat": ("jaxpr",),
    "remat2": ("jaxpr",),
    "checkpoint": ("jaxpr",),
    "composite": ("jaxpr",),
    "custom_vmap_call": ("call",),
}


def recomputes_in_backward(eqn) -> bool:
    """Whether ``eqn`` is a ``jax.checkpoint`` block in a differentiated program: the
    backward pass's recomputation, which jax lowers behind an optimization barrier on
    its operands so that XLA cannot merge it with the forward pass (common-subexpression
    elimination would undo the rematerialization)."""
    return (eqn.primitive.name in ("remat", "remat2", "checkpoint")
            and bool(eqn.params.get("prevent_cse", False))
            and bool(eqn.params.get("differentiated", False)))


@functools.cache
def optimization_barrier_primitive():
    """The primitive ``jax.lax.optimization_barrier`` binds (found by tracing it, not by
    importing jax internals)."""
    return jax.make_jaxpr(jax.lax.optimization_barrier)(0.0).eqns[0].primitive


@functools.cache
def select_n_primitive():
    """The primitive ``jax.lax.select_n`` binds (found by tracing it)."""
    return jax.make_jaxpr(jax.lax.select_n)(0, 0.0, 1.0).eqns[0].primitive


def _inlined_callee(eqn):
    """The jaxpr (open or closed) that ``eqn`` calls when it is a call-like primitive the
    tracer inlines, else ``None``."""
    for param in INLINED_CALLS.get(eqn.primitive.name, ()):
        if param in eqn.params:
            return eqn.params[param]
    return None


def inlined_call(eqn, operands: Sequence) -> tuple[object, Sequence] | None:
    """``(jaxpr, its operands)`` that ``eqn`` (with ``operands``) computes when the tracer
    inlines it, else ``None``: a call-like primitive's callee on the same operands
    (:func:`_inlined_callee`), or the solve a ``custom_linear_solve`` runs
    (``jnp.linalg.solve``, ``inv``, ``jax.scipy.linalg.expm``...). jax's own implementation
    of the latter runs the ``solve`` jaxpr on its constants and ``b``; the matvec and
    transpose jaxprs only serve differentiation, done before a step is traced here.
    ``const_lengths`` counts each jaxpr's constants, which lead the operands in the
    order ``matvec, vecmat, solve, transpose_solve``, followed by ``b``."""
    if eqn.primitive.name != "custom_linear_solve":
        callee = _inlined_callee(eqn)
        return None if callee is None else (callee, operands)
    lengths = eqn.params["const_lengths"]
    start = lengths.matvec + lengths.vecmat
    consts = list(operands[start:start + lengths.solve])
    b = list(operands[start + lengths.solve + lengths.transpose_solve:])
    return eqn.params["jaxprs"].solve, consts + b


#: frames searched for the user's own code under a library's (flax, optax, ...)
_LIBRARY_DEPTH = 12


def source_summary(source_info) -> str:
    """``file:line:column (function)`` of the user code an equation came from: the
    innermost frame outside jax and outside installed libraries, followed by ``via`` and
    the library frame that made the equation when there is one (``train.py:17:8
    (train_step) via optax/_src/update.py:42:45 (apply_updates)``)."""
    frames = source_info_util.summarize(source_info, num_frames=_LIBRARY_DEPTH).split("\n")
    inner = frames[-1]   # innermost last
    own = next((f for f in reversed(frames) if not _is_installed_library(f)), None)
    if own is None or own == inner:
        return inner
    return f"{own} via {_library_relative(inner)}"


def _is_installed_library(frame: str) -> bool:
    return any(part in frame for part in ("/site-packages/", "/dist-packages/",
                                          "\\site-packages\\"))


def _library_relative(frame: str) -> str:
    """A library frame's path from its package folder on (``optax/_src/update.py:42``)."""
    for part in ("/site-packages/", "/dist-packages/", "\\site-packages\\"):
        if part in frame:
            return frame.split(part, 1)[1]
    return frame


def name_stack(source_info) -> str:
    """The module path an equation was traced under (jax's name stack, as flax and
    ``jax.named_scope`` set it): ``"jvp(ResNet18)/Block_0/Conv_1"``."""
    return str(source_info.name_stack)


def join_scopes(outer: str, inner: str) -> str:
    """The name stack of an equation inlined from a call made under ``outer``."""
    return f"{outer}/{inner}" if outer and inner else outer or inner


def bind(primitive: jcore.Primitive, params: dict, operands: Sequence,
         source_info=None) -> tuple:
    """Apply ``primitive`` with an equation's ``params`` to ``operands`` (values or tracers)
    and return its results as a tuple; traced under ``source_info``'s traceback (the user's
    line the equation came from) when given."""
    if source_info is None:
        outs = primitive.bind(*operands, **primitive.get_bind_params(params))
    else:
        with source_info_util.user_context(source_info.traceback,
                                           name_stack=source_info_util.current_name_stack()):
            outs = primitive.bind(*operands, **primitive.get_bind_params(params))
    return tuple(outs) if primitive.multiple_results else (outs,)


def trace_as_user_function(wrapper, fn, args: Sequence, static_argnums: Sequence[int],
                           num_leaves: int) -> None:
    """Have jax trace ``wrapper`` (which calls ``fn(*args)`` from its ``num_leaves`` flat
    argument leaves) under ``fn``'s name, file, line and argument names, as ``jax.jit(fn)``
    does: an error raised while tracing (a traced bool, a non-array output) then names the
    user's function and arguments (``params['w']``), not the wrapper's flat leaves. A jax
    without this hook (``jax._src.api_util``'s saved debug info) traces the wrapper as it is."""
    try:
        from jax._src import api_util
        info = api_util.debug_info("parallelize", fn, tuple(args), {},
                                   static_argnums=tuple(static_argnums))
        if info.arg_names is not None and len(info.arg_names) != num_leaves:
            info = info._replace(arg_names=None)
        api_util.save_wrapped_fun_debug_info(wrapper, info)
    except (ImportError, AttributeError, TypeError, ValueError):
        return


def distributed_client():
    """The ``jax.distributed`` client of this process (its key-value store reaches every
    process through the coordination service), or ``None`` when not initialized."""
    from jax._src import distributed
    return distributed.global_state.client


@functools.cache
def _threefry_key_dtype():
    """The dtype of threefry2x32 key arrays (``key<fry>``), whatever the default impl."""
    return jax.eval_shape(lambda: jax.random.key(0, impl="threefry2x32")).dtype


def partitionable_random_bits(key_dtype) -> bool:
    """Whether ``random_bits`` of keys of ``key_dtype`` may be split over devices with the
    very numbers of the replicated computation: threefry keys under
    ``jax_threefry_partitionable`` (each element's bits depend only on its key and
    position). Part of every fingerprint (:func:`threefry_partitionable`)."""
    return threefry_partitionable() and key_dtype == _threefry_key_dtype()


def threefry_partitionable() -> bool:
    """jax's ``jax_threefry_partitionable`` flag (random numbers of a sharded computation
    equal the replicated ones when set)."""
    return bool(jax.config.jax_threefry_partitionable)


# ------------------------------------------------------------ jax.value_and_grad's vjp
# ``jax.value_and_grad`` (and ``jax.grad``, which calls it) returns a function whose body
# calls ``vjp`` as a global of ``jax._src.api`` and then pulls the cotangent one back. So
# replacing that global reaches every such call however the user named it
# (``jax.value_and_grad``, ``from jax import grad``, flax nnx's and equinox's wrappers),
# while ``jax.vjp`` and ``jax.jacrev`` (other callers of the global) are told apart by the
# calling frame's code object and left to jax.
_routing_lock = threading.Lock()
_routing_depth = 0
_routed_original = None


@functools.cache
def _value_and_grad_body():
    """``(jax._src.api, code object of the function jax.value_and_grad returns)`` when that
    body reads ``vjp`` as a module global (jax 0.10), else ``None``."""
    try:
        from jax._src import api
    except ImportError:
        return None
    outer = inspect.unwrap(getattr(api, "value_and_grad", None))
    code = getattr(outer, "__code__", None)
    if code is None or not callable(getattr(api, "vjp", None)):
        return None
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == "value_and_grad_f" and \
                "vjp" in const.co_names:
            return api, const
    return None


def gradient_routing_available() -> bool:
    """Whether :func:`value_and_grad_routed` can see ``jax.value_and_grad`` calls here."""
    return _value_and_grad_body() is not None


@contextlib.contextmanager
def value_and_grad_routed(route):
    """While active, a ``jax.value_and_grad`` / ``jax.grad`` call (however imported)
    differentiates through ``route(fun, primals, has_aux)`` instead of ``jax.vjp``: ``fun``
    is the function of the differentiated arguments only (jax has checked their dtypes),
    ``primals`` a tuple of them; ``route`` returns what ``jax.vjp(fun, *primals,
    has_aux=has_aux)`` would (``(value, pullback[, aux])``; jax then calls ``pullback``
    once, with the cotangent one) or ``None`` to let jax differentiate. Other callers of
    ``vjp`` are untouched. One ``route`` at a time (nested or concurrent uses share it;
    ``route`` decides per call, e.g. from a context variable); does nothing where
    :func:`gradient_routing_available` is false."""
    global _routing_depth, _routed_original
    found = _value_and_grad_body()
    if found is None:
        yield
        return
    api, body = found
    with _routing_lock:
        if _routing_depth == 0:
            original = api.vjp

            @functools.wraps(original)
            def routed_vjp(fun, *primals, has_aux=False, **kwargs):
                if not kwargs and sys._getframe(1).f_code is body:
                    out = route(fun, primals, has_aux)
                    if out is not None:
                        return out
                return original(fun, *primals, has_aux=has_aux, **kwargs)

            routed_vjp.autoshard_route = route
            _routed_original = original
            api.vjp = routed_vjp
        elif getattr(api.vjp, "autoshard_route", None) is not route:
            raise RuntimeError("jax.value_and_grad is already routed to another function")
        _routing_depth += 1
    try:
        yield
    finally:
        with _routing_lock:
            _routing_depth -= 1
            if _routing_depth == 0:
                api.vjp = _routed_original
                _routed_original = None
