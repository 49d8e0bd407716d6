"""Inter-operator stage slicing (Alpa §5): layers × sub-meshes dynamic programme.

Plain data, no jax. Layers ``0..L-1`` are cut into contiguous stages; each stage gets a
sub-mesh shape, the sub-meshes together use every device exactly once. With ``B``
micro-batches the pipeline takes ``Σ tᵢ + (B − 1) · max tᵢ`` (tᵢ: one micro-batch's forward
and backward on stage i). The DP fixes ``t_max`` in turn (every candidate stage time),
minimises ``Σ tᵢ`` with every ``tᵢ ≤ t_max``, and keeps the best total: exact, because the
optimum's own ``max tᵢ`` is one of the candidates.

Memory: a stage holds ``fixed + (in_flight − 1) · per_microbatch`` bytes per device, where
``in_flight`` is how many micro-batches have run forward but not yet backward at once:
``B`` under GPipe, ``min(S − i, B)`` for stage i of S under 1F1B.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence

from autoshard.cost_model import in_flight

from ._request import InfeasibleError


@dataclasses.dataclass(frozen=True)
class StageCost:
    """One candidate stage: seconds per micro-batch, seconds once per step (work a step does
    once for this stage whatever the micro-batch count) and bytes per device."""

    seconds: float
    fixed_bytes: float = 0.0
    per_microbatch_bytes: float = 0.0
    per_step_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class StageSolution:
    """Stages in pipeline order as ``(first layer, last layer, sub-mesh index)``."""

    stages: tuple[tuple[int, int, int], ...]
    objective_s: float
    max_stage_s: float


def submesh_shapes(mesh_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Alpa's sub-mesh family for a 1-D ``(n,)`` or 2-D ``(r, c)`` mesh.

    1-D: ``(2^k,)`` and ``(n,)``. 2-D: ``(1, 2^k)`` inside one row (only when ``c`` is a power
    of two, so they always pack) and ``(m, c)`` full rows for ``m = 1..r``.
    """
    shape = tuple(int(n) for n in mesh_shape)
    if len(shape) == 1:
        n = shape[0]
        sizes = sorted({2 ** k for k in range(n.bit_length()) if 2 ** k <= n} | {n})
        return tuple((s,) for s in sizes)
    if len(shape) == 2:
        r, c = shape
        out = []
        if c & (c - 1) == 0:
            out += [(1, 2 ** k) for k in range(c.bit_length()) if 2 ** k < c]
        out += [(m, c) for m in range(1, r + 1)]
        return tuple(out)
    raise ValueError(f"pipeline stages need a 1-D or 2-D mesh, got shape {shape}")


def place_submeshes(mesh_shape: Sequence[int], shapes: Sequence[Sequence[int]]
                    ) -> tuple[tuple[int, ...], ...]:
    """Device positions (row-major indices into the mesh) of each sub-mesh, in order.

    In pipeline order when that tiles the mesh (neighbouring stages side by side), else
    full-row sub-meshes first and ``(1, 2^k)`` ones largest first, which always tiles when
    the row length is a power of two. ``ValueError`` when they do not tile the mesh.
    """
    mesh_shape = tuple(mesh_shape)
    total = math.prod(mesh_shape)
    if sum(math.prod(s) for s in shapes) != total:
        raise ValueError(f"sub-meshes {list(shapes)} do not use the {total} devices of mesh "
                         f"{mesh_shape} exactly once")
    if len(mesh_shape) == 1:
        out, start = [], 0
        for s in shapes:
            out.append(tuple(range(start, start + s[0])))
            start += s[0]
        return tuple(out)
    in_order = _pack(mesh_shape, shapes, range(len(shapes)))
    if in_order is not None:  # consecutive stages side by side when they fit that way
        return in_order
    full = [i for i, s in enumerate(shapes) if s[1] == mesh_shape[1]]
    parts = sorted((i for i, s in enumerate(shapes) if s[1] != mesh_shape[1]),
                   key=lambda i: (-shapes[i][1], i))
    packed = _pack(mesh_shape, shapes, full + parts)
    if packed is None:
        raise ValueError(f"sub-meshes {list(shapes)} cannot be packed into mesh {mesh_shape}")
    return packed


def _pack(mesh_shape, shapes, order):
    """Fill rows left to right in ``order``; ``None`` if a sub-mesh would straddle rows."""
    r, c = mesh_shape
    placed: dict[int, tuple[int, ...]] = {}
    row = col = 0
    for i in order:
        m, k = shapes[i]
        if k == c:
            if col:
                return None
            placed[i] = tuple(range(row * c, (row + m) * c))
            row += m
            continue
        if col + k > c:
            return None
        placed[i] = tuple(row * c + col + j for j in range(k))
        col += k
        if col == c:
            row, col = row + 1, 0
    return tuple(placed[i] for i in range(len(shapes)))


def _fits(cost: StageCost, stage: int, num_stages: int, B: int, schedule: str,
          budget: float | None) -> bool:
    if budget is None:
        return True
    held = cost.fixed_bytes + (in_flight(schedule, stage, num_stages, B) - 1) \
        * cost.per_microbatch_bytes
    return held <= budget


