"""Parallelization methods: the ILP search, the pipeline, and the hand-written presets.

Methods are plain records of their settings. A preset is a fixed, hand-written layout of
the arguments and results (what a person writes as ``jax.jit``'s ``in_shardings`` and
``out_shardings``; the rules are in ``autoshard.intra.presets``): nothing is searched,
and its program runs as plain ``jax.jit`` with XLA's own sharding propagation inside.
Its plan is still priced by the same cost model, so model and compiled program can be
compared for presets too.
"""
from __future__ import annotations

import dataclasses

from autoshard.cost_model import SCHEDULES


def _is_count(value) -> bool:
    """A positive int (not a bool) that a machine word holds."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2**31


@dataclasses.dataclass(frozen=True)
class ShardParallel:
    """Intra-operator parallelism found by the ILP (Alpa's ShardParallel).

    ``time_limit_s``: seconds planning may take, from the call that traces to the plan
    (the search returns the best plan found by then). Across ``jax.distributed``
    processes (or with ``AUTOSHARD_DETERMINISTIC=1``) it is a deterministic limit
    instead, of about that many seconds of search on a typical machine, so that every
    process finds the same plan.
    ``tie_repeats``: give the nodes of repeated identical layers one shared choice
    (alternating between consecutive layers), so the ILP stops growing with depth;
    ``None`` ties when the problem has more than 600 nodes (roughly 4+ transformer
    layers) and tying leaves at most three quarters of them (a model of few layers but
    many nodes is solved whole), ``False`` never ties (exact, slower on deep models).
    ``gap_limit``: stop the search once the plan is proven within this relative gap of
    the optimum; ``None``: 1% when repeated layers are tied, else 0 (prove optimality
    or reach the time limit).
    ``remat``: when no sharding meets the memory budget, recompute segments of the forward
    pass in the backward pass instead of storing their activations, the fewest that let a
    plan fit (``Plan.remat`` says which; see ``autoshard.intra.remat``); ``False``: raise
    ``InfeasiblePlanError`` instead.
    ``unroll_scans``: ``False`` (the default) plans a ``lax.scan`` whose body has a dot or a
    convolution (layers scanned over stacked weights, an RNN) once, as one step run ``length``
    times: every step laid out alike, the loop compiled as a loop, planning time flat in the
    number of steps (``autoshard.intra.loop_plans``); ``True`` unrolls such a scan of up to
    128 steps, each step planned on its own and compiled unrolled (slower to plan and to
    compile for deep models; a plan may lay out the first and last layers differently). The
    presets keep such loops too, as ``jax.jit`` compiles them.
    """

    time_limit_s: float = 60.0
    tie_repeats: bool | None = None
    gap_limit: float | None = None
    remat: bool = True
    unroll_scans: bool = False

    def __post_init__(self):
        if isinstance(self.time_limit_s, bool) or not isinstance(self.time_limit_s, (int, float)) \
                or not 0 < self.time_limit_s < 1e9:
            raise ValueError(f"time_limit_s must be a positive number of seconds (below 1e9), "
                             f"got {self.time_limit_s!r}")
        if self.tie_repeats is not None and not isinstance(self.tie_repeats, bool):
            raise ValueError(f"tie_repeats must be None, True or False, got {self.tie_repeats!r}")
        if self.gap_limit is not None and (
                isinstance(self.gap_limit, bool) or not isinstance(self.gap_limit, (int, float))
                or not 0 <= self.gap_limit < 1):
            raise ValueError(f"gap_limit must be None or a fraction in [0, 1), got "
                             f"{self.gap_limit!r}")
        if not isinstance(self.remat, bool):
            raise ValueError(f"remat must be True or False, got {self.remat!r}")
        if not isinstance(self.unroll_scans, bool):
            raise ValueError(f"unroll_scans must be True or False, got {self.unroll_scans!r}")



@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Data parallelism: batch arguments split on their leading dim over every mesh axis;
    parameters and optimizer state replicated (a fixed layout, see the module doc)."""


@dataclasses.dataclass(frozen=True)
class ZeRO3:
    """Fully sharded data parallelism (ZeRO-3 / FSDP): batch as in :class:`DataParallel`;
    every other argument split over all devices on its largest divisible dim (a fixed
    layout, see the module doc)."""


@dataclasses.dataclass(frozen=True)
class Megatron:
    """Megatron-LM tensor parallelism on the model axis (the last mesh axis), data
    parallelism on the others: column-parallel weights where an activation arrives whole
    (q/k/v, the first MLP kernel), row-parallel where it arrives split (the attention
    output, the second MLP kernel), vocab-parallel embeddings and output projections to a
    vocabulary, routers and classifier heads replicated (as Megatron-LM's plain linear
    layers); batch arguments split over the data axes. A fixed rule read off the
    program's order of operations (``autoshard.intra.presets``), not chosen by the cost
    model."""


@dataclasses.dataclass(frozen=True)
class Annotated:
    """The model's own layout: the sharding annotations its authors wrote (flax linen's
    ``nn.with_partitioning`` / ``nn.with_logical_partitioning`` boxes, flax nnx's
    ``out_sharding`` variable metadata), read off the arguments, run as a hand-written
    ``jax.jit`` layout (a fixed layout, see the module doc).

    ``rules``: logical name → mesh axes, in flax's form and order
    (``(("batch", "data"), ("mlp", "model"), ("embed", None))``); without rules, those
    the boxes carry or flax's current ``nn.logical_axis_rules`` context. Names that are
    mesh axes stand for themselves. Unannotated batch arguments are split on their
    leading dim over the axes ``"batch"`` maps to (default: every mesh axis but the last,
    or every axis of a 1-D mesh); every other unannotated argument is replicated.
    :class:`ShardParallel` also starts its search from this layout when the arguments
    carry annotations, and its plan's summary prices it beside the presets.
    """

    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = ()

    def __post_init__(self):
        rules = self.rules
        if not isinstance(rules, (tuple, list)):
            raise TypeError(f"rules must be a sequence of (logical name, mesh axes) pairs, "
                            f"got {rules!r}")
        normal = []
        for k, rule in enumerate(rules):
            if not isinstance(rule, (tuple, list)) or len(rule) != 2 or \
                    not isinstance(rule[0], str):
                raise TypeError(f"rules[{k}] must be a (logical name, mesh axes) pair such "
                                f"as ('mlp', 'model'), got {rule!r}")
            target = rule[1]
            if isinstance(target, list):
                target = tuple(target)
            if not (target is None or isinstance(target, str) or (
                    isinstance(target, tuple) and all(isinstance(a, str) for a in target))):
                raise TypeError(f"rules[{k}]: the mesh axes must be None, an axis name or a "
                                f"tuple of them, got {rule[1]!r}")
            normal.append((rule[0], target))
        object.__setattr__(self, "rules", tuple(normal))


@dataclasses.dataclass(frozen=True)
class PipeshardParallel:
    """Inter- plus intra-operator parallelism (Alpa's PipeshardParallel).

    The step computes its gradient in one call of ``jax.value_and_grad`` or ``jax.grad``
    (however imported; flax nnx's and equinox's wrappers call them) or of
    :func:`autoshard.value_and_grad` / :func:`autoshard.grad`: that call marks where the
    forward and backward end. The loss is cut into ``num_layers`` layers (or at
    :func:`autoshard.mark_layer_boundary` calls), a dynamic programme groups layers into
    stages on sub-meshes (``num_stages`` forces the count; ``None`` lets it choose, one
    stage included), each stage is sharded by ``stage_method`` on its sub-mesh, and
    ``num_microbatches`` micro-batches run through the stages under ``schedule``
    (``"1f1b"`` or ``"gpipe"``). The gradient is the mean of the micro-batch gradients for
    a loss that is a mean over the batch, their sum for a sum; a function of such values
    (a masked mean) is computed from their totals (of several that depend on the
    parameters, a z-loss beside the loss, under ``schedule="gpipe"`` only); a loss that
    none of these recovers (batch-norm statistics) is refused. The optimizer update (everything
    after the gradient) runs once per step, on the stage that owns each parameter. A step
    without a gradient (inference) runs forward only: all of it is cut into layers at the
    equations reading its non-batch arrays, and each output is combined over the
    micro-batches as it is over the batch (one value per example concatenated).

    Batch arguments are split into micro-batches on their leading dimension; their
    scalar leaves and PRNG keys are read whole by every micro-batch. With
    ``parallelize(..., batch_argnums=None)`` (the default) they are the last non-static
    argument that is not a PRNG key and has no scalar leaf (``batch`` of
    ``step(state, batch, dropout_key)``; failing that, the last one with array leaves that
    the step does not differentiate) plus every other non-static argument that (a) has
    only array leaves whose leading dimension is that argument's batch size and (b) the
    step reads only inside the function it differentiates, as data: not differentiated,
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
        if not _is_count(self.num_microbatches):
            raise ValueError(f"num_microbatches must be a positive int, got "
                             f"{self.num_microbatches!r}")
        if self.num_stages is not None and not _is_count(self.num_stages):
            raise ValueError(f"num_stages must be None or a positive int, got "
                             f"{self.num_stages!r}")
        if self.num_layers is not None and not _is_count(self.num_layers):
            raise ValueError(f"num_layers must be None or a positive int, got "
                             f"{self.num_layers!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.stage_method, (ShardParallel, DataParallel, ZeRO3, Megatron)):
            raise TypeError(f"stage_method must be autoshard.ShardParallel() or a preset, got "
                            f"{self.stage_method!r}")



Method = ShardParallel | DataParallel | ZeRO3 | Megatron | Annotated | PipeshardParallel
#: every method, by the name plans and the CLI know it by
METHODS: tuple[type, ...] = (ShardParallel, PipeshardParallel, DataParallel, ZeRO3, Megatron,
                             Annotated)
PRESETS: tuple[type, ...] = (DataParallel, ZeRO3, Megatron, Annotated)


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


def method_from_repr(text: str) -> Method:
    """A version-1 plan file's method, its ``repr`` (``"ShardParallel(time_limit_s=60.0,
    ...)"``), read without ``eval``: only calls of autoshard's methods with literal keyword
    arguments; ``ValueError`` naming what is wrong."""
    import ast
    classes = {c.__name__: c for c in METHODS}

    def build(node):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in classes and not node.args:
            return classes[node.func.id](**{k.arg: build(k.value) for k in node.keywords})
        return ast.literal_eval(node)

    def short(value, limit):
        text = repr(value)
        return text if len(text) <= limit else text[:limit - 1] + "…"

    try:
        method = build(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError) as err:
        raise ValueError(f"cannot read the method {short(text, 60)}: "
                         f"{type(err).__name__}: {short(str(err), 200)}") from None
    if not isinstance(method, METHODS):
        raise ValueError(f"{text!r} is not an autoshard method")
    return method
