"""Hand-written baselines: what a practitioner writes today, without autoshard.

Each baseline is ``jax.jit(step, in_shardings=..., out_shardings=..., donate_argnums=(0, 1))``
with hand-picked ``NamedSharding`` s on the arguments and results and XLA's own sharding
propagation inside the step (no sharding constraints). Nothing here imports autoshard's
planner: only ``jax`` and the workloads' argument pytrees.

The layouts are written MaxText-style, in two tables:

* per workload, a **logical-axes table**: a list of ``(regex, logical axes)`` rows. The regex
  is searched (``re.search``, first row that matches wins) in the ``jax.tree_util.keystr``
  path of each leaf of the step's argument tuple ``(params, opt_state, batch)``, so
  ``[0]['layers'][0]['w']`` is a parameter, ``[1][0].mu['layers'][0]['w']`` the optax state
  that mirrors it (the same row matches both, because rows anchor on the path's end) and
  ``[2]['x']`` a batch leaf. The logical axes name what each dimension of the leaf means
  (``("embed", "mlp")`` for a first MLP kernel). Every leaf with a dimension must match a
  row; scalar leaves (optax's ``count``) are replicated.
* per strategy, a **rule** mapping logical axes to mesh-axis *roles*: ``"all"`` (every mesh
  axis), ``"data"`` (the first mesh axis; on a 1-D mesh the only one), ``"model"`` (the
  last mesh axis; on a 1-D mesh the only one), ``"replica"`` (every axis but the last: the
  batch axes of a tensor-parallel layout) and ``"shard"`` (the axis a tensor-parallel
  layout's FSDP split uses: the first of a 2-D mesh, the middle one of a 3-D mesh named
  MaxText's way, ``("data", "fsdp", "model")``). So the same rule serves ``(8,)`` meshes
  named ``("devices",)``, ``(2, 4)`` meshes named ``("data", "model")`` and ``(2, 2, 2)``
  meshes. Strategies with ``fsdp`` set additionally split every parameter /
  optimizer-state leaf over those axes on its largest dimension that no rule split already
  (ZeRO-3).

Falling back per leaf: when a dimension is not divisible by the product of the mesh axes a
rule (or the FSDP split) gives it, the leaf uses the largest-product subset of those axes
that divides it (order kept), and stays replicated over the rest; a mesh axis already used
by an earlier dimension of the same leaf is not used again. Nothing is padded.

Strategies (``baseline_names`` says which apply to a workload and mesh):

=========  ==============================================================================
dp         batch's leading dim over all mesh axes; parameters and optimizer state replicated
fsdp       dp, plus every parameter / optimizer-state leaf split over all mesh axes on its
           largest divisible dim (ZeRO-3)
tp         1-D mesh only. Megatron: column-parallel first MLP kernel and q/k/v (output
           features split, their biases too), row-parallel second MLP kernel and attention
           output (input features split), vocab-parallel embedding; layernorm replicated;
           batch replicated
dp_tp      2-D and 3-D: batch over every axis but model, tp over model
fsdp_tp    2-D and 3-D: dp_tp, plus parameters additionally split on another dimension
           over data (2-D) or fsdp (3-D; MaxText's default layout, weights over fsdp and
           tensor, batch over data and fsdp)
ep         moe only: experts dim over model (the 1-D mesh's only axis), tokens over data
           (on a 1-D mesh the same axis: GShard's layout)
ep_gshard  moe, 2-D and 3-D: experts over model, tokens over *every* axis (GShard /
           MaxText, whose activation batch includes the expert axis): dispatch becomes an
           all-to-all over model
=========  ==============================================================================

Per workload (names as in ``examples/models.py``; the ``benchmarks.run`` configuration names
``mlp_small``, ``gpt_large``, ``wide_resnet``, ``embedding`` ... are accepted too):

* ``mlp``: an MLP has no attention; consecutive layers pair up as Megatron's MLP: even
  layers column-parallel, odd layers row-parallel (with an odd layer count the last layer is
  column-parallel and the loss reduces over the split features).
* ``gpt`` / ``transformer_block``: Megatron as above. The tied embedding ``wte`` [V, D] is
  vocab-parallel, so the tied output projection is too (logits split over the vocabulary).
* ``moe``: tp splits each expert's FFN (F dim) Megatron-style; the gate stays replicated.
* ``wide_resnet_block``: no Megatron structure; the tp analogue splits the output channels
  of the first conv (and the per-channel batch-norm that follows it) and the input channels
  of the second conv, so the only communication is the all-reduce after the second conv.
* ``embedding_model``: vocab-parallel embedding table and vocab-parallel (column-parallel)
  output projection; the small dense layer in between is replicated.
"""
from __future__ import annotations

