"""autoshard.cost_model: cluster descriptions and the costs plans are priced with.

Imports numpy only. Times are seconds, sizes bytes, bandwidths bytes/s.
"""

from ._cluster import COLLECTIVES as COLLECTIVES
from ._cluster import Cluster as Cluster
from ._cluster import Link as Link
from ._cluster import kernel_key as kernel_key
from ._files import write_text_atomically as write_text_atomically
from ._mesh_cost import CollectiveStep as CollectiveStep
from ._mesh_cost import MeshCostModel as MeshCostModel
from ._mesh_cost import Spec as Spec
from ._presets import CLUSTER_PRESETS as CLUSTER_PRESETS
from ._presets import cluster_preset as cluster_preset
from ._presets import default_cluster_for_platform as default_cluster_for_platform
from ._schedules import SCHEDULES as SCHEDULES
from ._schedules import in_flight as in_flight
from ._units import format_bytes as format_bytes
from ._units import format_seconds as format_seconds
from ._units import parse_bytes as parse_bytes

__all__ = [
    "COLLECTIVES",
    "CLUSTER_PRESETS",
    "Cluster",
    "CollectiveStep",
    "Link",
    "MeshCostModel",
    "SCHEDULES",
    "Spec",
    "cluster_preset",
    "default_cluster_for_platform",
    "format_bytes",
    "format_seconds",
    "in_flight",
    "kernel_key",
    "parse_bytes",
    "write_text_atomically",
]
