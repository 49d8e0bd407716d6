"""Executing plans: flat programs evaluated under jax.jit with sharding constraints.

Knows nothing of how a plan was found; takes programs and PartitionSpecs.
"""
from ._execute import evaluate_program as evaluate_program
from ._program import Equation as Equation
from ._program import Literal as Literal
from ._program import Program as Program
from ._sharded import ShardedProgram as ShardedProgram
from ._sharded import shard_program as shard_program
