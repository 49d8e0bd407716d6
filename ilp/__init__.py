"""autoshard.ilp: intra-operator strategy selection (CP-SAT) and inter-operator stage
slicing (DP). Never imports jax."""

from ._budget_repair import fit_to_budget as fit_to_budget
from ._evaluate import Evaluation as Evaluation
from ._evaluate import MoveCosts as MoveCosts
from ._evaluate import evaluate as evaluate
from ._heuristic import best_assignment as best_assignment
from ._heuristic import greedy_assignment as greedy_assignment
from ._heuristic import greedy_assignments as greedy_assignments
from ._intra_op import solve_intra_op as solve_intra_op
from ._memory import min_peak_memory as min_peak_memory
from ._neighbourhood import solved_in_neighbourhoods as solved_in_neighbourhoods
from ._request import InfeasibleError as InfeasibleError
from ._request import IntraOpRequest as IntraOpRequest
from ._request import IntraOpResult as IntraOpResult
from ._request import SolverStats as SolverStats
from ._request_parts import EdgeCost as EdgeCost
from ._request_parts import SharedCost as SharedCost
from ._stages import StageCost as StageCost
from ._stages import StageSolution as StageSolution
from ._stages import brute_force_stages as brute_force_stages
from ._stages import place_submeshes as place_submeshes
from ._stages import solve_stages as solve_stages
from ._stages import submesh_shapes as submesh_shapes

__all__ = [
    "EdgeCost",
    "Evaluation",
    "InfeasibleError",
    "IntraOpRequest",
    "IntraOpResult",
    "MoveCosts",
    "SharedCost",
    "SolverStats",
    "StageCost",
    "StageSolution",
    "brute_force_stages",
    "place_submeshes",
    "solve_stages",
    "submesh_shapes",
    "best_assignment",
    "evaluate",
    "greedy_assignment",
    "greedy_assignments",
    "min_peak_memory",
    "solve_intra_op",
    "solved_in_neighbourhoods",
]
