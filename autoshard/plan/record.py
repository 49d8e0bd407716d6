"""The Plan: a frozen, serialisable record of how a function is parallelized."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from jax.sharding import PartitionSpec

from autoshard.cost_model import Cluster, format_bytes

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PlanCost:
    """Modelled per-device cost of one call: seconds and bytes."""

    compute_s: float
    communication_s: float
    resharding_s: float
    peak_memory_bytes: int

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s + self.resharding_s

    def __repr__(self):
        return (f"PlanCost(total={_fmt_s(self.total_s)}, compute={_fmt_s(self.compute_s)}, "
                f"communication={_fmt_s(self.communication_s)}, "
                f"resharding={_fmt_s(self.resharding_s)}, "
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
        return (f"StageCost(total={_fmt_s(self.total_s)}, forward={_fmt_s(self.forward_s)}, "
                f"backward={_fmt_s(self.backward_s)}, "
                f"peak_memory={format_bytes(self.peak_memory_bytes)})")


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
    """What the ILP solver reported, and how long planning took (seconds)."""

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

    def describe(self) -> str:
        """One line: status, gap, problem size and times."""
        if self.tied_classes:
            size = (f"{self.num_nodes} nodes tied by repetition into {self.tied_classes} "
                    f"(gap within them {self.tied_gap:.2%})")
        else:
            size = f"gap {self.gap:.2%}, {self.num_nodes} nodes"
        return (f"{self.status}, {size}, "
                f"{self.num_variables} variables, {self.num_constraints} constraints, "
                f"solve {self.solve_time_s:.2f} s, planning {self.planning_time_s:.2f} s")


@dataclasses.dataclass(frozen=True)
class Collective:
    """A collective the plan performs: at ``op`` (an equation or a resharded tensor use)."""

    op: str
    kind: str       # "all-reduce", "reduce-scatter", "resharding"
    seconds: float


@dataclasses.dataclass(frozen=True)
class OpCost:
    """Per-device seconds the plan spends at one equation (compute + its collectives)."""

    op: str
    source: str
    strategy: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class ProgramSpecs:
    """The shardings of one program of a pipeline plan (``name``: ``"stage 0"``,
    ``"pre-gradient"``, ``"apply on stage 1"``, ``"apply on the mesh"``), on its own
    sub-mesh: a spec per flat input and output, and the pinned intermediates and
    resharded operands, as in :class:`Plan`. Kept so a saved plan runs without solving."""

    name: str
    flat_in_specs: tuple[PartitionSpec, ...]
    flat_out_specs: tuple[PartitionSpec, ...]
    value_specs: tuple[tuple[int, PartitionSpec], ...] = ()
    operand_specs: tuple[tuple[int, int, PartitionSpec], ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """How to run a function on a mesh.

    ``in_specs``/``out_specs`` mirror the arguments/outputs with a
    ``PartitionSpec`` per array leaf (``None`` for static arguments).
    ``value_specs``/``operand_specs`` pin intermediates: value id → spec, and
    (equation, operand) → spec where an operand is resharded before use.
    Pipeline plans: ``stages`` (:class:`StageAssignment`) and ``programs``
    (:class:`ProgramSpecs`: every stage's, pre-gradient and apply program's shardings).
    """

    method: str
    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    cluster: Cluster
    in_specs: Any
    out_specs: Any
    cost: PlanCost
    solver: SolverInfo | None
    fingerprint: str
    in_paths: tuple[str, ...]
    out_paths: tuple[str, ...]
    flat_in_specs: tuple[PartitionSpec, ...]
    flat_out_specs: tuple[PartitionSpec, ...]
    value_specs: tuple[tuple[int, PartitionSpec], ...] = ()
    operand_specs: tuple[tuple[int, int, PartitionSpec], ...] = ()
    collectives: tuple[Collective, ...] = ()
    top_ops: tuple[OpCost, ...] = ()
    warnings: tuple[str, ...] = ()
    stages: tuple = ()
    programs: tuple[ProgramSpecs, ...] = ()

    def __repr__(self):
        mesh = ", ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.mesh_shape))
        return (f"Plan(method={self.method}, mesh=({mesh}), {len(self.flat_in_specs)} inputs, "
                f"{len(self.flat_out_specs)} outputs, cost={self.cost!r})")

    # ----------------------------------------------------------------- text
    def summary(self, max_rows: int = 40) -> str:
        """A readable table: specs of inputs/outputs, costs, costliest ops, solver stats."""
        mesh = " × ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.mesh_shape))
        lines = [f"autoshard plan — method {self.method}, mesh {mesh}, cluster {self.cluster.name}"]
        c = self.cost
        lines.append(f"modelled cost per step: total {_fmt_s(c.total_s)} = compute "
                     f"{_fmt_s(c.compute_s)} + communication {_fmt_s(c.communication_s)} + "
                     f"resharding {_fmt_s(c.resharding_s)}; peak memory per device "
                     f"{format_bytes(c.peak_memory_bytes)}")
        lines += _spec_table("inputs", self.in_paths, self.flat_in_specs, max_rows)
        lines += _spec_table("outputs", self.out_paths, self.flat_out_specs, max_rows)
        if self.top_ops:
            lines.append("costliest ops:")
            for op in self.top_ops[:10]:
                lines.append(f"  {_fmt_s(op.seconds):>10}  {op.op:<24} {op.strategy:<28} {op.source}")
        by_kind: dict[str, tuple[int, float]] = {}
        for col in self.collectives:
            n, s = by_kind.get(col.kind, (0, 0.0))
            by_kind[col.kind] = (n + 1, s + col.seconds)
        if by_kind:
            lines.append("collectives: " + ", ".join(
                f"{k} ×{n} ({_fmt_s(s)})" for k, (n, s) in sorted(by_kind.items())))
        for i, st in enumerate(self.stages):
            if isinstance(st, StageAssignment):
                if i == 0:
                    lines.append(f"pipeline: {len(self.stages)} stage(s), {st.num_microbatches} "
                                 f"micro-batch(es), schedule {st.schedule}")
                lines.append(f"  stage {i}: {st!r}")
        if self.solver is not None:
            lines.append(f"solver: {self.solver.describe()}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    # ----------------------------------------------------------------- json
    def to_json(self, indent: int | None = 1) -> str:
        """Serialise everything needed to inspect and reuse the plan."""
        from .serialize import plan_to_dict
        return json.dumps(plan_to_dict(self), indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Plan":
        """Load a plan written by :meth:`to_json`.

        Raises :class:`autoshard.PlanFormatError` (a ``ValueError``) naming the field
        that is missing or wrong.
        """
        from .serialize import plan_from_json
        return plan_from_json(text)

    # ----------------------------------------------------------------- html
    def _repr_html_(self) -> str:
        """Jupyter view: per-input sharding pictures, cost and memory bars, collectives."""
        from .html import plan_html
        return plan_html(self)

    def save_html(self, path) -> None:
        """Write the :meth:`_repr_html_` view as one self-contained HTML file (no network)."""
        from .html import plan_page
        with open(path, "w", encoding="utf-8") as f:
            f.write(plan_page(self))


def _spec_table(title, paths, specs, max_rows):
    lines = [f"{title}:"]
    width = max((len(p) for p in paths[:max_rows]), default=0)
    for path, spec in list(zip(paths, specs))[:max_rows]:
        lines.append(f"  {path:<{width}}  {spec}")
    if len(paths) > max_rows:
        lines.append(f"  … {len(paths) - max_rows} more")
    return lines


def _fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"

