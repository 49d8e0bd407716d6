"""The parts of a :class:`~autoshard.plan.record.Plan`: modelled costs, pipeline stages,
solver statistics, collectives and costliest ops (frozen records, seconds and bytes)."""
from __future__ import annotations

import dataclasses

from jax.sharding import PartitionSpec

from autoshard.cost_model import format_bytes, format_seconds


@dataclasses.dataclass(frozen=True)
class PlanCost:
    """Modelled per-device cost of one call: seconds and bytes.

    ``compute_s`` prices ``flops`` and ``bytes_accessed`` (memory traffic);
    ``communication_s`` the collectives of the ops, ``resharding_s`` those that reshard
    tensors between ops (and carried values into the next call's layout); ``input_s``
    the copies of the arguments fed from the host each call (the batch), which are not
    part of the compiled program."""

    compute_s: float
    communication_s: float
    resharding_s: float
    peak_memory_bytes: int
    input_s: float = 0.0
    flops: float = 0.0
    bytes_accessed: float = 0.0

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s + self.resharding_s + self.input_s

    @property
    def program_s(self) -> float:
        """The compiled program's share of ``total_s`` (without the host copies)."""
        return self.compute_s + self.communication_s + self.resharding_s

    def __repr__(self):
        return (f"PlanCost(total={format_seconds(self.total_s)}, compute={format_seconds(self.compute_s)}, "
                f"communication={format_seconds(self.communication_s)}, "
                f"resharding={format_seconds(self.resharding_s)}, "
                f"peak_memory={format_bytes(self.peak_memory_bytes)})")


@dataclasses.dataclass(frozen=True)
class StageCost:
    """Modelled per-device cost of one pipeline stage for one micro-batch (forward and
    backward together, as :class:`PlanCost`), split into ``forward_s``/``backward_s``;
    ``peak_memory_bytes`` counts the micro-batches the schedule keeps in flight."""

    compute_s: float
    communication_s: float
    resharding_s: float
    peak_memory_bytes: int
    forward_s: float
    backward_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s + self.resharding_s

    def __repr__(self):
        return (f"StageCost(total={format_seconds(self.total_s)}, forward={format_seconds(self.forward_s)}, "
                f"backward={format_seconds(self.backward_s)}, "
                f"peak_memory={format_bytes(self.peak_memory_bytes)})")


@dataclasses.dataclass(frozen=True)
class Alternative:
    """A hand-written layout priced by the same model as the searched plan (seconds per
    step): a preset's layouts (``method``: its class name) propagated through the
    searched program as XLA propagates ``in_shardings`` and ``out_shardings``
    (``intra/xla_propagation``). It is how ``method=autoshard.<method>()`` prices its own
    plan, but for the copies a value's readers share (a preset's own plan is priced per
    reader, as XLA reshards): a few percent apart. The searched plan's summary lists them, so a plan that
    looks odd (the batch left whole) comes with what the obvious layout would cost, and
    in which part."""

    method: str
    compute_s: float
    communication_s: float
    resharding_s: float
    input_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s + self.resharding_s + self.input_s

    def __repr__(self):
        return f"Alternative({self.method}, total={format_seconds(self.total_s)})"


@dataclasses.dataclass(frozen=True)
class StageAssignment:
    """One pipeline stage: the layers it runs, its sub-mesh and its modelled cost.

    ``device_ids``: the sub-mesh's devices, row-major (positions in the mesh when it was
    planned on an abstract mesh). ``apply_cost``: the stage's apply-gradient program, once
    per step (``None`` when the update runs elsewhere).
    """

    layers: tuple[int, ...]
    mesh_shape: tuple[int, ...]
    device_ids: tuple[int, ...]
    cost: StageCost
    num_microbatches: int
    schedule: str
    apply_cost: PlanCost | None = None

    def __repr__(self):
        first, last = self.layers[0], self.layers[-1]
        layers = f"{first}" if first == last else f"{first}-{last}"
        return (f"StageAssignment(layers={layers}, mesh_shape={self.mesh_shape}, "
                f"devices={list(self.device_ids)}, cost={self.cost!r})")


@dataclasses.dataclass(frozen=True)
class SolverInfo:
    """What the ILP solver reported, and how long planning took (seconds).

    ``solver_status``: how the solve ended (``autoshard.ilp.SolverStats.solver_status``:
    ``LP_INTEGRAL`` proven by the LP, CP-SAT's ``OPTIMAL``/``FEASIBLE``, ``STALLED``: the
    search stopped improving, ``OUT_OF_TIME``: no time was left to search, ...)."""

    status: str
    objective_s: float
    lower_bound_s: float
    gap: float
    solve_time_s: float
    num_nodes: int
    num_variables: int
    num_constraints: int
    planning_time_s: float
    tied_classes: int = 0   # > 0: repeated layers were tied into this many ILP nodes
    tied_gap: float = 0.0   # optimality gap of the tied problem
    solver_status: str = ""
    #: > 0: too large to solve whole, searched over this many neighbourhoods of its plan
    #: (each moving a node's layout by at most one mesh axis); gap against a weak bound
    neighbourhood_rounds: int = 0

    def describe(self) -> str:
        """One line: status, gap, problem size and times."""
        if self.neighbourhood_rounds:
            size = (f"{self.num_nodes} nodes searched in {self.neighbourhood_rounds} "
                    f"neighbourhood round(s), one mesh axis moved per node per round")
        elif self.tied_classes:
            size = (f"{self.num_nodes} nodes tied by repetition into {self.tied_classes} "
                    f"(gap within them {self.tied_gap:.2%})")
        else:
            size = f"gap {self.gap:.2%}, {self.num_nodes} nodes"
        how = f" ({self.solver_status})" if self.solver_status else ""
        return (f"{self.status}{how}, {size}, "
                f"{self.num_variables} variables, {self.num_constraints} constraints, "
                f"solve {self.solve_time_s:.2f} s, planning {self.planning_time_s:.2f} s")


