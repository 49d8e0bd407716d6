"""autoshard: automatic intra- and inter-operator parallelization for JAX.

The public names below are imported lazily (PEP 562), so ``import autoshard.ilp`` or
``import autoshard.cost_model`` does not import jax.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ParallelizedFunction": "autoshard.api",
    "parallelize": "autoshard.api",
    "calibrate": "autoshard.calibration",
    "calibrate_kernels": "autoshard.kernel_calibration",
    "grad": "autoshard.pipeline.markers",
    "value_and_grad": "autoshard.pipeline.markers",
    "mark_layer_boundary": "autoshard.pipeline.markers",
    "global_batch": "autoshard.distributed.inputs",
    "gather_to_host": "autoshard.distributed.outputs",
    "plan_digest": "autoshard.distributed.agreement",
    "abstract_mesh": "autoshard.mesh",
    "make_mesh": "autoshard.mesh",
    "ShardParallel": "autoshard.methods",
    "PipeshardParallel": "autoshard.methods",
    "DataParallel": "autoshard.methods",
    "ZeRO3": "autoshard.methods",
    "Megatron": "autoshard.methods",
    "Annotated": "autoshard.methods",
    "Plan": "autoshard.plan.record",
    "Audit": "autoshard.plan.audit",
    "PipelineAudit": "autoshard.plan.audit",
    "PlanCost": "autoshard.plan.parts",
    "SolverInfo": "autoshard.plan.parts",
    "Alternative": "autoshard.plan.parts",
    "ProgramSpecs": "autoshard.plan.parts",
    "LoopLayouts": "autoshard.plan.parts",
    "StageAssignment": "autoshard.plan.parts",
    "StageCost": "autoshard.plan.parts",
    "Rematerialization": "autoshard.ir.remat",
    "InfeasiblePlanError": "autoshard.errors",
    "PlanFormatError": "autoshard.errors",
    "PlanMismatchError": "autoshard.errors",
    "AgreementTimeoutError": "autoshard.errors",
    "Cluster": "autoshard.cost_model",
    "CLUSTER_PRESETS": "autoshard.cost_model",
    "cluster_preset": "autoshard.cost_model",
}
# subpackages users reach as attributes (``autoshard.cost_model.Link``)
_SUBPACKAGES = ("cost_model", "ilp", "runtime")

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"autoshard.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autoshard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))
