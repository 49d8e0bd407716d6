"""Executing plans: flat programs evaluated under jax.jit with sharding constraints, and
pipelines of such programs on sub-meshes.

Knows nothing of how a plan was found; takes programs and PartitionSpecs.
"""
from ._execute import evaluate_program as evaluate_program
from ._program import Equation as Equation
from ._program import Literal as Literal
from ._program import Program as Program
from ._sharded import ShardedProgram as ShardedProgram
from ._sharded import shard_program as shard_program
from ._pipeline import PipelinePart as PipelinePart
from ._pipeline import PipelineProgram as PipelineProgram
from ._pipeline import PipelineStage as PipelineStage
from ._pipeline import StepProgram as StepProgram
from ._schedule import SCHEDULES as SCHEDULES
from ._schedule import dispatch_order as dispatch_order
from ._schedule import stage_orders as stage_orders
