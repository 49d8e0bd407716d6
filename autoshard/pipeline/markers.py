"""``autoshard.grad`` / ``autoshard.value_and_grad`` / ``autoshard.mark_layer_boundary``.

Outside pipeline planning these are exactly ``jax.grad``, ``jax.value_and_grad`` and the
identity, so a step written with them runs unchanged under ``jax.jit`` and every other
method. While :class:`~autoshard.PipeshardParallel` traces a step (:func:`pipeline_tracing`),
``value_and_grad`` does not differentiate: it binds one ``autoshard_grad`` equation whose
``jaxpr`` parameter is the forward (loss) function. The pipeline planner cuts that forward
into layers and stages, differentiates each stage on its own, and runs the equations after
the gradient (the optimizer update) once per step, after all micro-batches. jax's own
``jax.value_and_grad`` and ``jax.grad`` bind the same marker while a step is traced for a
pipeline (:func:`pipeline_tracing` routes them here through
:func:`autoshard.ir.jax_compat.value_and_grad_routed`), so steps written with them, or with
flax nnx's or equinox's wrappers of them, need no change; gradients taken inside the loss
stay jax's (second order).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax
import jax.extend.core as jcore
import numpy as np

from autoshard.ir.jax_compat import value_and_grad_routed
from autoshard.ir.trace import aval_struct

GRAD_PRIMITIVE = "autoshard_grad"
BOUNDARY_PRIMITIVE = "autoshard_layer_boundary"

_tracing: contextvars.ContextVar[bool] = contextvars.ContextVar("autoshard_pipeline_tracing",
                                                                default=False)
# whether jax.value_and_grad / jax.grad calls bind the marker too (not inside a loss)
_routing: contextvars.ContextVar[bool] = contextvars.ContextVar("autoshard_jax_grad_routing",
                                                                default=False)


@contextlib.contextmanager
def pipeline_tracing():
    """While active, ``value_and_grad`` binds the gradient marker and boundaries are kept;
    so do jax's own ``jax.value_and_grad`` and ``jax.grad`` (however imported, also
    through flax nnx's or equinox's wrappers), through :func:`_route_jax_gradient`."""
    token, routing = _tracing.set(True), _routing.set(True)
    try:
        with value_and_grad_routed(_route_jax_gradient):
            yield
    finally:
        _routing.reset(routing)
        _tracing.reset(token)


@contextlib.contextmanager
def _not_routing():
    """jax's gradients taken inside a loss being traced are ordinary jax (second order)."""
    token = _routing.set(False)
    try:
        yield
    finally:
        _routing.reset(token)


def _route_jax_gradient(fun, primals: tuple, has_aux: bool):
    """The differentiation of a ``jax.value_and_grad`` call under :func:`pipeline_tracing`
    (``None`` elsewhere: jax's own): the marker over ``fun``'s arguments ``primals``, in
    the ``(value, pullback[, aux])`` form of ``jax.vjp`` that jax then finishes; the
    pullback returns the marker's gradients (jax calls it with the cotangent one)."""
    if not _routing.get():
        return None
    out = value_and_grad(fun, tuple(range(len(primals))), has_aux=has_aux)(*primals)
    (value, aux), grads = out if has_aux else ((out[0], None), out[1])
    pullback = lambda cotangent: grads  # noqa: E731 - jax passes one
    return (value, pullback, aux) if has_aux else (value, pullback)


def _grad_abstract_eval(*avals, jaxpr, num_consts, diff, aux_paths=()):
    # operands (and ``diff``) are the jaxpr's constvars (values the loss closes over:
    # traced batch values, constants), then its invars; ``aux_paths``: each aux leaf's key
    # path in the aux tree (for messages)
    operands = [*jaxpr.constvars, *jaxpr.invars]
    assert len(operands) == len(diff) == len(avals) and num_consts == len(jaxpr.constvars)
    outs = [v.aval for v in jaxpr.outvars]   # the loss, then the aux leaves (has_aux)
    grads = [v.aval for v, d in zip(operands, diff, strict=True) if d]
    return outs + grads


grad_p = jcore.Primitive(GRAD_PRIMITIVE)
grad_p.multiple_results = True
grad_p.def_abstract_eval(_grad_abstract_eval)

boundary_p = jcore.Primitive(BOUNDARY_PRIMITIVE)
boundary_p.multiple_results = True
boundary_p.def_abstract_eval(lambda *avals: list(avals))
boundary_p.def_impl(lambda *xs: list(xs))


def _normalize(argnums) -> tuple[tuple[int, ...], bool]:
    if isinstance(argnums, int):
        return (argnums,), True
    argnums = tuple(argnums)
    if not argnums or not all(isinstance(a, int) for a in argnums):
        raise TypeError(f"argnums must be an int or a non-empty tuple of ints, got {argnums!r}")
    return argnums, False


