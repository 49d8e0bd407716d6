"""The ``autoshard`` command line: plan a function, show a saved plan, compare two plans.

Built on :mod:`argparse` (standard library; no extra dependency)::

    autoshard plan examples.models:mlp --mesh 2x4 --json mlp.json
    autoshard show mlp.json
    autoshard compare a.json b.json
    autoshard calibrate --mesh 2x4 --out cluster.json

Also runnable as ``python -m autoshard``. Errors a user can cause print one line,
``autoshard: error: …``, on stderr and exit with status 2; ``--debug`` re-raises
them with the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import warnings
from typing import Sequence

EXIT_ERROR = 2

_METHOD_NAMES = {"ilp": "ShardParallel", "dp": "DataParallel", "zero3": "ZeRO3",
                 "megatron": "Megatron"}
_PRESET_ROWS = ("DataParallel", "ZeRO3", "Megatron")

_PLAN_EPILOG = """\
examples:
  autoshard plan examples.models:mlp --mesh 2x4 --json mlp.json
  autoshard plan my_model.py:make_step --mesh 8x8 --cluster h100-80gb --memory-budget 60GiB
  autoshard plan examples.models:gpt --mesh 4 --method megatron --no-compare
  autoshard plan examples.models:mlp --mesh 8 --microbatches 4 --stages 2 --method dp

TARGET is MODULE:FACTORY or FILE.py:FACTORY. The factory takes no arguments and
returns (fn, example_args) or an object with .fn and .args (and optionally
.batch_argnums), such as examples.models.Workload; example args may be
jax.ShapeDtypeStruct. Meshes larger than the devices present are planned on an
abstract mesh (planning needs no devices), priced with the host-cpu cluster
unless --cluster says otherwise.
"""
_SHOW_EPILOG = """\
example:
  autoshard plan examples.models:mlp --mesh 2x4 --json mlp.json
  autoshard show mlp.json
"""
_COMPARE_EPILOG = """\
example:
  autoshard plan examples.models:mlp --mesh 2x4 --json ilp.json
  autoshard plan examples.models:mlp --mesh 2x4 --method megatron --json megatron.json
  autoshard compare ilp.json megatron.json

Prints the inputs and outputs whose specs differ (path: A spec → B spec) and the
difference B − A of every modelled cost.
"""


_CALIBRATE_EPILOG = """\
examples:
  autoshard calibrate --mesh 2x4 --out cluster.json
  autoshard plan examples.models:mlp --mesh 2x4 --cluster cluster.json

