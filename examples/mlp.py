"""Plan and run a 6-layer MLP train step (small batch, wide layers) on a (2, 4) mesh of 8
virtual devices; check it against jax.jit.

Run from the repository root: ``python examples/mlp.py``.
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import autoshard  # noqa: E402
from examples.compare import plan_run_and_check  # noqa: E402
from examples.models import mlp  # noqa: E402

if __name__ == "__main__":
    plan_run_and_check(mlp(num_layers=6, batch=16, hidden=512), autoshard.make_mesh((2, 4), ("data", "model")))
