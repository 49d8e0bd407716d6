"""Plan a workload, run it, check it against jax.jit and print the presets' modelled costs."""
import jax
import numpy as np

import autoshard


def plan_run_and_check(workload, mesh) -> None:
    """Print the ILP plan, run it, compare every output with ``jax.jit``; exit non-zero if they differ."""
    step = autoshard.parallelize(workload.fn, mesh=mesh, batch_argnums=workload.batch_argnums)
    plan = step.plan(*workload.args)
    print(plan.summary())

    out = step(*workload.args)
    ref = jax.jit(workload.fn)(*workload.args)
    # atol 3e-4 (a tenth of Adam's step, lr 1e-3, at most): Adam divides by sqrt(v), which
    # magnifies float32 summation-order noise of sharded reductions in near-zero gradients
    # to ~1e-4 on a few parameters (gpt.py: 1.04e-4 on one element of 16k).
    same = all(np.allclose(a, b, rtol=1e-4, atol=3e-4)
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
    print(f"\nloss {float(out[-1]):.6f} (jax.jit: {float(ref[-1]):.6f}); "
          f"all outputs allclose: {same}")
    for preset in (autoshard.DataParallel(), autoshard.ZeRO3(), autoshard.Megatron()):
        cost = autoshard.parallelize(workload.fn, mesh=mesh, method=preset,
                                     batch_argnums=workload.batch_argnums
                                     ).plan(*workload.args).cost
        print(f"{type(preset).__name__:>13}: modelled {cost.total_s * 1e3:.3f} ms per step "
              f"(ILP plan: {plan.cost.total_s * 1e3:.3f} ms)")
    if not same:
        raise SystemExit("results differ from jax.jit")
