"""The Plan: a frozen, serialisable record of how a function is parallelized.

Its views live beside it: :mod:`.text` (``summary``), :mod:`.serialize` (JSON) and
:mod:`.html` (Jupyter, ``save_html``); none of them imports this module.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from jax.sharding import PartitionSpec

from autoshard.cost_model import Cluster, write_text_atomically
from autoshard.ir import hlo
from autoshard.ir.remat import Rematerialization
from autoshard.methods import Method

from . import audit, html, serialize, text
from .parts import Alternative, Collective, LoopLayouts, OpCost, PlanCost, ProgramSpecs, SolverInfo


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """How to run a function on a mesh.

    ``method``: the method that made it (:class:`~autoshard.ShardParallel`, a preset or
    :class:`~autoshard.PipeshardParallel`, with its settings).
    ``in_specs``/``out_specs`` mirror the arguments/outputs with a
    ``PartitionSpec`` per array leaf (``None`` for static arguments).
    ``value_specs``/``operand_specs`` pin intermediates: value id → spec, and
    (equation, operand) → spec where an operand is resharded before use (an operand
    listed more than once is resharded through each spec in turn, the last the one it is
    read in: the layout the value's readers share, the waypoints of the priced route; see
    :func:`~autoshard.plan.parts.operand_layouts`; a value listed more than once is
    pinned to each in turn as made, the last its layout: a gather's summed rows before
    their planned slices, :func:`~autoshard.plan.parts.value_layouts`).
    Pipeline plans: ``stages`` (:class:`StageAssignment`) and ``programs``
    (:class:`ProgramSpecs`: every stage's, pre-gradient and apply program's shardings).
    ``batch``: the arguments taken as the batch (``"args[2]"``), which the presets split
    and a pipeline cuts into micro-batches; ``batch_inferred``: chosen by autoshard
    because ``batch_argnums`` was not given. ``alternatives``: a searched plan's
    hand-written rivals (:class:`Alternative`: the presets, and the model's own
    annotations when it has some) priced by the same model. ``in_shapes`` /
    ``out_shapes``: the global shape of every flat input / output (``()`` where a plan
    file predates them or, for a pipeline's outputs, is not recorded). ``remat``: the
    forward segments the plan recomputes in the backward pass
    (:class:`~autoshard.Rematerialization`; ``None``: it stores every activation); the
    plan's value ids and equations are those of that rewritten program. ``loops``: the
    layouts pinned inside each loop over layers planned once (:class:`LoopLayouts`).
    """

    method: Method
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
    batch: tuple[str, ...] = ()
    batch_inferred: bool = False
    alternatives: tuple[Alternative, ...] = ()
    in_shapes: tuple[tuple[int, ...], ...] = ()
    out_shapes: tuple[tuple[int, ...], ...] = ()
    remat: Rematerialization | None = None
    loops: tuple[LoopLayouts, ...] = ()

    def __repr__(self):
        mesh = ", ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.mesh_shape))
        return (f"Plan(method={self.method!r}, mesh=({mesh}), {len(self.flat_in_specs)} inputs, "
                f"{len(self.flat_out_specs)} outputs, cost={self.cost!r})")

    def summary(self, max_rows: int = 40) -> str:
        """A readable table: specs of inputs/outputs, costs, costliest ops, solver stats."""
        return text.plan_summary(self, max_rows)

    def to_json(self, indent: int | None = 1) -> str:
        """Serialise everything needed to inspect and reuse the plan."""
        return json.dumps(serialize.plan_to_dict(self), indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """Load a plan written by :meth:`to_json`.

        Raises :class:`autoshard.PlanFormatError` (a ``ValueError``) naming the field
        that is missing or wrong.
        """
        return cls(**serialize.plan_fields_from_json(text))

    def audit(self, compiled, compiler_log: str | None = None
              ) -> audit.Audit | audit.PipelineAudit:
        """Compare the plan with its compiled program (``step.lower(*args).compile()``):
        the collectives XLA emits against those the plan priced (kind, mesh axes, bytes,
        count), and the compiled flops and bytes accessed against the modelled ones.
        ``compiler_log``: what XLA printed while compiling, to report its "involuntary
        full rematerialization" warnings (``ParallelizedFunction.audit`` captures it).
        A pipeline's plan is compared program by program with the programs its step
        compiles (:class:`~autoshard.plan.audit.PipelineAudit`)."""
        if self.programs:  # a pipeline's: each program against its part of the plan
            programs = dict(compiled.items()) if hasattr(compiled, "items") else {}
            if not programs:
                raise ValueError("a pipeline plan is audited against every program its step "
                                 "compiles: pass step.lower(*args).compile()")
            cpu = hlo.platform(next(iter(programs.values()))) == "cpu"
            return audit.audit_pipeline(
                self, {name: (c.as_text(), hlo.cost_analysis(c)) for name, c in programs.items()},
                compiler_log, reduce_scatter_as_all_reduce=cpu)
        return audit.audit(self, compiled.as_text(), hlo.cost_analysis(compiled), compiler_log,
                           reduce_scatter_as_all_reduce=hlo.platform(compiled) == "cpu")

    def _repr_html_(self) -> str:
        """Jupyter view: per-input sharding pictures, cost and memory bars, collectives."""
        return html.plan_html(self)

    def save(self, path) -> None:
        """Write :meth:`to_json` to ``path`` whole (a temporary file in the same folder,
        then ``os.replace``): readers and other writers never see half a file."""
        write_text_atomically(path, self.to_json() + "\n")

    def save_html(self, path) -> None:
        """Write the :meth:`_repr_html_` view as one self-contained HTML file (no network),
        whole, as :meth:`save` writes."""
        write_text_atomically(path, html.plan_page(self))
