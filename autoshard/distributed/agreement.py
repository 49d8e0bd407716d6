"""Multi-process runs (``jax.distributed``): every process must hold the same plan.

Each process traces and plans on its own; planning is deterministic (no dict/set-order,
hash-seed, clock or thread dependence; CP-SAT runs one worker with a fixed seed and a
deterministic time limit), so consistent processes get byte-identical plans. Before a
plan first runs, the processes exchange a digest of it (one small all-gather of a fixed
size, so it cannot hang on mismatched shapes) and raise :class:`PlanMismatchError` when
they differ, instead of deadlocking later in mismatched collectives.
"""
from __future__ import annotations

import hashlib
import json

import jax
import numpy as np

from autoshard.errors import PlanMismatchError
from autoshard.plan.record import Plan

_DIGEST_BYTES = 32
_LABEL_BYTES = 224
# Fields that legitimately differ between processes: wall-clock timings, and source
# locations (file paths differ when hosts keep the code in different places).
_SOLVER_TIMINGS = ("solve_time_s", "planning_time_s")


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


def check_same_plan(plan: Plan, label: str) -> None:
    """Raise :class:`PlanMismatchError` unless every process holds the same plan.

    A no-op in a single-process run. Otherwise a collective: every process must call it
    (they do, by calling the parallelized function, like any jitted computation).
    ``label`` says, in the error, what each process was running.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    digest = plan_digest(plan)
    record = bytes.fromhex(digest) + _fixed(label.encode("utf-8"), _LABEL_BYTES)
    gathered = np.asarray(multihost_utils.process_allgather(np.frombuffer(record, np.uint8)))
    rows = [bytes(r) for r in gathered.reshape(jax.process_count(), -1)]
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


def _fixed(data: bytes, size: int) -> bytes:
    data = data[:size]
    return data + b"\0" * (size - len(data))


def _label(record: bytes) -> str:
    return record[_DIGEST_BYTES:].rstrip(b"\0").decode("utf-8", errors="replace")
