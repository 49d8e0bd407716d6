"""Parallelization methods: the ILP search and the hand-written presets.

Every method is priced by the same cost model and executed by the same runtime.
A preset fixes how the arguments are laid out (the part a person writes by hand:
``in_shardings``); the intermediates are then the cheapest consistent with it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from autoshard.cost_model import SCHEDULES
from autoshard.ir.specs import Spec, enumerate_specs, replicated


@dataclasses.dataclass(frozen=True)
class ShardParallel:
    """Intra-operator parallelism found by the ILP (Alpa's ShardParallel).

    ``time_limit_s``: solver limit (deterministic, so every process gets the same plan).
    ``tie_repeats``: give the nodes of repeated identical layers one shared choice
    (alternating between consecutive layers), so the ILP stops growing with depth;
    ``None`` ties when the problem has more than 600 nodes (roughly 4+ transformer
    layers), ``False`` never ties (exact, slower on deep models).
    ``gap_limit``: stop the search once the plan is proven within this relative gap of
    the optimum; ``None``: 1% when repeated layers are tied, else 0 (prove optimality
    or reach the time limit).
    """

    time_limit_s: float = 60.0
    tie_repeats: bool | None = None
    gap_limit: float | None = None

    def __post_init__(self):
        if isinstance(self.time_limit_s, bool) or not isinstance(self.time_limit_s, (int, float)) \
                or not 0 < self.time_limit_s < math.inf:
            raise ValueError(f"time_limit_s must be a positive number of seconds, got "
                             f"{self.time_limit_s!r}")
        if self.tie_repeats not in (None, True, False):
            raise ValueError(f"tie_repeats must be None, True or False, got {self.tie_repeats!r}")
        if self.gap_limit is not None and (
                isinstance(self.gap_limit, bool) or not isinstance(self.gap_limit, (int, float))
                or not 0 <= self.gap_limit < 1):
            raise ValueError(f"gap_limit must be None or a fraction in [0, 1), got "
                             f"{self.gap_limit!r}")

    def input_specs(self, shape, mesh_shape, is_batch: bool) -> list[Spec]:
        return enumerate_specs(shape, mesh_shape)


def _split_leading(shape, mesh_shape, axes: Sequence[int]) -> Spec:
    """Split dim 0 over as many of ``axes`` (in order) as divide it."""
    rank = len(shape)
    if rank == 0:
        return ()
    chosen: list[int] = []
    for a in axes:
        if mesh_shape[a] > 1 and shape[0] % (math.prod(mesh_shape[b] for b in chosen) * mesh_shape[a]) == 0:
            chosen.append(a)
    return (tuple(chosen),) + ((),) * (rank - 1)


def _all_axes(mesh_shape) -> tuple[int, ...]:
    return tuple(a for a, n in enumerate(mesh_shape) if n > 1)


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Batch arguments split on their leading dim over every mesh axis; the rest replicated."""

    def input_specs(self, shape, mesh_shape, is_batch: bool) -> list[Spec]:
        if is_batch:
            return [_split_leading(shape, mesh_shape, _all_axes(mesh_shape))]
        return [replicated(len(shape))]


@dataclasses.dataclass(frozen=True)
class ZeRO3:
    """Fully sharded data parallel: batch as in DataParallel; every other argument
    (parameters, optimizer state) split over all devices on its largest divisible dim."""

    def input_specs(self, shape, mesh_shape, is_batch: bool) -> list[Spec]:
        axes = _all_axes(mesh_shape)
        if is_batch:
            return [_split_leading(shape, mesh_shape, axes)]
        n = math.prod(mesh_shape[a] for a in axes)
        for d in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
            if n > 1 and shape[d] % n == 0:
                return [tuple(axes if k == d else () for k in range(len(shape)))]
        # Fall back to the largest sub-group of axes that divides some dim.
        for sub in sorted(((a,) for a in axes), key=lambda s: -mesh_shape[s[0]]):
            for d in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
                if shape[d] % mesh_shape[sub[0]] == 0:
                    return [tuple(sub if k == d else () for k in range(len(shape)))]
        return [replicated(len(shape))]


@dataclasses.dataclass(frozen=True)
class Megatron:
    """Tensor parallelism on the model axis (the last mesh axis), data parallelism on
    the others: batch arguments split on their leading dim over the data axes;
    parameters replicated over the data axes and either whole or split on one dim
    over the model axis — column- or row-parallel, whichever the cost model prefers
    for that weight given its neighbours (Megatron-LM's alternating pattern)."""

    def input_specs(self, shape, mesh_shape, is_batch: bool) -> list[Spec]:
        axes = _all_axes(mesh_shape)
        if not axes:
            return [replicated(len(shape))]
        model_axis = len(mesh_shape) - 1
        data_axes = tuple(a for a in axes if a != model_axis)
        if is_batch:
            return [_split_leading(shape, mesh_shape, data_axes)]
        specs = [replicated(len(shape))]
        for d, size in enumerate(shape):
            if mesh_shape[model_axis] > 1 and size % mesh_shape[model_axis] == 0:
                specs.append(tuple((model_axis,) if k == d else () for k in range(len(shape))))
        return specs


@dataclasses.dataclass(frozen=True)
class PipeshardParallel:
    """Inter- plus intra-operator parallelism (Alpa's PipeshardParallel).

    The step must compute its gradient with :func:`autoshard.grad` or
    :func:`autoshard.value_and_grad`. The loss is cut into ``num_layers`` layers (or at
    :func:`autoshard.mark_layer_boundary` calls), a dynamic programme groups layers into
    stages on sub-meshes (``num_stages`` forces the count; ``None`` lets it choose, one
    stage included), each stage is sharded by ``stage_method`` on its sub-mesh, and
    ``num_microbatches`` micro-batches run through the stages under ``schedule``
    (``"1f1b"`` or ``"gpipe"``). The gradient is the mean of the micro-batch gradients, so
    the loss must be a mean over the batch of per-sample terms (batch-norm statistics
    become per-micro-batch statistics). The optimizer update (everything after the
    gradient) runs once per step, on the stage that owns each parameter.

    Batch arguments are split into micro-batches on their leading dimension. With
    ``parallelize(..., batch_argnums=None)`` (the default) they are the last non-static
    argument plus every other non-static argument that (a) has only array leaves whose
    leading dimension is that argument's batch size and (b) the step reads only inside the
    function given to ``autoshard.grad`` / ``value_and_grad``, as data: not differentiated,
    not used before or after the gradient, not returned, not a PRNG key. So
    ``step(params, opt_state, x, y)`` splits both ``x`` and ``y``, whether the loss takes
    them as arguments or closes over them, while the optimizer state is never split. Pass
    ``batch_argnums`` to name the batch arguments yourself.
    """

    num_microbatches: int = 1
    num_stages: int | None = None
    schedule: str = "1f1b"
    num_layers: int | None = None
    stage_method: ShardParallel | DataParallel | ZeRO3 | Megatron = \
        dataclasses.field(default_factory=lambda: ShardParallel(time_limit_s=10.0))

    def __post_init__(self):
        if not isinstance(self.num_microbatches, int) or self.num_microbatches < 1:
            raise ValueError(f"num_microbatches must be a positive int, got "
                             f"{self.num_microbatches!r}")
        if self.num_stages is not None and (not isinstance(self.num_stages, int)
                                            or self.num_stages < 1):
            raise ValueError(f"num_stages must be None or a positive int, got "
                             f"{self.num_stages!r}")
        if self.num_layers is not None and (not isinstance(self.num_layers, int)
                                            or self.num_layers < 1):
            raise ValueError(f"num_layers must be None or a positive int, got "
                             f"{self.num_layers!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.stage_method, (ShardParallel, DataParallel, ZeRO3, Megatron)):
            raise TypeError(f"stage_method must be autoshard.ShardParallel() or a preset, got "
                            f"{self.stage_method!r}")

    def input_specs(self, shape, mesh_shape, is_batch: bool) -> list[Spec]:
        return self.stage_method.input_specs(shape, mesh_shape, is_batch)


Method = ShardParallel | DataParallel | ZeRO3 | Megatron | PipeshardParallel
#: every method, by the name plans and the CLI know it by
METHODS: tuple[type, ...] = (ShardParallel, PipeshardParallel, DataParallel, ZeRO3, Megatron)
PRESETS: tuple[type, ...] = (DataParallel, ZeRO3, Megatron)


def method_to_dict(method: Method) -> dict:
    """``method`` as plain data: ``{"kind": class name, field: value, ...}`` (a
    pipeline's ``stage_method`` nested the same way)."""
    data = {"kind": type(method).__name__}
    for field in dataclasses.fields(method):
        value = getattr(method, field.name)
        data[field.name] = method_to_dict(value) if isinstance(value, METHODS) else value
    return data


def method_from_dict(data) -> Method:
    """The method :func:`method_to_dict` wrote; ``ValueError`` naming what is wrong."""
    kinds = {m.__name__: m for m in METHODS}
    if not isinstance(data, dict) or data.get("kind") not in kinds:
        raise ValueError(f"expected an object with \"kind\" one of {sorted(kinds)}, got "
                         f"{data!r}"[:200])
    cls = kinds[data["kind"]]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"kind"})
    if unknown:
        raise ValueError(f"{data['kind']} has no setting(s) {unknown}; expected some of "
                         f"{sorted(names)}")
    kwargs = {k: method_from_dict(v) if isinstance(v, dict) else v
              for k, v in data.items() if k != "kind"}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{data['kind']}: {err}") from None