@dataclasses.dataclass(frozen=True)
class Collective:
    """A collective the plan runs and prices: at ``op`` (an equation, or ``a→b``: a tensor
    use resharded, ``resharding`` true), ``kind`` one of ``cost_model.COLLECTIVES``
    over mesh ``axes``, ``nbytes`` its result per device, ``seconds`` its price. (A merged
    all-reduce's shared latency is one with ``nbytes`` 0.)"""

    op: str
    kind: str
    seconds: float
    nbytes: int = 0
    axes: tuple[str, ...] = ()
    resharding: bool = False


@dataclasses.dataclass(frozen=True)
class OpCost:
    """Per-device seconds the plan spends at one equation (compute + its collectives);
    ``scope``: the module path it was traced under (``"jvp(Model)/Dense_0"``), if any."""

    op: str
    source: str
    strategy: str
    seconds: float
    scope: str = ""


@dataclasses.dataclass(frozen=True)
class ProgramSpecs:
    """The shardings of one program of a pipeline plan (``name``: ``"stage 0"``,
    ``"pre-gradient"``, ``"apply on stage 1"``, ``"apply on the mesh"``), on its own
    sub-mesh: a spec per flat input and output, and the pinned intermediates and
    resharded operands, as in :class:`Plan`. Kept so a saved plan runs without solving.
    ``mesh_shape``: the sub-mesh's; ``flops`` and ``bytes_accessed``: the modelled work
    per device of one run (a stage's: forward and backward of one micro-batch), which
    the audit compares with the compiled program's (``()`` and 0 in older files)."""

    name: str
    flat_in_specs: tuple[PartitionSpec, ...]
    flat_out_specs: tuple[PartitionSpec, ...]
    value_specs: tuple[tuple[int, PartitionSpec], ...] = ()
    operand_specs: tuple[tuple[int, int, PartitionSpec], ...] = ()
    mesh_shape: tuple[int, ...] = ()
    flops: float = 0.0
    bytes_accessed: float = 0.0


@dataclasses.dataclass(frozen=True)
class LoopLayouts:
    """The layouts a loop planned once (a scan over layers: ``intra.loop_plans``) pins
    inside its body, equation ``eqn``'s: a spec per input and output of the body's own
    program (``ir.trace.traced_body``: its consts, carries and one step of its stacked
    operands; its carries and one step of its results), its pinned intermediates and
    resharded operands as in :class:`Plan`; ``in_via[k]`` / ``out_via[k]``: the layouts input
    or output ``k`` is pinned to first, in turn (the waypoints of a resharding priced
    every step: a step's slice read in another layout than the loop holds it in, a carry
    made in another layout than it entered with). Kept so a saved plan runs without
    solving."""

    eqn: int
    flat_in_specs: tuple[PartitionSpec, ...]
    flat_out_specs: tuple[PartitionSpec, ...]
    value_specs: tuple[tuple[int, PartitionSpec], ...] = ()
    operand_specs: tuple[tuple[int, int, PartitionSpec], ...] = ()
    in_via: tuple[tuple[PartitionSpec, ...], ...] = ()
    out_via: tuple[tuple[PartitionSpec, ...], ...] = ()

    def __repr__(self):
        return (f"LoopLayouts(equation {self.eqn}: {len(self.flat_in_specs)} inputs, "
                f"{len(self.value_specs)} values pinned)")


def operand_layouts(operand_specs) -> tuple[dict, dict]:
    """A plan's (or a pipeline program's) ``operand_specs`` as two maps from (equation,
    operand): the spec each operand is read in, and for an operand listed more than once,
    the specs it is resharded through first, in order (a tuple)."""
    return _chains(((e, k), spec) for e, k, spec in operand_specs)


def value_layouts(value_specs) -> tuple[dict, dict]:
    """``value_specs`` as two maps from value id: the layout each value is pinned to as
    made, and for a value listed more than once, the layouts it is pinned to first, in
    order (a tuple: a gather's summed rows before their planned slices)."""
    return _chains(value_specs)


def _chains(keyed) -> tuple[dict, dict]:
    chains: dict = {}
    for key, spec in keyed:
        chains.setdefault(key, []).append(spec)
    return ({key: chain[-1] for key, chain in chains.items()},
            {key: tuple(chain[:-1]) for key, chain in chains.items() if len(chain) > 1})
