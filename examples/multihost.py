"""Run an autoshard plan on several processes with ``jax.distributed`` (multi-controller).

Two processes on this machine, 4 virtual CPU devices each, gloo collectives on 127.0.0.1
(one command starts both and prints process 0's output)::

    python examples/multihost.py --launch 2                 # MLP train step, mesh 2x4
    python examples/multihost.py --launch 2 --model gpt --local-batch

Or start each process yourself (e.g. in two terminals), same port everywhere::

    python examples/multihost.py --process-id 0 --num-processes 2 --coordinator 127.0.0.1:12345
    python examples/multihost.py --process-id 1 --num-processes 2 --coordinator 127.0.0.1:12345

On a GPU cluster, run one process per host (or per GPU) with ``--cluster-env``: then
``jax.distributed.initialize()`` reads the coordinator, process count and id from the
scheduler (SLURM, Open MPI, Kubernetes/JobSet, Cloud TPU), e.g.
``srun --ntasks-per-node=1 python examples/multihost.py --cluster-env --mesh 2x8``.

Every process runs the same code: it builds the same arguments (same seed), plans
(plans are deterministic, and the processes check they agree before running), and
calls the step; outputs are global ``jax.Array`` s. ``--local-batch`` instead gives each
process only its slice of the batch and assembles it with ``autoshard.global_batch``.
``--out DIR`` writes ``DIR/process<i>.npz`` (plan digest, plan JSON, every output in
full) for checking.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def add_process_arguments(p: argparse.ArgumentParser) -> None:
    """``--launch``, ``--process-id``, ``--num-processes``, ``--coordinator`` (what
    :func:`launch` passes each process), shared with ``examples/pipeline.py``."""
    p.add_argument("--launch", type=int, metavar="N",
                   help="start N processes on this machine (CPU, gloo on 127.0.0.1) and wait")
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordination service")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_process_arguments(p)
    p.add_argument("--cluster-env", action="store_true",
                   help="GPU/TPU cluster: let jax.distributed.initialize() detect everything")
    p.add_argument("--local-devices", type=int, default=4,
                   help="virtual CPU devices per process (CPU runs only)")
    p.add_argument("--mesh", default="2x4", help="mesh shape over all processes' devices")
    p.add_argument("--model", default="mlp", help="comma-separated: mlp, gpt")
    p.add_argument("--method", default="ilp", choices=("ilp", "dp", "zero3", "megatron"))
    p.add_argument("--time-limit", type=float, default=10.0, help="ILP time limit (s)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--local-batch", action="store_true",
                   help="each process holds only its slice of the batch (autoshard.global_batch)")
    p.add_argument("--calibrate-kernels", type=float, default=None, metavar="SECONDS",
                   help="then time each model's convolutions "
                        "(autoshard.calibrate_kernels, collective too)")
    p.add_argument("--calibrate", type=float, default=None, metavar="SECONDS",
                   help="plan with autoshard.calibrate(mesh, budget_s=SECONDS) (collective: "
                        "every process gets process 0's figures)")
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/process<i>.npz")
    p.add_argument("--timeout", type=float, default=300.0, help="--launch: seconds to wait")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, argv, script: str = os.path.abspath(__file__)) -> int:
    """Start ``args.launch`` copies of ``script`` (this one by default) with process ids
    0..N−1; wait for all."""
    port = free_port()
    rest = [a for a in argv if not a.startswith("--launch=")]
    if "--launch" in rest:
        i = rest.index("--launch")
        rest = rest[:i] + rest[i + 2:]
    procs = []
    for i in range(args.launch):
        cmd = [sys.executable, script, *rest, "--process-id", str(i),
               "--num-processes", str(args.launch), "--coordinator", f"127.0.0.1:{port}"]
        procs.append(subprocess.Popen(cmd, stdout=None if i == 0 else subprocess.DEVNULL))
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=args.timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            print(f"multihost: processes did not finish within {args.timeout:g} s; killed")
            return 1
    return max(codes, key=abs)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.launch:
        return launch(args, argv)
    if not args.cluster_env:  # CPU: virtual devices, set before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.local_devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)
    import jax
    if args.cluster_env:
        jax.distributed.initialize()  # coordinator, process count and id from the scheduler
    else:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    return run(args)


def workload(name: str):
    from examples.models import gpt, mlp
    if name == "mlp":
        return mlp(num_layers=3, batch=16, hidden=32)
    if name == "gpt":
        return gpt(num_layers=1, batch=8, seq=8, d_model=32, heads=4, vocab=64)
    raise SystemExit(f"unknown --model {name!r}: use mlp or gpt")


def method(name: str, time_limit: float):
    import autoshard
    if name == "ilp":
        return autoshard.ShardParallel(time_limit_s=time_limit)
    return {"dp": autoshard.DataParallel, "zero3": autoshard.ZeRO3,
            "megatron": autoshard.Megatron}[name]()


def run(args) -> int:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import autoshard
    from autoshard.cli.arguments import default_axis_names, parse_mesh

    me, n = jax.process_index(), jax.process_count()
    shape = parse_mesh(args.mesh)
    mesh = autoshard.make_mesh(shape, default_axis_names(len(shape)))
    say = print if me == 0 else (lambda *a, **k: None)
    say(f"{n} processes × {jax.local_device_count()} {jax.default_backend()} devices; "
        f"mesh {dict(zip(mesh.axis_names, shape))}")
    record, cluster = {}, None
    if args.calibrate:
        cluster = autoshard.calibrate(mesh, budget_s=args.calibrate)
        say(f"calibrated: {cluster.flops_rate('float32') / 1e9:.1f} GFLOP/s per device, "
            f"all-reduce over {mesh.axis_names[0]}: "
            f"{dict(cluster.collective_links)['all-reduce'][0]}")
        record["cluster"] = np.array(cluster.to_json())
    for name in args.model.split(","):
        w = workload(name)
        priced = cluster
        if args.calibrate_kernels:
            priced = autoshard.calibrate_kernels(w.fn, w.args, mesh=mesh, cluster=cluster,
                                                 budget_s=args.calibrate_kernels)
            say(f"{name}: {len(priced.kernel_seconds)} kernels timed")
            record["cluster"] = np.array(priced.to_json())
        step = autoshard.parallelize(w.fn, mesh=mesh, method=method(args.method, args.time_limit),
                                     cluster=priced, batch_argnums=w.batch_argnums)
        params, opt_state, batch = w.args
        if args.local_batch:  # keep only this process's rows, then assemble the global batch
            rows = jax.tree.leaves(batch)[0].shape[0] // n
            mine = jax.tree.map(lambda x: np.asarray(x)[me * rows:(me + 1) * rows], batch)
            batch = autoshard.global_batch(mine, mesh)
        plan = step.plan(params, opt_state, batch)
        say(plan.summary(max_rows=8))
        for i in range(args.steps):
            params, opt_state, loss = step(params, opt_state, batch)
            say(f"{name} step {i}: loss {float(loss.addressable_data(0)):.6f}")
        outputs = (params, opt_state, loss)
        full = multihost_utils.process_allgather(outputs, tiled=True)  # numpy, whole arrays
        say(f"{name}: plan digest {autoshard.plan_digest(plan)[:16]}, outputs are "
            f"{type(loss).__name__} on {len(loss.sharding.device_set)} devices")
        record[f"{name}/digest"] = np.array(autoshard.plan_digest(plan))
        record[f"{name}/plan"] = np.array(plan.to_json())
        for k, leaf in enumerate(jax.tree.leaves(full)):
            record[f"{name}/out{k}"] = np.asarray(leaf)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, f"process{me}.npz"), **record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
