"""The commands: ``plan``, ``show``, ``compare``, ``calibrate``."""
from __future__ import annotations

import math
import warnings

from .arguments import (
    CliError,
    check_writable,
    load_cluster,
    load_plan,
    one_line,
    parse_axis_names,
    parse_budget,
    parse_mesh,
    write_text,
)
from .tables import compare_text, cost_table, show_text
from .target import load_target

#: the command line's method names
METHOD_NAMES = {"ilp": "ShardParallel", "dp": "DataParallel", "zero3": "ZeRO3",
                "megatron": "Megatron", "annotated": "Annotated"}
_PRESET_ROWS = ("DataParallel", "ZeRO3", "Megatron")


def _method(name: str, time_limit):
    import autoshard
    if name == "ilp":
        return autoshard.ShardParallel() if time_limit is None else \
            autoshard.ShardParallel(time_limit_s=time_limit)
    return getattr(autoshard, METHOD_NAMES[name])()


def _plan_one(target, mesh, method, cluster, budget):
    import autoshard
    fn = autoshard.parallelize(target.fn, mesh=mesh, method=method, cluster=cluster,
                               memory_budget=budget, batch_argnums=target.batch_argnums)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan's warnings are part of its summary
        try:
            return fn.plan(*target.args)
        except SystemExit as exit_:  # the user's function ended the process: say so
            raise RuntimeError(f"the function called sys.exit({exit_.code!r}) while being "
                               f"traced") from None


def cmd_plan(args) -> int:
    shape = parse_mesh(args.mesh)
    names = parse_axis_names(args.axis_names, len(shape))
    budget = parse_budget(args.memory_budget)
    cluster = load_cluster(args.cluster)
    if args.time_limit is not None and (args.method != "ilp" or not args.time_limit > 0):
        raise CliError("--time-limit takes a positive number of seconds and applies to "
                       "--method ilp only")
    if args.microbatches is None and (args.stages is not None or args.layers is not None
                                      or args.schedule != "1f1b"):
        raise CliError("--stages, --layers and --schedule plan a pipeline: give "
                       "--microbatches too")
    for flag, value in (("--microbatches", args.microbatches), ("--stages", args.stages),
                        ("--layers", args.layers)):
        if value is not None and value < 1:
            raise CliError(f"{flag} takes a positive integer, got {value}")
    if args.json:  # before planning, which can take minutes
        check_writable(args.json, "plan file")

    import jax

    import autoshard

    target = load_target(args.target)
    needed = math.prod(shape)
    if jax.device_count() >= needed:
        mesh = autoshard.make_mesh(shape, names)
        where = f"{needed} of {jax.device_count()} {jax.default_backend()} devices"
    else:
        mesh = autoshard.abstract_mesh(shape, names)
        where = f"abstract mesh ({jax.device_count()} devices present, {needed} needed)"
        if cluster is None:
            cluster = autoshard.cluster_preset("host-cpu")
    method = _method(args.method, args.time_limit)
    if args.microbatches is not None:
        method = autoshard.PipeshardParallel(
            num_microbatches=args.microbatches, num_stages=args.stages,
            schedule=args.schedule, num_layers=args.layers, stage_method=method)
    try:
        plan = _plan_one(target, mesh, method, cluster, budget)
    except autoshard.InfeasiblePlanError as err:
        raise CliError(f"no plan for {args.target} fits: {one_line(err)}") from err
    except Exception as err:
        raise CliError(f"planning {args.target} failed: {type(err).__name__}: "
                       f"{one_line(err)} (rerun with --debug for the traceback)") from err
    if args.json:  # first, so that the file exists whatever happens to the output
        write_text(args.json, plan.to_json(), "plan file")
    print(f"planned {args.target} on {where}")
    print(show_text(plan))
    if not args.no_compare:
        this = METHOD_NAMES[args.method]
        label = this if args.microbatches is None else \
            f"Pipeshard B={args.microbatches} ({len(plan.stages)} stages, {this} per stage)"
        rows = [(f"{label} (this plan)", plan.cost)]
        for name in _PRESET_ROWS:
            if name == this and args.microbatches is None:
                continue
            try:
                preset = _plan_one(target, mesh, getattr(autoshard, name)(), cluster, budget)
                rows.append((name, preset.cost))
            except Exception as err:  # a preset that cannot plan is a row, not a failure
                if args.debug:
                    raise
                rows.append((name, f"failed: {type(err).__name__}: {one_line(err)}"))
        print("modelled cost per step, this plan against the presets:")
        print(cost_table(rows, reference=plan.cost))
    if args.json:
        print(f"plan written to {args.json}")
    return 0


def cmd_show(args) -> int:
    print(show_text(load_plan(args.plan)))
    return 0


def cmd_compare(args) -> int:
    a, b = load_plan(args.plan_a), load_plan(args.plan_b)
    print(compare_text(a, b, args.plan_a, args.plan_b))
    return 0


def cmd_calibrate(args) -> int:
    shape = parse_mesh(args.mesh)
    names = parse_axis_names(args.axis_names, len(shape))
    if not args.budget > 0:
        raise CliError(f"bad --budget {args.budget!r}: give a positive number of seconds")
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if "float32" not in dtypes:
        raise CliError(f"bad --dtypes {args.dtypes!r}: must include float32")
    if args.kernels is not None and not args.kernel_budget > 0:
        raise CliError(f"bad --kernel-budget {args.kernel_budget!r}: give a positive number "
                       f"of seconds")
    check_writable(args.out, "cluster file")   # before measuring, which takes a while
    import jax

    import autoshard
    target = None if args.kernels is None else load_target(args.kernels)
    needed = math.prod(shape)
    if jax.device_count() < needed:
        raise CliError(f"--mesh {args.mesh} needs {needed} devices but {jax.device_count()} "
                       f"{jax.default_backend()} devices are present (on the CPU set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={needed})")
    mesh = autoshard.make_mesh(shape, names)
    try:
        cluster = autoshard.calibrate(mesh, budget_s=args.budget, dtypes=dtypes,
                                      name=args.name, verbose=True)
    except (TypeError, ValueError) as err:
        raise CliError(f"calibration failed: {one_line(err)}") from err
    if target is not None:
        cluster = autoshard.calibrate_kernels(target.fn, target.args, mesh=mesh, cluster=cluster,
                                              budget_s=args.kernel_budget, verbose=True)
        print(f"{len(cluster.kernel_seconds)} kernels of {args.kernels} timed")
    write_text(args.out, cluster.to_json(), "cluster file")
    print(f"cluster {cluster.name!r} written to {args.out} "
          f"(use: autoshard plan ... --cluster {args.out})")
    return 0
