"""Ctrl-C during a solve: the solvers run native code that Python's signal handling
cannot interrupt (and CP-SAT, left to itself, catches SIGINT and returns its best
solution as if its time had run out). A solve therefore runs in a worker thread while
the main thread waits on an event, where ``KeyboardInterrupt`` does arrive; the solver
is then told to stop and the interrupt is raised again, so planning stops within a
second or two and nothing downstream sees a cut-short result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: how often the waiting thread wakes (seconds); signals arrive between waits anyway
_POLL_S = 0.1
#: how long to wait for a solver told to stop before giving up on it (seconds)
STOP_WAIT_S = 1.0


def run_interruptibly(solve: Callable[[], T], stop: Callable[[], None],
                      on_wait: Callable[[], None] | None = None,
                      meanwhile: Callable[[], object] | None = None) -> T:
    """``solve()``, stoppable by Ctrl-C: on ``KeyboardInterrupt`` call ``stop()`` (the
    solver's "stop searching"), wait up to :data:`STOP_WAIT_S` for the solve to return,
    and raise the ``KeyboardInterrupt``. A solver that does not stop at once finishes
    in its daemon thread; its result is dropped.
    ``on_wait()`` runs every :data:`_POLL_S` seconds while the solve runs (progress).
    ``meanwhile()`` runs once in the calling thread while the solver runs in its own
    (native solvers release the GIL: Python work overlaps the solve); an exception it
    raises stops the solver and is raised.

    Outside the main thread (where no ``KeyboardInterrupt`` arrives) this is ``solve()``,
    then ``meanwhile()``.
    """
    if threading.current_thread() is not threading.main_thread():
        value = solve()
        if meanwhile is not None:
            meanwhile()
        return value
    outcome: dict = {}
    done = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = solve()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = err
        finally:
            done.set()

    threading.Thread(target=work, name="autoshard-solver", daemon=True).start()
    try:
        if meanwhile is not None:
            try:
                meanwhile()
            except Exception:
                stop()
                done.wait(STOP_WAIT_S)
                raise
        while not done.wait(_POLL_S):
            if on_wait is not None:
                on_wait()
    except KeyboardInterrupt:
        stop()
        done.wait(STOP_WAIT_S)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
