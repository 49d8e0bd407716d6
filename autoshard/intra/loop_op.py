"""A primitive as a loop nest: the description every sharding rule returns (``op_rules``)."""
from __future__ import annotations

import dataclasses
import math

from .indexed_loops import IndexedLoops

Dims = tuple  # per tensor dim: loop index or None (never split)


@dataclasses.dataclass(frozen=True)
class LoopOp:
    """A primitive as a loop nest.

    ``sizes[l]``: extent of loop ``l``. ``splittable[l]``: whether mesh axes may split it.
    ``in_dims[k]``: per dim of operand ``k`` its loop (``None`` for a literal/rank-0
    operand). ``out_dims[k]``: likewise for output ``k``. ``flops``: arithmetic of the whole
    (unsplit) op. ``kernel``: ``kernels.kernel_name``. ``contraction``: XLA partitions it as a
    dot or a convolution (``strategies._scatter_steps``). ``indexing``: the loops of an
    embedding-style gather or scatter (``IndexedLoops``), whose splits XLA partitions
    only in some axis orders. ``expansion``: how some backends rewrite the op into
    others (``expansions.expansion_traffic``): ``"threefry"`` (random bits computed in a
    loop: ``Cluster.threefry_in_loops``), ``"select_and_scatter"`` (max-pool's gradient as
    an argmax and a scatter: ``Cluster.select_and_scatter_expanded``), ``"batch_groups"``
    (a filter gradient of groups run densely: ``Cluster.batch_groups_dense``) or
    ``"f32_dot"`` (a dot of low-precision result, or of one low-precision operand, run in
    float32: ``Cluster.low_precision_dots_in_f32``); ``padded``: the
    elements of the operand that expansion pads (the whole operand, padded).
    ``pair_index_bytes``: an ``argmax`` / ``argmin``, whose index itemsize this is: a split
    of its reduced loop ends not in an all-reduce but in an all-gather of each shard's
    (value, index) pair, reduced again on every device (measured: XLA's partitioner, jax
    0.10, an accuracy metric's argmax over logits split over the vocabulary gathers
    f32[.., 8] and s32[.., 8] pairs over 8 devices, not the logits).
    """

    sizes: tuple[int, ...]
    splittable: tuple[bool, ...]
    in_dims: tuple[Dims | None, ...]
    out_dims: tuple[Dims, ...]
    flops: float = 0.0
    kernel: str | None = None
    contraction: bool = False
    indexing: IndexedLoops | None = None
    expansion: str | None = None
    padded: int = 0
    pair_index_bytes: int = 0

    @property
    def reduction_loops(self) -> frozenset[int]:
        followed = {l for dims in self.out_dims for l in dims if l is not None}
        return frozenset(range(len(self.sizes))) - followed


def rank_of(aval) -> int:
    """Number of dims of ``aval``."""
    return len(aval.shape)


def size_of(aval) -> int:
    """Number of elements of ``aval``."""
    return int(math.prod(aval.shape))
