"""Pipeline a model over stages on sub-meshes; check it against jax.jit.

Run from the repository root::

    python examples/pipeline.py                      # 8-layer MLP, 4 stages, 8 virtual devices
    python examples/pipeline.py --launch 2           # GPT, 2 processes x 4 devices (gloo)
    python examples/pipeline.py --launch 2 --stages 4 --schedule gpipe

``PipeshardParallel`` splits the step at its gradient (``jax.value_and_grad`` or
``jax.grad`` however imported, or autoshard's) into per-micro-batch stages and one update.
With ``--launch N`` (or ``--process-id``/``--num-processes``/``--coordinator`` per process,
as ``examples/multihost.py`` takes them) the stages sit on the devices of different
``jax.distributed`` processes: every process runs the same driver, runs the programs of its
own stages, and activations and cotangents cross between processes (jax's cross-host
transfers on GPU/TPU; through the hosts on the CPU).
Each process compares the whole outputs (``autoshard.gather_to_host``) with ``jax.jit`` on
one of its devices; a difference exits with status 1.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    from examples.multihost import add_process_arguments
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_process_arguments(p)
    p.add_argument("--stages", type=int, default=2, help="pipeline stages (multi-process)")
    p.add_argument("--schedule", default="1f1b", choices=("1f1b", "gpipe"))
    p.add_argument("--timeout", type=float, default=300.0, help="--launch: seconds to wait")
    return p.parse_args(argv)


def gpt_step_and_args(batch=16, seq=8, d_model=32, vocab=64, blocks=2):
    """A GPT train step written the usual way: the loss closes over the batch, optax adamw,
    ``step(params, opt_state, x, y)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    keys = iter(jax.random.split(jax.random.key(0), 4 * blocks + 4))
    normal = lambda shape: jax.random.normal(next(keys), shape) / shape[0] ** 0.5  # noqa: E731
    params = {"embed": normal((vocab, d_model)), "head": normal((d_model, vocab)),
              "blocks": [{"qkv": normal((d_model, 3 * d_model)), "out": normal((d_model, d_model)),
                          "up": normal((d_model, 4 * d_model)),
                          "down": normal((4 * d_model, d_model))} for _ in range(blocks)]}
    tokens = jax.random.randint(next(keys), (batch, seq + 1), 0, vocab)
    causal = np.tril(np.ones((seq, seq), bool))
    opt = optax.adamw(1e-2)

    def norm(h):
        h = h - h.mean(-1, keepdims=True)
        return h * jax.lax.rsqrt((h ** 2).mean(-1, keepdims=True) + 1e-5)

    def step(params, opt_state, x, y):
        def loss(ps):
            h = ps["embed"][x]
            for b in ps["blocks"]:
                q, k, v = jnp.split(norm(h) @ b["qkv"], 3, -1)
                scores = jnp.where(causal, q @ k.swapaxes(-1, -2) / d_model ** 0.5, -1e9)
                h = h + jax.nn.softmax(scores) @ v @ b["out"]
                h = h + jax.nn.gelu(norm(h) @ b["up"]) @ b["down"]
            logits = norm(h) @ ps["head"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    args = (params, opt.init(params), tokens[:, :-1], tokens[:, 1:])
    return step, jax.tree.map(np.asarray, args)


def single_process():
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    import jax
    import numpy as np

    import autoshard
    from examples.models import mlp

    w = mlp(num_layers=8, batch=64, hidden=64)
    mesh = autoshard.make_mesh((2, 4), ("data", "model"))
    method = autoshard.PipeshardParallel(num_microbatches=8, num_stages=4, schedule="1f1b",
                                         stage_method=autoshard.ShardParallel(time_limit_s=2))
    step = autoshard.parallelize(w.fn, mesh=mesh, method=method)
    print(step.plan(*w.args).summary())
    out, ref = step(*w.args), jax.jit(w.fn)(*w.args)
    same = all(np.allclose(a, b, rtol=1e-4, atol=1e-5)
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
    print(f"\nloss {float(out[-1]):.6f} (jax.jit: {float(ref[-1]):.6f}); all outputs allclose: "
          f"{same}")
    return 0 if same else 1


def multi_process(args) -> int:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=4")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
    import autoshard

    me = jax.process_index()
    say = print if me == 0 else (lambda *a, **k: None)
    step, host_args = gpt_step_and_args()
    mesh = autoshard.make_mesh((jax.device_count(),), ("data",))
    method = autoshard.PipeshardParallel(num_microbatches=4, num_stages=args.stages, num_layers=4,
                                         schedule=args.schedule,
                                         stage_method=autoshard.ShardParallel(time_limit_s=2))
    pipelined = autoshard.parallelize(step, mesh=mesh, method=method)
    start = time.perf_counter()
    plan = pipelined.plan(*host_args)
    say(f"{jax.process_count()} processes x {jax.local_device_count()} devices; planned in "
        f"{time.perf_counter() - start:.1f} s; stages:")
    for s, st in enumerate(plan.stages):
        owners = sorted({d.process_index for d in jax.devices() if d.id in st.device_ids})
        say(f"  stage {s}: layers {list(st.layers)} on devices {list(st.device_ids)} "
            f"(process {', '.join(map(str, owners))})")
    params, opt_state, x, y = host_args
    expected = (params, opt_state)
    reference = jax.jit(step)   # on one of this process's devices
    same = True
    for i in range(2):
        params, opt_state, loss = pipelined(params, opt_state, x, y)
        *expected, expected_loss = reference(*expected, x, y)
        got = autoshard.gather_to_host((params, opt_state, loss))
        want = jax.tree.map(np.asarray, (*expected, expected_loss))
        # atol 1e-4, 1% of adamw's learning rate: Adam divides each gradient by its own
        # magnitude, so where one is float32 summation noise (another partition sums in
        # another order) the noise moves the update by up to the learning rate
        ok = all(np.allclose(a, b, rtol=1e-4, atol=1e-4)
                 for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        same &= ok
        worst = "" if ok else " (largest difference {:.3g} at {})".format(*max(
            (float(np.max(np.abs(a - b))), jax.tree_util.keystr(path))
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                                    jax.tree.leaves(want))))
        say(f"step {i}: loss {float(got[2]):.6f} (jax.jit: {float(want[2]):.6f}); "
            f"all outputs allclose: {ok}{worst}")
    return 0 if same else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.launch:
        from examples.multihost import launch
        return launch(args, argv, script=os.path.abspath(__file__))
    if args.num_processes > 1:
        return multi_process(args)
    return single_process()


if __name__ == "__main__":
    sys.exit(main())