import itertools
import math
import re
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["TABLES", "STRATEGIES", "baseline_names", "baseline_specs", "baseline_jit",
           "workload_family", "logical_axes"]

# --------------------------------------------------------------------------- logical axes
# Each table: (regex on keystr of the leaf in (params, opt_state, batch), logical axes).

MLP_TABLE = (
    # Megatron pairs: even layers column-parallel, odd layers row-parallel.
    (r"\['layers'\]\[\d*[02468]\]\['w'\]$", ("embed", "mlp")),
    (r"\['layers'\]\[\d*[02468]\]\['b'\]$", ("mlp",)),
    (r"\['layers'\]\[\d*[13579]\]\['w'\]$", ("mlp", "embed")),
    (r"\['layers'\]\[\d*[13579]\]\['b'\]$", ("embed",)),
    (r"^\[2\]\['(x|y)'\]$", ("batch", "embed")),
)

GPT_TABLE = (
    (r"\['wte'\]$", ("vocab", "embed")),                 # vocab-parallel (tied: logits too)
    (r"\['wpe'\]$", ("seq", "embed")),
    (r"\['(wq|wk|wv)'\]$", ("embed", "heads_x_dim")),    # column-parallel q/k/v
    (r"\['wo'\]$", ("heads_x_dim", "embed")),            # row-parallel attention output
    (r"\['w1'\]$", ("embed", "mlp")),                    # column-parallel first MLP kernel
    (r"\['b1'\]$", ("mlp",)),
    (r"\['w2'\]$", ("mlp", "embed")),                    # row-parallel second MLP kernel
    (r"\['b2'\]$", ("embed",)),
    (r"\['(ln1|ln2|ln_f)'\]\['(scale|bias)'\]$", ("norm",)),
    (r"^\[2\]\['tokens'\]$", ("batch", "seq")),
    (r"^\[2\]\['(x|y)'\]$", ("batch", "seq", "embed")),  # transformer_block
)

MOE_TABLE = (
    (r"\['gate'\]$", ("embed", None)),                   # router replicated
    (r"\['w1'\]$", ("exp", "embed", "mlp")),
    (r"\['b1'\]$", ("exp", "mlp")),
    (r"\['w2'\]$", ("exp", "mlp", "embed")),
    (r"\['b2'\]$", ("exp", "embed")),
    (r"^\[2\]\['(x|y)'\]$", ("batch", "seq", "embed")),  # [groups, tokens per group, D]
)

WIDE_RESNET_TABLE = (
    (r"\['bn1'\]\['(scale|bias)'\]$", ("channels",)),
    (r"\['conv1'\]$", (None, None, "channels", "mlp")),  # output channels split under tp
    (r"\['bn2'\]\['(scale|bias)'\]$", ("mlp",)),         # per-channel, follows conv1's split
    (r"\['conv2'\]$", (None, None, "mlp", "channels")),  # input channels split under tp
    (r"^\[2\]\['(x|y)'\]$", ("batch", None, None, "channels")),
)

