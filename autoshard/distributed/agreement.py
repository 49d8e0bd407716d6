"""Multi-process runs (``jax.distributed``): every process must hold the same plan.

Each process traces and plans on its own; planning is deterministic (no dict/set-order,
hash-seed, clock or thread dependence; CP-SAT runs one worker with a fixed seed and a
deterministic time limit), so consistent processes get byte-identical plans. Before a
plan first runs, the processes exchange a digest of it through the coordination
service's key-value store and raise :class:`PlanMismatchError` when they differ,
instead of deadlocking later in mismatched collectives. A process that does not post
its digest within the timeout (``AUTOSHARD_AGREEMENT_TIMEOUT_S``, default 60 s: it
died, hangs, or plans far slower than the others) makes the others raise
:class:`AgreementTimeoutError` naming it; nothing has run by then. jax's coordination
service then ends the surviving processes too once its heartbeat timeout notices a
dead peer (100 s by default): a run cannot continue without one of its processes.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time

import jax
import numpy as np

from autoshard.errors import AgreementTimeoutError, PlanMismatchError
from autoshard.ir.jax_compat import distributed_client
from autoshard.plan.record import Plan

_DIGEST_BYTES = 32
_LABEL_BYTES = 224
# Fields that legitimately differ between processes: wall-clock timings, and source
# locations (file paths differ when hosts keep the code in different places).
_SOLVER_TIMINGS = ("solve_time_s", "planning_time_s")
#: seconds to wait for the other processes' digests when AUTOSHARD_AGREEMENT_TIMEOUT_S is unset
DEFAULT_TIMEOUT_S = 60.0
# agreement checks made by this process: the n-th check of every process meets the others'
_ROUNDS = itertools.count()


def plan_digest(plan: Plan) -> str:
    """sha256 (hex) of what must agree across processes: the plan's content without
    wall-clock timings or source locations. The program body enters through
    ``plan.fingerprint``, which hashes every equation."""
    from autoshard.plan.serialize import plan_to_dict
    data = plan_to_dict(plan)
    if data["solver"] is not None:
        data["solver"] = {k: v for k, v in data["solver"].items() if k not in _SOLVER_TIMINGS}
    data["top_ops"] = [{k: v for k, v in op.items() if k != "source"} for op in data["top_ops"]]
    data["warnings"] = len(data["warnings"])
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def agreement_timeout_s() -> float:
    """Seconds a process waits for the others' digests (``AUTOSHARD_AGREEMENT_TIMEOUT_S``,
    default :data:`DEFAULT_TIMEOUT_S`). Keep it below jax's heartbeat timeout (100 s by
    default), which ends the process when a peer has died, so the error comes first."""
    text = os.environ.get("AUTOSHARD_AGREEMENT_TIMEOUT_S")
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"AUTOSHARD_AGREEMENT_TIMEOUT_S must be a positive number of "
                         f"seconds, got {text!r}")
    return value


def check_same_plan(plan: Plan, label: str, timeout_s: float | None = None) -> None:
    """Raise :class:`PlanMismatchError` unless every process holds the same plan, and
    :class:`AgreementTimeoutError` naming the processes that did not show their plan
    within ``timeout_s`` (default :func:`agreement_timeout_s`).

    A no-op in a single-process run. Otherwise every process must call it (they do, by
    calling the parallelized function, like any jitted computation). ``label`` says, in
    the error, what each process was running.
    """
    if jax.process_count() == 1:
        return
    timeout_s = agreement_timeout_s() if timeout_s is None else timeout_s
    digest = plan_digest(plan)
    record = bytes.fromhex(digest) + _fixed(label.encode("utf-8"), _LABEL_BYTES)
    client = distributed_client()
    if client is None:  # processes not started by jax.distributed: a collective instead
        from jax.experimental import multihost_utils
        gathered = np.asarray(multihost_utils.process_allgather(np.frombuffer(record, np.uint8)))
        rows = [bytes(r) for r in gathered.reshape(jax.process_count(), -1)]
    else:
        rows = _exchange(client, record, label, timeout_s)
    digests = [r[:_DIGEST_BYTES].hex() for r in rows]
    if len(set(digests)) == 1:
        return
    me = jax.process_index()
    lines = [f"  process {p}: plan {d[:16]} for {_label(r)}" + ("  <- this process" if p == me else "")
             for p, (d, r) in enumerate(zip(digests, rows))]
    raise PlanMismatchError(
        "the processes of this jax.distributed run made different plans, so running would "
        "deadlock or compute garbage; nothing was run:\n" + "\n".join(lines) + "\n"
        "Every process must call the parallelized function with the same function, "
        "argument shapes and dtypes, static arguments, mesh, method and cluster (run the "
        "same script everywhere; load a calibrated cluster from one file, or calibrate "
        "collectively with autoshard.calibrate, which gives every process the same figures).")


def _exchange(client, record: bytes, label: str, timeout_s: float) -> list[bytes]:
    """Every process's record, through the coordination service's key-value store: post
    ours, then read each other's until ``timeout_s`` has passed (in slices of at most a
    second, so Ctrl-C gets through)."""
    round_ = next(_ROUNDS)   # every process checks its calls in the same order
    me, count = jax.process_index(), jax.process_count()
    key = f"autoshard/plan-agreement/{round_}/{{}}".format
    client.key_value_set_bytes(key(me), record)
    deadline = time.monotonic() + timeout_s
    rows, missing, last_error = [], [], ""
    for p in range(count):
        row = record if p == me else None
        while row is None:
            wait_ms = int(min(1.0, max(deadline - time.monotonic(), 0.001)) * 1000)
            try:
                row = bytes(client.blocking_key_value_get_bytes(key(p), max(wait_ms, 1)))
            except Exception as err:  # noqa: BLE001 - jax raises DEADLINE_EXCEEDED errors
                last_error = " ".join(str(err).split())[:200]
                if time.monotonic() >= deadline:
                    break
        if row is None:
            missing.append(p)
        rows.append(row)
    if missing:
        raise AgreementTimeoutError(_missing_message(missing, count, label, timeout_s,
                                                     last_error), missing)
    return rows


def _missing_message(missing, count: int, label: str, timeout_s: float, error: str) -> str:
    who = ", ".join(str(p) for p in missing)
    return (
        f"process{'es' if len(missing) > 1 else ''} {who} of {count} did not reach the plan "
        f"agreement within {timeout_s:g} s (process {jax.process_index()} was running "
        f"{label}); nothing was run. A missing process has most likely died or hung; it may "
        f"also still be planning, far slower than this one (then raise "
        f"AUTOSHARD_AGREEMENT_TIMEOUT_S). After this error jax's coordination service ends "
        f"the remaining processes too once its heartbeat timeout (100 s by default) notices a "
        f"dead peer: restart every process. (Last key-value store error: {error or 'none'})")


def _fixed(data: bytes, size: int) -> bytes:
    data = data[:size]
    return data + b"\0" * (size - len(data))


def _label(record: bytes) -> str:
    return record[_DIGEST_BYTES:].rstrip(b"\0").decode("utf-8", errors="replace")
