"""Executing plans: flat programs evaluated under jax.jit with sharding constraints, and
pipelines of such programs on sub-meshes.

Knows nothing of how a plan was found; takes programs (``autoshard.ir``) and PartitionSpecs.
"""
from .execute import evaluate_program as evaluate_program
from .pipeline import PipelineCompiled as PipelineCompiled
from .pipeline import PipelineLowered as PipelineLowered
from .pipeline import PipelineProgram as PipelineProgram
from .pipeline import PipelineStage as PipelineStage
from .pipeline import StepProgram as StepProgram
from .schedule import SCHEDULES as SCHEDULES
from .schedule import dispatch_order as dispatch_order
from .schedule import stage_orders as stage_orders
from .sharded import ShardedProgram as ShardedProgram
from .sharded import instead_of_explicit as instead_of_explicit
from .sharded import outside_other_meshes as outside_other_meshes
from .sharded import shard_program as shard_program
from .sharded import typed_sharding as typed_sharding
from .transfer import move as move