EMBEDDING_TABLE = (
    (r"\['embed'\]$", ("vocab", "embed")),               # vocab-parallel embedding
    (r"\['dense'\]\['w'\]$", ("embed", "embed_out")),    # small, replicated under tp
    (r"\['dense'\]\['b'\]$", ("embed_out",)),
    (r"\['out'\]\['w'\]$", ("embed", "vocab")),          # vocab-parallel output projection
    (r"\['out'\]\['b'\]$", ("vocab",)),
    (r"^\[2\]\['(ids|labels)'\]$", ("batch",)),
)

TABLES = {
    "mlp": MLP_TABLE,
    "gpt": GPT_TABLE,
    "transformer_block": GPT_TABLE,
    "moe": MOE_TABLE,
    "wide_resnet_block": WIDE_RESNET_TABLE,
    "embedding_model": EMBEDDING_TABLE,
}

# benchmarks.run's configuration names and examples.models' Workload.name variants.
_ALIASES = {
    "mlp_small": "mlp", "mlp_wide": "mlp", "mlp_adam": "mlp",
    "gpt_small": "gpt", "gpt_large": "gpt", "gpt_remat": "gpt", "gpt_1024": "gpt",
    "wide_resnet": "wide_resnet_block", "embedding": "embedding_model",
}

# --------------------------------------------------------------------------- strategies
# logical axis -> mesh-axis role ("all", "data", "model", "replica", "shard"); "fsdp": role params are
# additionally split over on their largest free dim; "mesh_rank": the ranks it applies to.

_TP = {"vocab": "model", "heads_x_dim": "model", "mlp": "model"}

STRATEGIES: dict[str, dict[str, Any]] = {
    "dp": {"rules": {"batch": "all"}, "fsdp": None, "mesh_rank": (1, 2, 3)},
    "fsdp": {"rules": {"batch": "all"}, "fsdp": "all", "mesh_rank": (1, 2, 3)},
    "tp": {"rules": dict(_TP), "fsdp": None, "mesh_rank": (1,)},
    "dp_tp": {"rules": {"batch": "replica", **_TP}, "fsdp": None, "mesh_rank": (2, 3)},
    "fsdp_tp": {"rules": {"batch": "replica", **_TP}, "fsdp": "shard", "mesh_rank": (2, 3)},
    "ep": {"rules": {"batch": "data", "exp": "model"}, "fsdp": None, "mesh_rank": (1, 2)},
    "ep_gshard": {"rules": {"batch": "all", "exp": "model"}, "fsdp": None,
                  "mesh_rank": (2, 3)},
}
_ONLY_FOR = {"ep": ("moe",), "ep_gshard": ("moe",)}


def workload_family(workload_name: str) -> str:
    """The table a workload uses: ``"gpt_large"`` -> ``"gpt"``."""
    family = _ALIASES.get(workload_name, workload_name)
    if family not in TABLES:
        raise ValueError(f"no baseline table for workload {workload_name!r}; known: "
                         f"{sorted(set(TABLES) | set(_ALIASES))}")
    return family


def baseline_names(workload_name: str, mesh_shape: Sequence[int]) -> list[str]:
    """The strategies that apply to ``workload_name`` on a mesh of ``mesh_shape``."""
    family = workload_family(workload_name)
    rank = len(tuple(mesh_shape))
    if rank not in (1, 2, 3):
        raise ValueError(f"baselines are written for 1-D, 2-D and 3-D meshes, got "
                         f"{tuple(mesh_shape)}")
    return [name for name, s in STRATEGIES.items()
            if rank in s["mesh_rank"] and family in _ONLY_FOR.get(name, (family,))]


# --------------------------------------------------------------------------- specs


def logical_axes(table, path: str, ndim: int) -> tuple:
    """Logical axes of the leaf at ``path`` (keystr) with ``ndim`` dims, from ``table``."""
    for pattern, axes in table:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ValueError(f"table row {pattern!r} gives {len(axes)} logical axes to "
                                 f"{path}, which has {ndim} dims")
            return tuple(axes)
    if ndim == 0:
        return ()
    raise KeyError(f"no logical-axes row matches {path} ({ndim} dims)")


