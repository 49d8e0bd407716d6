"""Modelled against compiled bytes of a function on one device, for the pricing tests."""
import jax

from autoshard.cost_model import MeshCostModel, cluster_preset
from autoshard.intra.graph import build_graph
from autoshard.ir.trace import trace


def replicated_bytes(fn, args, cluster: str = "host-cpu") -> tuple[float, float]:
    """(modelled, compiled) bytes accessed of ``fn`` on one device: the model's for
    ``cluster`` (every equation replicated), and ``cost_analysis``'s of ``jax.jit(fn)``."""
    graph = build_graph(trace(fn, args), MeshCostModel(cluster_preset(cluster), (1,)))
    modelled = sum(node.strategies[0].bytes_accessed for node in graph.nodes)
    return modelled, jax.jit(fn).lower(*args).compile().cost_analysis()["bytes accessed"]