def _check(num_layers, devices, total_devices, num_stages):
    if num_layers < 1:
        raise ValueError("need at least one layer")
    if num_stages is not None and not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages={num_stages} but there are {num_layers} layers: use "
                         f"between 1 and {num_layers} stages, or more layers")
    if any(d < 1 for d in devices):
        raise ValueError(f"sub-mesh device counts must be positive, got {list(devices)}")


def solve_stages(num_layers: int, submesh_devices: Sequence[int], total_devices: int,
                 costs: Mapping[tuple[int, int, int], StageCost], num_microbatches: int,
                 schedule: str = "1f1b", num_stages: int | None = None,
                 memory_budget: float | None = None) -> StageSolution:
    """The stage slicing minimising ``Σ (tᵢ + pᵢ) + (B − 1) · max tᵢ`` (``pᵢ``: the stage's
    ``per_step_s``).

    ``costs[(i, j, m)]``: layers ``i..j`` (inclusive) on sub-mesh ``m`` (a missing key =
    not allowed); ``submesh_devices[m]``: its device count. Stage sub-meshes use
    ``total_devices`` exactly. ``num_stages`` forces the count. Raises
    :class:`InfeasibleError` when nothing fits.
    """
    L, B = num_layers, int(num_microbatches)
    _check(L, submesh_devices, total_devices, num_stages)
    in_flight(schedule, 0, 1, B)  # validates the schedule name
    counts = range(1, L + 1) if num_stages is None else (num_stages,)
    best: StageSolution | None = None
    for t_max in sorted({c.seconds for c in costs.values()}):
        if best is not None and (B - 1) * t_max + t_max >= best.objective_s:
            break  # every later t_max costs more than the best already found
        for S in counts:
            memo: dict = {}

            def f(s, k, d, S=S, t_max=t_max, memo=memo):
                """Min Σt for layers k..L-1 in s stages on d devices; stage index S - s."""
                if s == 0:
                    return (0.0, ()) if k == L and d == 0 else (math.inf, ())
                if k == L or d <= 0:
                    return math.inf, ()
                key = (s, k, d)
                if key in memo:
                    return memo[key]
                out = (math.inf, ())
                for j in range(k, L - s + 1):
                    for m, n in enumerate(submesh_devices):
                        c = costs.get((k, j, m))
                        if c is None or c.seconds > t_max or n > d or \
                                not _fits(c, S - s, S, B, schedule, memory_budget):
                            continue
                        rest, stages = f(s - 1, j + 1, d - n)
                        if c.seconds + c.per_step_s + rest < out[0]:
                            out = (c.seconds + c.per_step_s + rest, ((k, j, m),) + stages)
                memo[key] = out
                return out

            total, stages = f(S, 0, total_devices)
            if stages:
                objective = total + (B - 1) * t_max
                if best is None or objective < best.objective_s - 1e-15:
                    real_max = max(costs[st].seconds for st in stages)
                    best = StageSolution(stages, total + (B - 1) * real_max, real_max)
    if best is None:
        raise InfeasibleError(
            f"no way to cut {L} layers into {'any number of' if num_stages is None else num_stages}"
            f" stage(s) on {total_devices} devices within the memory budget: allow more "
            f"devices per stage, fewer micro-batches in flight (schedule='1f1b'), or a larger "
            f"memory_budget", min((c.fixed_bytes for c in costs.values()), default=0.0),
            memory_budget)
    return best


def brute_force_stages(num_layers: int, submesh_devices: Sequence[int], total_devices: int,
                       costs: Mapping[tuple[int, int, int], StageCost], num_microbatches: int,
                       schedule: str = "1f1b", num_stages: int | None = None,
                       memory_budget: float | None = None) -> StageSolution:
    """:func:`solve_stages` by enumerating every slicing (for tests; exponential)."""
    L, B = num_layers, int(num_microbatches)
    _check(L, submesh_devices, total_devices, num_stages)
    best: StageSolution | None = None
    for cuts_n in range(L):
        for cuts in itertools.combinations(range(1, L), cuts_n):
            bounds = list(zip((0,) + cuts, tuple(c - 1 for c in cuts) + (L - 1,)))
            S = len(bounds)
            if num_stages is not None and S != num_stages:
                continue
            for meshes in itertools.product(range(len(submesh_devices)), repeat=S):
                if sum(submesh_devices[m] for m in meshes) != total_devices:
                    continue
                stages = tuple((i, j, m) for (i, j), m in zip(bounds, meshes))
                if any((st not in costs) or not _fits(costs[st], p, S, B, schedule,
                                                      memory_budget)
                       for p, st in enumerate(stages)):
                    continue
                times = [costs[st].seconds for st in stages]
                objective = sum(times) + sum(costs[st].per_step_s for st in stages) \
                    + (B - 1) * max(times)
                if best is None or objective < best.objective_s - 1e-15:
                    best = StageSolution(stages, objective, max(times))
    if best is None:
        raise InfeasibleError("no feasible stage slicing",
                              min((c.fixed_bytes for c in costs.values()), default=0.0),
                              memory_budget)
    return best
