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
import os
import sys
from typing import Sequence

from autoshard.cost_model import SCHEDULES

from .arguments import CliError, one_line
from .commands import METHOD_NAMES, cmd_calibrate, cmd_compare, cmd_plan, cmd_show
from .target import TargetError

EXIT_ERROR = 2

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
  autoshard calibrate --mesh 2x4 --out cluster.json --kernels examples.models:wide_resnet_block

Measures, on the devices present, matmul FLOP/s per dtype (all devices busy at once),
memory bandwidth, and per mesh axis the latency and bandwidth of all-reduce,
all-gather, reduce-scatter and all-to-all (least-squares α–β fit). With --kernels, also
times the target's convolutions at every per-device shape a split over the
mesh gives (autoshard.calibrate_kernels): plans of that target then price them as
measured. On the CPU, get virtual devices with
XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one ``autoshard: error:`` line, status 2."""

    def error(self, message):  # noqa: D401 - argparse API
        sys.stderr.write(f"autoshard: error: {one_line(message)} "
                         f"(see '{self.prog} --help')\n")
        raise SystemExit(EXIT_ERROR)


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
    p.add_argument("--method", choices=tuple(METHOD_NAMES), default="ilp",
                   help="ilp: the ILP search (default); dp: DataParallel; zero3: ZeRO3; "
                        "megatron: Megatron; annotated: the model's own flax sharding "
                        "annotations (Annotated, mesh-axis names or flax's current rules)")
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
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b",
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
    k.add_argument("--kernels", metavar="TARGET",
                   help="also time this target's convolutions (as for plan: "
                        "module:function or file.py:function)")
    k.add_argument("--kernel-budget", type=float, default=30.0, metavar="SECONDS",
                   help="time for --kernels, roughly (default 30)")
    k.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    try:
        return _run(argv)
    except BrokenPipeError:  # output piped into `head` and the like
        _silence_stdout()
        return 0
    except OSError as err:  # stdout on a full device, a terminal gone, ...
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        _silence_stdout()
        sys.stderr.write(f"autoshard: error: cannot write the output: "
                         f"{err.strerror or one_line(err)}\n")
        return EXIT_ERROR


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        sys.stdout.flush()
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        status = args.func(args)
        sys.stdout.flush()  # a full device fails here, not at exit with a traceback
        return status
    except (CliError, TargetError) as err:
        if args.debug:
            raise
        sys.stderr.write(f"autoshard: error: {one_line(err)}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        sys.stderr.write("autoshard: error: interrupted\n")
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is still
    buffered cannot fail again (and print a traceback) at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (a test's capture): nothing to do
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