Measures, on the devices present, matmul FLOP/s per dtype (all devices busy at once),
memory bandwidth, and per mesh axis the latency and bandwidth of all-reduce,
all-gather, reduce-scatter and all-to-all (least-squares α–β fit). On the CPU, get
virtual devices with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one ``autoshard: error:`` line, status 2."""

    def error(self, message):  # noqa: D401 - argparse API
        sys.stderr.write(f"autoshard: error: {_one_line(message)} "
                         f"(see '{self.prog} --help')\n")
        raise SystemExit(EXIT_ERROR)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------- argument parsing
def parse_mesh(text: str) -> tuple[int, ...]:
    """``"2x4"`` → ``(2, 4)``; ``CliError`` for anything but positive sizes joined by x."""
    if not re.fullmatch(r"\s*\d+(\s*[x×]\s*\d+)*\s*", text or ""):
        raise CliError(f"bad --mesh {text!r}: expected mesh axis sizes joined by 'x', "
                       f"e.g. 8, 2x4 or 2x2x2")
    shape = tuple(int(n) for n in re.split(r"[x×]", text.replace(" ", "")))
    if any(n < 1 for n in shape):
        raise CliError(f"bad --mesh {text!r}: every axis size must be at least 1")
    return shape


def default_axis_names(rank: int) -> tuple[str, ...]:
    if rank == 1:
        return ("data",)
    if rank == 2:
        return ("data", "model")
    return tuple(f"a{i}" for i in range(rank))


def parse_axis_names(text: str | None, rank: int) -> tuple[str, ...]:
    if text is None:
        return default_axis_names(rank)
    names = tuple(n.strip() for n in text.split(","))
    if len(names) != rank:
        raise CliError(f"bad --axis-names {text!r}: the mesh has {rank} axes, so give "
                       f"{rank} comma-separated names")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names):
        raise CliError(f"bad --axis-names {text!r}: names must be identifiers like data,model")
    if len(set(names)) != len(names):
        raise CliError(f"bad --axis-names {text!r}: names must be distinct")
    return names


def load_cluster(value: str | None):
    """A preset name or the path of a JSON file written by ``Cluster.to_json()``."""
    from autoshard.cost_model import CLUSTER_PRESETS, Cluster, cluster_preset
    if value is None:
        return None
    if value in CLUSTER_PRESETS:
        return cluster_preset(value)
    if not (value.endswith(".json") or os.path.sep in value or os.path.exists(value)):
        raise CliError(f"unknown cluster {value!r}: give a preset ({', '.join(CLUSTER_PRESETS)}) "
                       f"or the path of a JSON file written by Cluster.to_json()")
    text = _read(value, "cluster file")
    try:
        return Cluster.from_json(text)
    except ValueError as err:
        raise CliError(f"bad cluster file {value!r}: {_one_line(err)}") from err


def parse_budget(value: str | None):
    from autoshard.cost_model import parse_bytes
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as err:
        raise CliError(f"bad --memory-budget {value!r}: {_one_line(err)}") from err


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else _one_line(err)
        raise CliError(f"cannot read {what} {path!r}: {reason}") from err


def load_plan(path: str):
    from autoshard.plan.record import Plan
    text = _read(path, "plan file")
    try:
        return Plan.from_json(text)
    except ValueError as err:
        raise CliError(f"{path!r} is not a valid plan file: {_one_line(err)}") from err


# ---------------------------------------------------------------- formatting
def _fmt_s(seconds: float) -> str:
    from autoshard.plan.record import _fmt_s as fmt
    if seconds < 0:
        return "-" + fmt(-seconds)
    return fmt(seconds)


def _fmt_bytes(n) -> str:
    from autoshard.cost_model import format_bytes
    return format_bytes(n)


_COST_FIELDS = (("total", "total_s", _fmt_s), ("compute", "compute_s", _fmt_s),
                ("communication", "communication_s", _fmt_s),
                ("resharding", "resharding_s", _fmt_s),
                ("peak memory", "peak_memory_bytes", _fmt_bytes))


def cost_table(rows: Sequence[tuple[str, object]], reference=None) -> str:
    """rows: (label, PlanCost or an error string). ``reference``: cost the last column divides by."""
    header = ["method"] + [name for name, _, _ in _COST_FIELDS] + (["vs plan"] if reference else [])
    table = [header]
    for label, cost in rows:
        if isinstance(cost, str):
            table.append([label, cost])
            continue
        row = [label] + [fmt(getattr(cost, attr)) for _, attr, fmt in _COST_FIELDS]
        if reference is not None:
            ratio = cost.total_s / reference.total_s if reference.total_s > 0 else math.nan
            row.append(f"{ratio:.2f}×")
        table.append(row)
    full = [r for r in table if len(r) == len(header)]
    widths = [max(len(r[i]) for r in full) for i in range(len(header))]
    lines = []
    for r in table:
        if len(r) != len(header):
            lines.append(f"  {r[0]:<{widths[0]}}  {r[1]}")
            continue
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def show_text(plan) -> str:
    return plan.summary() + f"\nsignature fingerprint: {plan.fingerprint}"


def _spec_diff(title, a_paths, a_specs, b_paths, b_specs) -> list[str]:
    a, b = dict(zip(a_paths, a_specs)), dict(zip(b_paths, b_specs))
    order = list(a_paths) + [p for p in b_paths if p not in a]
    diffs = [(p, a.get(p), b.get(p)) for p in order if a.get(p) != b.get(p)]
    lines = [f"{title}: {len(diffs)} of {len(order)} differ" + (":" if diffs else "")]
    width = max((len(p) for p, _, _ in diffs), default=0)
    for p, sa, sb in diffs:
        lines.append(f"  {p + ':':<{width + 1}}  {'(absent)' if sa is None else sa} → "
                     f"{'(absent)' if sb is None else sb}")
    return lines


def compare_text(a, b, name_a: str = "A", name_b: str = "B") -> str:
    def head(tag, name, p):
        mesh = " × ".join(f"{n}={s}" for n, s in zip(p.axis_names, p.mesh_shape))
        return f"{tag}: {name} — method {p.method}, mesh {mesh}, cluster {p.cluster.name}"

    lines = [head("A", name_a, a), head("B", name_b, b)]
    if a.fingerprint != b.fingerprint:
        lines.append(f"note: the plans are for different input signatures "
                     f"(fingerprints {a.fingerprint} and {b.fingerprint})")
    lines += _spec_diff("inputs", a.in_paths, a.flat_in_specs, b.in_paths, b.flat_in_specs)
    lines += _spec_diff("outputs", a.out_paths, a.flat_out_specs, b.out_paths, b.flat_out_specs)
    lines.append("cost (B − A):")
    table = [("", "A", "B", "B − A", "B / A")]
    for name, attr, fmt in _COST_FIELDS:
        va, vb = getattr(a.cost, attr), getattr(b.cost, attr)
        delta = vb - va
        sign = "+" if delta > 0 else ""
        ratio = f"{vb / va:.2f}×" if va else ("—" if not vb else "∞")
        table.append((name, fmt(va), fmt(vb), sign + fmt(delta), ratio))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for r in table:
        lines.append("  " + "  ".join([r[0].ljust(widths[0])] +
                                      [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------- commands
def _method(name: str, time_limit):
    import autoshard
    if name == "ilp":
        return autoshard.ShardParallel() if time_limit is None else \
            autoshard.ShardParallel(time_limit_s=time_limit)
    return getattr(autoshard, _METHOD_NAMES[name])()


def _plan_one(target, mesh, method, cluster, budget):
    import autoshard
    fn = autoshard.parallelize(target.fn, mesh=mesh, method=method, cluster=cluster,
                               memory_budget=budget, batch_argnums=target.batch_argnums)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan's warnings are part of its summary
        return fn.plan(*target.args)


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

    import jax

    import autoshard

    from .target import load_target
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
        raise CliError(f"no plan for {args.target} fits: {_one_line(err)}") from err
    except Exception as err:
        raise CliError(f"planning {args.target} failed: {type(err).__name__}: "
                       f"{_one_line(err)} (rerun with --debug for the traceback)") from err
    if args.json:  # first, so that the file exists whatever happens to the output
        _write_text(args.json, plan.to_json(), "plan file")
    print(f"planned {args.target} on {where}")
    print(show_text(plan))
    if not args.no_compare:
        this = _METHOD_NAMES[args.method]
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
                rows.append((name, f"failed: {type(err).__name__}: {_one_line(err)}"))
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
    import jax

    import autoshard
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
        raise CliError(f"calibration failed: {_one_line(err)}") from err
    _write_text(args.out, cluster.to_json(), "cluster file")
    print(f"cluster {cluster.name!r} written to {args.out} "
          f"(use: autoshard plan ... --cluster {args.out})")
    return 0


def _write_text(path: str, text: str, what: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as err:
        raise CliError(f"cannot write {what} {path!r}: {err.strerror or _one_line(err)}") from err


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="log planning progress (phases, ILP size, solver result) to stderr")
    parser = _Parser(prog="autoshard",
                     description="Plan how a JAX function is parallelized over a device mesh, "
                                 "and inspect saved plans.",
                     epilog="run 'autoshard COMMAND --help' for each command's options",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from autoshard import __version__
    parser.add_argument("--version", action="version", version=f"autoshard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("plan", parents=[common], help="plan a function on a mesh",
                       description="Plan TARGET on a mesh and print the plan, its modelled "
                                   "cost and the presets' costs beside it.",
                       epilog=_PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="TARGET",
                   help="MODULE:FACTORY or FILE.py:FACTORY (see below)")
    p.add_argument("--mesh", required=True, metavar="SHAPE",
                   help="mesh shape, axis sizes joined by x: 8, 2x4, 2x2x2")
    p.add_argument("--axis-names", metavar="NAMES",
                   help="comma-separated axis names (default: data for 1-D, data,model for "
                        "2-D, a0,a1,... otherwise)")
    p.add_argument("--cluster", metavar="NAME|FILE",
                   help="cluster preset (host-cpu, a100-80gb, h100-80gb) or a JSON file "
                        "written by Cluster.to_json() (default: host-cpu on an abstract mesh, "
                        "else the mesh's devices)")
    p.add_argument("--method", choices=tuple(_METHOD_NAMES), default="ilp",
                   help="ilp: the ILP search (default); dp: DataParallel; zero3: ZeRO3; "
                        "megatron: Megatron")
    p.add_argument("--memory-budget", metavar="BYTES",
                   help="per-device memory budget, e.g. 16GiB or 500MB")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="ILP solver time limit (--method ilp only; default 60)")
    p.add_argument("--microbatches", type=int, metavar="B",
                   help="plan a pipeline (PipeshardParallel) with B micro-batches; --method "
                        "then shards each stage. The step must use autoshard.value_and_grad")
    p.add_argument("--stages", type=int, metavar="S",
                   help="pipeline: force S stages (default: the stage DP chooses)")
    p.add_argument("--layers", type=int, metavar="L",
                   help="pipeline: cluster the loss into L layers (default 8)")
    p.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b",
                   help="pipeline schedule (default 1f1b)")
    p.add_argument("--no-compare", action="store_true",
                   help="don't plan the presets for the cost comparison")
    p.add_argument("--json", metavar="PLAN.json", help="write the plan to this file")
    p.set_defaults(func=cmd_plan)

    s = sub.add_parser("show", parents=[common], help="print a saved plan",
                       description="Print the summary of a plan file written by "
                                   "'autoshard plan --json' or Plan.to_json().",
                       epilog=_SHOW_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("plan", metavar="PLAN.json")
    s.set_defaults(func=cmd_show)

    c = sub.add_parser("compare", parents=[common], help="compare two saved plans",
                       description="Show where two plan files differ: input/output specs and "
                                   "modelled costs.",
                       epilog=_COMPARE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("plan_a", metavar="A.json")
    c.add_argument("plan_b", metavar="B.json")
    c.set_defaults(func=cmd_compare)

    k = sub.add_parser("calibrate", parents=[common],
                       help="measure the devices present and write a cluster file",
                       description="Measure compute, memory and collective speeds on a mesh "
                                   "of the devices present and write a Cluster JSON file for "
                                   "--cluster.",
                       epilog=_CALIBRATE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--mesh", required=True, metavar="SHAPE",
                   help="mesh shape, axis sizes joined by x: 8, 2x4")
    k.add_argument("--axis-names", metavar="NAMES", help="comma-separated axis names")
    k.add_argument("--out", required=True, metavar="CLUSTER.json",
                   help="where to write the cluster")
    k.add_argument("--budget", type=float, default=20.0, metavar="SECONDS",
                   help="measurement time, roughly (default 20)")
    k.add_argument("--dtypes", default="float32,bfloat16",
                   help="matmul dtypes to measure, comma-separated (default float32,bfloat16)")
    k.add_argument("--name", help="the cluster's name (default calibrated-PLATFORM-MESH)")
    k.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    from .target import TargetError
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (CliError, TargetError) as err:
        if args.debug:
            raise
        sys.stderr.write(f"autoshard: error: {_one_line(err)}\n")
        return EXIT_ERROR
    except BrokenPipeError:  # output piped into `head` and the like
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        sys.stderr.write("autoshard: error: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
