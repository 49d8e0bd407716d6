"""Ctrl-C stops planning within a second or two, wherever it lands (the LP relaxation,
the CP-SAT search), raises KeyboardInterrupt, and the command line then exits 130 with
one line, leaving its output files as they were.

Each case runs in a subprocess that is sent SIGINT once its solver has started (the
solvers' ``solve`` methods are wrapped to say so on stdout).
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from autoshard.ilp._interrupt import run_interruptibly

REPO = Path(__file__).resolve().parents[1]

#: the longest a process may take to stop after Ctrl-C
STOP_WITHIN_S = 3.0

# Solvers say when they start; a random 100-node problem keeps HiGHS busy for seconds
# and CP-SAT for minutes (no structure for the LP to be integral on).
_MARKERS = '''
import sys
import highspy
from ortools.sat.python import cp_model

def _marked(real, name):
    def solve(self, *args, **kwargs):
        print(name, "started", flush=True)
        return real(self, *args, **kwargs)
    return solve

cp_model.CpSolver.solve = _marked(cp_model.CpSolver.solve, "CP-SAT")
highspy.Highs.run = _marked(highspy.Highs.run, "LP")
'''

_SOLVE = _MARKERS + '''
import numpy as np
import autoshard.ilp._relaxation as relaxation
from autoshard.ilp import EdgeCost, IntraOpRequest, solve_intra_op

if sys.argv[1] == "CP-SAT":
    relaxation.SECONDS_PER_ROW_VARIABLE = 1e9   # skip the LP: straight to the search
rng = np.random.default_rng(0)
n, s = 100, 8
edges = [EdgeCost(int(u), v, rng.uniform(0, 1, (s, s)))
         for v in range(1, n) for u in rng.choice(v, min(v, 3), replace=False)]
request = IntraOpRequest(node_costs=tuple(rng.uniform(0, 1, s) for _ in range(n)),
                         edges=tuple(edges), time_limit_s=1000)
result = solve_intra_op(request)
print("finished", result.status, flush=True)
'''


def _wait_for(proc: subprocess.Popen, marker: str, timeout_s: float = 240) -> None:
    """Read ``proc``'s stdout until a line holds ``marker`` (fail after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if marker in line:
                return
            if not line and proc.poll() is not None:
                break
    proc.kill()
    pytest.fail(f"{marker!r} never showed (exit {proc.poll()}): {proc.stderr.read()[-3000:]}")


def _interrupt(proc: subprocess.Popen, marker: str, settle_s: float = 1.0):
    """SIGINT ``proc`` ``settle_s`` after ``marker``; (seconds it took to exit, stdout, stderr)."""
    try:
        _wait_for(proc, marker)
        time.sleep(settle_s)
        os.kill(proc.pid, signal.SIGINT)
        start = time.monotonic()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the process ignored Ctrl-C for a minute")
        return time.monotonic() - start, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("solver", ["LP", "CP-SAT"])
def test_ctrl_c_stops_the_solver(solver):
    proc = subprocess.Popen([sys.executable, "-c", _SOLVE, solver], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    took, out, err = _interrupt(proc, f"{solver} started")
    assert "finished" not in out, f"the {solver} solve ran on and returned: {out}"
    assert "KeyboardInterrupt" in err, err[-3000:]
    assert took < STOP_WITHIN_S, f"took {took:.1f} s to stop"


_TARGET = '''
"""A GPT train step whose plan is searched by CP-SAT for minutes (its LP skipped)."""
import autoshard.ilp._relaxation as relaxation
from examples.models import gpt

relaxation.SECONDS_PER_ROW_VARIABLE = 1e9


def step():
    return gpt(abstract=True)
'''


def test_ctrl_c_in_cli_plan_exits_130_and_leaves_the_json_file(tmp_path):
    target = tmp_path / "slow_target.py"
    target.write_text(textwrap.dedent(_TARGET))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text("the plan of an earlier run\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", _MARKERS + "from autoshard.cli.main import main\n"
         "sys.exit(main())", "plan", f"{target}:step", "--mesh", "2x4", "--time-limit", "600",
         "--no-compare", "--json", str(plan_file)],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    took, out, err = _interrupt(proc, "CP-SAT started")
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert err.strip().splitlines() == ["autoshard: error: interrupted"], err[-3000:]
    assert took < STOP_WITHIN_S, f"took {took:.1f} s to stop"
    assert plan_file.read_text() == "the plan of an earlier run\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == \
        ["plan.json", "slow_target.py"]   # no temporary file left behind


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_an_error_in_the_work_done_meanwhile_stops_the_solver(error):
    # The caller's work done while the solver runs (the starting plan) fails, or Ctrl-C
    # lands in it: the solver is told to stop and the error is raised, not the solve's
    # result returned.
    stopped = threading.Event()

    def solve():
        stopped.wait(30)
        return "the solver ran on"

    def meanwhile():
        raise error("while making the starting plan")

    start = time.monotonic()
    with pytest.raises(error, match="while making the starting plan"):
        run_interruptibly(solve, stopped.set, meanwhile=meanwhile)
    assert stopped.is_set() and time.monotonic() - start < STOP_WITHIN_S
