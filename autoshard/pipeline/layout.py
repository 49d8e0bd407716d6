"""What pipeline planning decides, kept for building the runtime (plain records)."""
from __future__ import annotations

import dataclasses

from autoshard import ilp
from autoshard.ir.program import Program
from autoshard.methods import PipeshardParallel
from autoshard.plan.record import Plan

from .layers import Layering
from .partial_grads import DeferredReduction
from .stage_program import StageProgram
from .trace import SplitStep


@dataclasses.dataclass(frozen=True, eq=False)
class PlannedStage:
    """A chosen stage; seconds: ``send_s`` per micro-batch, ``step_send_s`` and
    ``pairing_s`` once per step (the stage plan carries ``pairing_s / B`` per micro-batch);
    ``deferred``: its gradients' batch reductions moved from every micro-batch's backward
    to once per step (its price change against the stage plan's own cost)."""

    program: StageProgram
    plan: Plan
    mesh_shape: tuple[int, ...]
    positions: tuple[int, ...]     # row-major indices into the full mesh
    cost: ilp.StageCost
    send_s: tuple[float, float]    # (activations forward, cotangents back) per micro-batch
    step_send_s: float = 0.0       # shared parameters (and gradients), pre-gradient values
    pairing_s: float = 0.0         # gradients resharded into their parameters' layouts
    deferred: DeferredReduction = DeferredReduction()  # gradients reduced once per step


@dataclasses.dataclass(frozen=True, eq=False)
class PlannedApply:
    """A once-per-step program over outer value ids, run on stage ``stage`` (-1: full mesh)."""

    stage: int
    program: Program
    plan: Plan
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class PipelineLayout:
    """Everything needed to build the runtime pipeline for a mesh."""

    split: SplitStep
    layering: Layering
    stages: tuple[PlannedStage, ...]
    pre: tuple[PlannedApply, ...]
    apply: tuple[PlannedApply, ...]
    method: PipeshardParallel
    axis_names: tuple[str, ...]
    mesh_shape: tuple[int, ...]


def apply_name(stage: int) -> str:
    """How plans and lowered pipelines name the apply-gradient program of ``stage``."""
    return f"apply on {'stage ' + str(stage) if stage >= 0 else 'the mesh'}"
