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
    only in some axis orders. ``threefry``: it generates threefry random bits, which some
    backends compute in a loop over the whole output (``Cluster.threefry_in_loops``).
    """

    sizes: tuple[int, ...]
    splittable: tuple[bool, ...]
    in_dims: tuple[Dims | None, ...]
    out_dims: tuple[Dims, ...]
    flops: float = 0.0
    kernel: str | None = None
    contraction: bool = False
    indexing: IndexedLoops | None = None
    threefry: bool = False

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
