"""autoshard: automatic intra- and inter-operator parallelization for JAX."""
from ._api import ParallelizedFunction as ParallelizedFunction
from ._api import parallelize as parallelize
from ._calibrate import calibrate as calibrate
from ._grad import grad as grad
from ._grad import mark_layer_boundary as mark_layer_boundary
from ._grad import value_and_grad as value_and_grad
from ._inputs import global_batch as global_batch
from ._mesh import abstract_mesh as abstract_mesh
from ._mesh import make_mesh as make_mesh
from ._methods import DataParallel as DataParallel
from ._methods import Megatron as Megatron
from ._methods import PipeshardParallel as PipeshardParallel
from ._methods import ShardParallel as ShardParallel
from ._methods import ZeRO3 as ZeRO3
from ._multihost import PlanMismatchError as PlanMismatchError
from ._multihost import plan_digest as plan_digest
from ._plan import Plan as Plan
from ._plan import PlanCost as PlanCost
from ._plan import ProgramSpecs as ProgramSpecs
from ._plan import StageAssignment as StageAssignment
from ._plan import StageCost as StageCost
from ._planner import InfeasiblePlanError as InfeasiblePlanError
from ._plan_json import PlanFormatError as PlanFormatError
from .cost_model import CLUSTER_PRESETS as CLUSTER_PRESETS
from .cost_model import Cluster as Cluster
from .cost_model import cluster_preset as cluster_preset

__version__ = "0.1.0"