def value_and_grad(fun, argnums: int | Sequence[int] = 0, has_aux: bool = False):
    """Drop-in ``jax.value_and_grad`` that marks where the forward/backward pass ends.

    :class:`~autoshard.PipeshardParallel` needs it: everything computed from the gradient
    afterwards (the optimizer update) is the apply-gradient part, run once per step;
    ``fun`` (the loss) is split into pipeline stages and run per micro-batch. The loss must
    be a mean over the batch (micro-batch gradients are averaged) or a sum (summed).

    ``has_aux=True``: ``fun`` returns ``(loss, aux)`` and the result is ``((loss, aux),
    grads)`` as in jax. Under a pipeline, ``aux`` is computed per micro-batch and each leaf
    is combined as what it is over the batch (:mod:`~autoshard.pipeline.microbatch_outputs`):
    means averaged, sums and counts summed, maxima and minima taken, values that do not
    depend on the batch taken once, which gives ``jax.jit``'s value; a leaf no combination
    gives (one row of the batch, a ratio of two sums) is refused when
    ``num_microbatches > 1``.
    """
    nums, single = _normalize(argnums)

    def wrapped(*args, **kwargs):
        if not _tracing.get():
            return jax.value_and_grad(fun, argnums, has_aux=has_aux)(*args, **kwargs)
        for a in nums:
            if a >= len(args):
                raise TypeError(f"argnums {a} but the function got {len(args)} positional "
                                f"arguments")
        leaves, tree = jax.tree_util.tree_flatten(args)
        counts = [len(jax.tree_util.tree_leaves(a)) for a in args]
        starts = np.cumsum([0] + counts)
        diff = [False] * len(leaves)
        for a in nums:
            for k in range(starts[a], starts[a + 1]):
                dtype = jax.numpy.result_type(leaves[k])
                if not jax.numpy.issubdtype(dtype, np.inexact):
                    raise TypeError(f"grad requires real- or complex-valued inputs (argument "
                                    f"{a}), got a leaf of dtype {dtype}; under "
                                    f"PipeshardParallel, jax.grad(..., allow_int=True) with "
                                    f"integer leaves is not supported: differentiate with "
                                    f"respect to the float leaves only")
                diff[k] = True

        aux_tree, aux_paths = [], []

        def flat_fun(*flat):
            out = fun(*jax.tree_util.tree_unflatten(tree, flat), **kwargs)
            aux_leaves = []
            if has_aux:
                if not (isinstance(out, (tuple, list)) and len(out) == 2):
                    raise TypeError("value_and_grad(has_aux=True): the function must return "
                                    f"a pair (loss, aux), got {type(out).__name__}")
                out, aux = out
                with_paths, treedef = jax.tree_util.tree_flatten_with_path(aux)
                aux_leaves = [leaf for _, leaf in with_paths]
                aux_tree.append(treedef)
                aux_paths.append(tuple(jax.tree_util.keystr(p) for p, _ in with_paths))
            if np.shape(out) != ():
                raise TypeError(f"value_and_grad: the function must return a scalar loss, "
                                f"got shape {np.shape(out)}")
            return [out, *aux_leaves]

        structs = [aval_struct(x) for x in leaves]
        with _not_routing():
            closed = jax.make_jaxpr(flat_fun)(*structs)
        outs = grad_p.bind(*closed.consts, *leaves, jaxpr=closed.jaxpr,
                           num_consts=len(closed.consts),
                           diff=(False,) * len(closed.consts) + tuple(diff),
                           aux_paths=aux_paths[0] if aux_paths else ())
        num_aux = len(closed.jaxpr.outvars) - 1
        loss, grads = outs[0], iter(outs[1 + num_aux:])
        per_arg = []
        for a in nums:
            subtree = jax.tree_util.tree_structure(args[a])
            per_arg.append(jax.tree_util.tree_unflatten(
                subtree, [next(grads) for _ in range(counts[a])]))
        grads_out = per_arg[0] if single else tuple(per_arg)
        if has_aux:
            aux = jax.tree_util.tree_unflatten(aux_tree[0], outs[1:1 + num_aux])
            return (loss, aux), grads_out
        return loss, grads_out

    return wrapped


def grad(fun, argnums: int | Sequence[int] = 0, has_aux: bool = False):
    """Drop-in ``jax.grad`` marking the end of the backward pass (see :func:`value_and_grad`;
    with ``has_aux=True`` it returns ``(grads, aux)``, aux combined as in ``value_and_grad``)."""
    vg = value_and_grad(fun, argnums, has_aux)

    def wrapped(*args, **kwargs):
        if not _tracing.get():
            return jax.grad(fun, argnums, has_aux=has_aux)(*args, **kwargs)
        value, grads = vg(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapped


def mark_layer_boundary(x):
    """Mark the end of a layer inside a loss function (identity on the pytree ``x``).

    :class:`~autoshard.PipeshardParallel` then uses these boundaries as its layers instead
    of clustering the forward pass automatically. Outside pipeline planning it does nothing.
    """
    if not _tracing.get():
        return x
    leaves, tree = jax.tree_util.tree_flatten(x)
    if not leaves:
        return x
    return jax.tree_util.tree_unflatten(tree, boundary_p.bind(*leaves))
