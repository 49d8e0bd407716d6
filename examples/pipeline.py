"""Pipeline an 8-layer MLP over 4 stages on 8 virtual devices; check it against jax.jit.

Run from the repository root: ``python examples/pipeline.py``. ``PipeshardParallel`` splits
the step at its gradient (``jax.value_and_grad`` or ``jax.grad`` however imported, or
autoshard's, as ``examples/models.py`` writes it) into per-micro-batch stages and one update.
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import autoshard  # noqa: E402
from examples.models import mlp  # noqa: E402

if __name__ == "__main__":
    w = mlp(num_layers=8, batch=64, hidden=64)
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    method = autoshard.PipeshardParallel(num_microbatches=8, num_stages=4, schedule="1f1b",
                                         stage_method=autoshard.ShardParallel(time_limit_s=2))
    step = autoshard.parallelize(w.fn, mesh=mesh, method=method)
    plan = step.plan(*w.args)
    print(plan.summary())
    out, ref = step(*w.args), jax.jit(w.fn)(*w.args)
    same = all(np.allclose(a, b, rtol=1e-4, atol=1e-5)
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
    print(f"\nloss {float(out[-1]):.6f} (jax.jit: {float(ref[-1]):.6f}); all outputs allclose: "
          f"{same}")
    if not same:
        raise SystemExit("results differ from jax.jit")
