"""Names of kernels whose measured time can price a strategy.

A convolution runs at a speed that depends on its per-device shape, which a strategy
sets. ``Cluster.kernel_seconds`` (``autoshard.calibrate_kernels``) holds measured
times keyed by ``cost_model.kernel_key``: the op's primitive and parameters
(``kernel_name``, kept in ``LoopOp.kernel``) and its per-device operands
(``local_kernel_key``).
"""
from __future__ import annotations

from autoshard.cost_model import MeshCostModel, kernel_key

#: parameters that say how an op's result is laid out, not what it computes
_LAYOUT_PARAMS = frozenset({"out_sharding"})


def kernel_name(eqn) -> str:
    """``eqn``'s primitive and parameters:
    ``"conv_general_dilated(batch_group_count=1, dimension_numbers=..., ...)"``."""
    params = ", ".join(f"{k}={v!r}" for k, v in sorted(eqn.params.items())
                       if k not in _LAYOUT_PARAMS)
    return f"{eqn.primitive.name}({params})"


def local_kernel_key(kernel: str, in_avals, in_specs, model: MeshCostModel) -> str:
    """The ``Cluster.kernel_seconds`` key of ``kernel`` (a ``kernel_name``) run on operands
    ``in_avals`` laid out as ``in_specs``: their dtypes and per-device shapes."""
    return kernel_key(kernel, [(str(a.dtype), model.shard_shape(tuple(a.shape), s))
                               for a, s in zip(in_avals, in_specs)])
