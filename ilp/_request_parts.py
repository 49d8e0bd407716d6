"""The parts of an intra-op request: edge and shared costs, and the tuples a request holds
its edges and memory terms in, which keep what is worked out from them alone for every
request made with the same ones (``dataclasses.replace`` with other node costs or
options: a neighbourhood round's request, a memory probe's).

Units: costs are seconds, memory is bytes per device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from autoshard.cost_model import format_seconds


def frozen_array(values, ndim: int, what: str) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype == np.float64 and values.ndim == ndim \
            and not values.flags.writeable and values.base is None:
        return values  # read-only and owning its data: already frozen, share it
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}: cannot convert to a float64 array ({error})") from None
    if array.ndim != ndim:
        raise ValueError(f"{what}: expected a {ndim}-d array, got shape {array.shape}")
    array.flags.writeable = False
    return array


def value_summary(values, limit: int = 12) -> str:
    values = tuple(values)
    if len(values) <= limit:
        return repr(values)
    return f"<{len(values)} values>"


@dataclass(frozen=True, eq=False)
class EdgeCost:
    """Resharding cost ``cost[i, j]`` (seconds) when ``src`` uses strategy i and ``dst`` strategy j.

    ``np.inf`` cells forbid that pair of strategies.
    """

    src: int
    dst: int
    cost: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", int(self.src))
        object.__setattr__(self, "dst", int(self.dst))
        object.__setattr__(
            self, "cost", frozen_array(self.cost, 2, f"edge {self.src}->{self.dst} cost")
        )
        # checked once here, not by every request holding the edge; the least cell is NaN
        # when any is, else -inf when any is
        least = self.cost.min() if self.cost.size else 0.0
        object.__setattr__(self, "valid_cells", bool(least == least and least != -np.inf))

    def between(self, src: int, dst: int) -> EdgeCost:
        """This edge's costs (the same array, checked once) between ``src`` and ``dst``:
        the edges of repeated layers."""
        edge = object.__new__(EdgeCost)
        for name, value in (("src", int(src)), ("dst", int(dst)), ("cost", self.cost),
                            ("valid_cells", self.valid_cells)):
            object.__setattr__(edge, name, value)
        return edge

    def __repr__(self) -> str:
        rows, cols = self.cost.shape
        return f"EdgeCost(src={self.src}, dst={self.dst}, cost=<{rows}x{cols}>)"


@dataclass(frozen=True, eq=False)
class SharedCost:
    """``cost`` seconds paid once when any of ``members`` ((node, strategy) pairs) is chosen.

    A fixed charge several nodes share: e.g. the latency of the one collective XLA
    merges their independent all-reduces into, paid once however many take part.
    """

    cost: float
    members: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "cost", float(self.cost))
        object.__setattr__(self, "members", tuple((int(v), int(i)) for v, i in self.members))

    def __repr__(self) -> str:
        return f"SharedCost(cost={format_seconds(self.cost)}, members={value_summary(self.members)})"


class EdgeList(tuple):
    """A request's edges: a tuple of ``EdgeCost`` that keeps what is worked out from the
    edges alone, for every request holding the very same list (``dataclasses.replace``
    with other node costs or options, as the neighbourhood rounds and memory probes
    make): the flat cost arrays (``flat_edges``), and ``checked``, the strategy counts per
    node they were checked against."""

    checked: tuple[int, ...] | None = None

    @functools.cached_property
    def flat_edges(self) -> tuple[np.ndarray, ...]:
        """(src, dst, cols, edge_start, edge_costs) as ``FlatCosts`` holds them."""
        src = np.array([e.src for e in self], dtype=np.int64)
        dst = np.array([e.dst for e in self], dtype=np.int64)
        cols = np.array([e.cost.shape[1] for e in self], dtype=np.int64)
        start: dict[int, int] = {}  # repeated layers' edges share matrices: stored once
        matrices, offset = [], 0
        for e in self:
            if id(e.cost) not in start:
                start[id(e.cost)] = offset
                matrices.append(e.cost)
                offset += e.cost.size
        edge_start = np.array([start[id(e.cost)] for e in self], dtype=np.int64)
        costs = np.concatenate([m.ravel() for m in matrices]) if matrices else np.zeros(0)
        arrays = (src, dst, cols, edge_start, costs)
        for array in arrays:
            array.flags.writeable = False
        return arrays


class MemoryTerms(tuple):
    """A request's memory terms (``IntraOpRequest.memory_terms``), normalised to read-only
    arrays; ``checked``: the strategy counts per node they were checked against."""

    checked: tuple[int, ...] | None = None


@dataclass(frozen=True, eq=False)
class FlatCosts:
    """A request's costs as flat arrays: node ``v``'s strategy ``i`` costs
    ``node_costs[node_start[v] + i]`` (``counts[v]`` strategies); edge ``k`` costs
    ``edge_costs[edge_start[k] + i * cols[k] + j]`` for (``src[k]``: i, ``dst[k]``: j)."""

    counts: np.ndarray
    node_start: np.ndarray
    node_costs: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    cols: np.ndarray
    edge_start: np.ndarray
    edge_costs: np.ndarray
