"""Small workloads and their compiled hand-written baselines, shared by test_baselines.py and
test_yardstick.py: each baseline is compiled once per test session."""
import jax

import autoshard
from benchmarks import baselines
from examples import models

MESHES = {(8,): ("devices",), (2, 4): ("data", "model"),
          (2, 2, 2): ("data", "fsdp", "model")}

# Small sizes: every baseline compiles in about a second.
SMALL = {
    "mlp": lambda: models.mlp(num_layers=2, batch=16, hidden=64),
    "gpt": lambda: models.gpt(num_layers=1, batch=8, seq=8, d_model=32, heads=4, vocab=64),
    "moe": lambda: models.moe(batch=8, seq=8, d_model=16, experts=8, d_ff=32, capacity=2),
    "wide_resnet_block": lambda: models.wide_resnet_block(batch=8, image=8, channels=8, width=2),
    "embedding_model": lambda: models.embedding_model(batch=16, vocab=256, d_model=32),
}

_workloads: dict = {}
_references: dict = {}


def small_workload(name):
    if name not in _workloads:
        _workloads[name] = SMALL[name]()
        w = _workloads[name]
        _references[name] = jax.device_get(jax.jit(w.fn)(*w.args))   # one device
    return _workloads[name], _references[name]


def mesh_of(shape):
    return autoshard.make_mesh(shape, MESHES[shape])


_compiled: dict = {}


def compiled_baseline(name, shape, strategy):
    """``(compiled, in_shardings)`` of a small workload's baseline, compiled once per session."""
    key = (name, shape, strategy)
    if key not in _compiled:
        w, _ = small_workload(name)
        fn, in_shardings = baselines.baseline_jit(w, name, mesh_of(shape), strategy)
        _compiled[key] = (fn.lower(*w.args).compile(), in_shardings)
    return _compiled[key]