def _role_axes(mesh, role: str | None) -> tuple[str, ...]:
    names = tuple(mesh.axis_names)
    if role is None:
        return ()
    shard = names[1:-1] if len(names) > 2 else names[:1]
    return {"all": names, "data": names[:1], "model": names[-1:], "replica": names[:-1],
            "shard": shard}[role]


def _dividing_axes(size: int, axes: tuple[str, ...], mesh_sizes: dict) -> tuple[str, ...]:
    """The largest-product ordered subset of ``axes`` whose product divides ``size``."""
    best: tuple[str, ...] = ()
    for k in range(len(axes), 0, -1):
        for sub in itertools.combinations(axes, k):
            prod = math.prod(mesh_sizes[a] for a in sub)
            if size % prod == 0 and prod > math.prod(mesh_sizes[a] for a in best):
                best = sub
    return best


def _leaf_spec(mesh, strategy: dict, logical: tuple, shape: tuple, is_param: bool):
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    used: set[str] = set()
    dims: list[tuple[str, ...]] = []
    for name, size in zip(logical, shape):
        want = tuple(a for a in _role_axes(mesh, strategy["rules"].get(name)) if a not in used)
        got = _dividing_axes(size, want, sizes)
        used.update(got)
        dims.append(got)
    if is_param and strategy["fsdp"] is not None:
        want = tuple(a for a in _role_axes(mesh, strategy["fsdp"]) if a not in used)
        free = [i for i, d in enumerate(dims) if not d]
        # Largest-product axes subset first, then the largest free dim it divides.
        for k in range(len(want), 0, -1):
            options = []
            for sub in itertools.combinations(want, k):
                prod = math.prod(sizes[a] for a in sub)
                for i in free:
                    if shape[i] % prod == 0:
                        options.append((-prod, -shape[i], i, sub))
            if options:
                _, _, i, sub = min(options)
                dims[i] = sub
                break
    entries = [None if not d else (d[0] if len(d) == 1 else d) for d in dims]
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def baseline_specs(workload, workload_name: str, mesh, strategy: str):
    """PartitionSpecs for ``workload.args`` (a pytree like it) under ``strategy``."""
    family = workload_family(workload_name)
    if strategy not in baseline_names(family, mesh.devices.shape):
        raise ValueError(f"strategy {strategy!r} does not apply to {workload_name!r} on a "
                         f"{tuple(mesh.devices.shape)} mesh; choose from "
                         f"{baseline_names(family, mesh.devices.shape)}")
    table, rule = TABLES[family], STRATEGIES[strategy]

    def spec(path, leaf):
        p = jax.tree_util.keystr(path)
        shape = tuple(leaf.shape)
        return _leaf_spec(mesh, rule, logical_axes(table, p, len(shape)), shape,
                          is_param=not p.startswith("[2]"))

    return jax.tree_util.tree_map_with_path(spec, tuple(workload.args))


def baseline_jit(workload, workload_name: str, mesh, strategy: str, *, donate: bool = True):
    """``(jax.jit(workload.fn, in_shardings=..., out_shardings=..., donate_argnums=(0, 1)),
    in_shardings)`` for ``strategy``.

    Carried outputs (new params, new optimizer state) get their input's sharding; the loss
    is replicated. ``in_shardings`` is a tuple ``(params, opt_state, batch)`` of
    ``NamedSharding`` pytrees, ready for ``jax.device_put(workload.args, in_shardings)``.
    """
    if len(workload.args) != 3 or workload.batch_argnums != (2,):
        raise ValueError("baselines expect a (params, opt_state, batch) training step")
    specs = baseline_specs(workload, workload_name, mesh, strategy)
    in_shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                          is_leaf=lambda x: isinstance(x, PartitionSpec))
    out_shardings = (in_shardings[0], in_shardings[1], NamedSharding(mesh, PartitionSpec()))
    fn = jax.jit(workload.fn, in_shardings=in_shardings, out_shardings=out_shardings,
                 donate_argnums=(0, 1) if donate else ())
    return fn, in_shardings
