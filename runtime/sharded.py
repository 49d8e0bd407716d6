"""Turn a :class:`Program` and its sharding decisions into a jitted, sharded callable."""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from autoshard.ir.call import dynamic_arguments
from autoshard.ir.program import Program

from .execute import evaluate_program


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedProgram:
    """A program compiled for one mesh with fixed input/output shardings.

    Call it with the flat list of arguments; host arrays and arrays placed
    elsewhere are moved onto the mesh with the planned sharding first.
    """

    mesh: jax.sharding.Mesh
    in_shardings: tuple[NamedSharding, ...]
    out_shardings: tuple[NamedSharding, ...]
    jitted: object
    in_avals: tuple        # the program's argument avals (what lower() lowers for)
    run: Callable = None   # flat arguments -> flat outputs, traced under jax.jit

    def place(self, flat_args: Sequence) -> list:
        """Put every argument on the mesh with its planned sharding (no-op when it already is).

        On a mesh spanning several processes (``jax.distributed``), a global array is
        resharded, and a host value or process-local array is taken to be the whole
        value, the same in every process: each process fills its own devices' shards
        from it (see :func:`place_global`).
        """
        placed = []
        for arg, sharding in zip(flat_args, self.in_shardings, strict=True):
            if isinstance(arg, jax.core.Tracer):  # called under the caller's jit or vmap:
                placed.append(arg)                # the program's in_shardings place it
            elif isinstance(arg, jax.Array) and arg.sharding == sharding:
                placed.append(arg)
            elif sharding.is_fully_addressable or (
                    isinstance(arg, jax.Array) and not arg.is_fully_addressable):
                placed.append(jax.device_put(arg, sharding))
            else:
                placed.append(place_global(arg, sharding))
        return placed

    def __call__(self, flat_args: Sequence) -> list:
        return self.jitted(*self.place(flat_args))

    def for_call(self, args: Sequence, static: Sequence[int], donate: Sequence[int],
                 out_tree) -> Callable:
        """This program as a ``jax.jit`` called the way the function was: ``fn(*args)``
        with ``args`` laid out as in the call it was made for (pytrees; static arguments in
        place, at the positions ``static``; ``donate`` among them donated), returning the
        output pytree (``out_tree``). jax's own dispatch flattens the arguments, checks
        their shardings and moves those not yet on any device: no Python of ours runs per
        step. Called with other trees, shapes, dtypes or static values it raises
        :class:`SignatureChanged` while tracing, before anything runs; jax itself raises
        ``ValueError`` for an argument committed to a sharding it will not move."""
        static = tuple(static)
        expected_static = tuple(args[i] for i in static)
        expected_tree = jax.tree_util.tree_structure(dynamic_arguments(args, static))
        expected_avals = tuple((a.shape, a.dtype, bool(getattr(a, "weak_type", False)))
                               for a in self.in_avals)
        run = self.run

        def body(*call_args):
            if tuple(call_args[i] for i in static) != expected_static:
                raise SignatureChanged("static arguments")
            leaves, tree = jax.tree_util.tree_flatten(dynamic_arguments(call_args, static))
            types = [jax.typeof(leaf) for leaf in leaves]
            avals = tuple((x.shape, x.dtype, bool(x.weak_type)) for x in types)
            if tree != expected_tree or avals != expected_avals:
                raise SignatureChanged("argument trees, shapes or dtypes")
            if any(typed_sharding(x) for x in types):
                raise SignatureChanged("arguments whose type carries a sharding")
            return jax.tree_util.tree_unflatten(out_tree, run(*leaves))

        in_shardings = tuple(jax.tree_util.tree_unflatten(expected_tree, self.in_shardings))
        out_shardings = jax.tree_util.tree_unflatten(out_tree, self.out_shardings)
        return jax.jit(body, in_shardings=in_shardings, out_shardings=out_shardings,
                       static_argnums=static, donate_argnums=tuple(donate))

    def argument_structs(self) -> list:
        """A ``jax.ShapeDtypeStruct`` per flat argument: shape, dtype, weak type and the
        planned sharding (for lowering; no devices touched)."""
        return [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s,
                                     weak_type=getattr(a, "weak_type", False))
                for a, s in zip(self.in_avals, self.in_shardings, strict=True)]

    def lower(self):
        """``jax.stages.Lowered`` for arguments of the shapes the program was traced with
        (no devices touched)."""
        return self.jitted.lower(*self.argument_structs())


def typed_sharding(aval) -> bool:
    """Whether ``aval`` carries a sharding in its type: an array laid out over a mesh of
    ``Explicit`` axes (what ``jax.make_mesh`` makes by default). Its type would follow it
    into the program, whose ops then type-check their operands' shardings (a dot of two
    operands split on the contracted dim is an error); placed with the planned sharding
    first (on the program's ``Auto`` mesh), it runs as planned."""
    spec = getattr(getattr(aval, "sharding", None), "spec", None)
    return spec is not None and any(entry is not None for entry in spec)


def instead_of_explicit(mesh):
    """A context in which ``mesh`` (a ``Mesh`` or ``AbstractMesh`` of Auto axes) is the
    abstract mesh when the caller's is one of Explicit axes (``jax.set_mesh`` of
    ``jax.make_mesh``'s default): traced there, the program's ops would type-check their
    operands against the caller's axes. Any other caller's mesh (none, or one of Auto
    axes, whose bare PartitionSpecs the step may use) is kept."""
    current = jax.sharding.get_abstract_mesh()
    if not any(t == AxisType.Explicit for t in current.axis_types):
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh))


def outside_other_meshes(mesh):
    """A context that sets the caller's mesh aside (``jax.set_mesh(None)``) while a program
    on ``mesh`` runs, when the caller set a mesh of other devices: jax refuses to run a
    program whose arguments lie on devices its context mesh does not hold. A caller's mesh
    of the same devices is kept (its bare PartitionSpecs may be the step's), and so is any
    under the caller's own ``jax.jit``, where a mesh cannot be set."""
    try:
        current = jax.sharding.get_mesh()
    except ValueError:  # under the caller's trace
        return contextlib.nullcontext()
    if current.empty or set(current.devices.flat) == set(mesh.devices.flat):
        return contextlib.nullcontext()
    return jax.set_mesh(None)


def with_auto_axes(mesh):
    """``mesh`` (a ``Mesh`` or ``AbstractMesh``) with every axis ``AxisType.Auto``: the same
    object when they all are. autoshard lays out every value itself, as ``jax.jit`` does on
    Auto axes; a mesh of Explicit axes (``jax.make_mesh``'s default) would put each layout
    in the values' types, where the program's ops check them."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    auto = (AxisType.Auto,) * len(mesh.axis_names)
    if isinstance(mesh, jax.sharding.Mesh):
        return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
    return AbstractMesh(tuple(mesh.axis_sizes), tuple(mesh.axis_names), axis_types=auto)


def untyped(value):
    """``value``, an array whose type carries a sharding (see :func:`typed_sharding`), laid
    out the same on a mesh of the same devices and ``Auto`` axes (the layout kept, no
    data moved); any other value as it is. Eager ops on it (the pipeline's split of a
    batch into microbatches) then see a plain array, as on a mesh of ``Auto`` axes."""
    if not isinstance(value, jax.Array) or not typed_sharding(jax.typeof(value)):
        return value
    return jax.device_put(value, NamedSharding(with_auto_axes(value.sharding.mesh),
                                               value.sharding.spec))


class SignatureChanged(Exception):
    """Raised while tracing :meth:`ShardedProgram.for_call` for arguments the program was
    not made for: plan (or look up the plan) for them instead."""


def place_global(value, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global ``jax.Array`` with ``sharding`` from a value every process holds in full.

    Each process copies only the shards of its own devices; nothing is communicated
    and nothing checks that the processes' values agree (``jax.device_put`` would
    all-gather every argument to check).
    """
    host = np.asarray(jax.device_get(value))
    dtype = jax.dtypes.canonicalize_dtype(host.dtype)
    if host.dtype != dtype:
        host = host.astype(dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index],
                                        dtype=host.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class PinnedLoop:
    """The layouts pinned inside a loop's body: ``program`` the body as a program of its
    own (inputs its consts, carries and one step of its stacked operands; outputs its
    carries and one step of its results), a spec per input and output (each pinned after
    the layouts of ``in_via`` / ``out_via``, in turn), its intermediates and operands as
    :func:`evaluate_program` pins them."""

    program: Program
    in_specs: Sequence[PartitionSpec]
    out_specs: Sequence[PartitionSpec]
    value_specs: Mapping[int, PartitionSpec] = dataclasses.field(default_factory=dict)
    operand_specs: Mapping[tuple[int, int], PartitionSpec] = dataclasses.field(default_factory=dict)
    operand_via: Mapping[tuple[int, int], Sequence[PartitionSpec]] = dataclasses.field(
        default_factory=dict)
    value_via: Mapping[int, Sequence[PartitionSpec]] = dataclasses.field(default_factory=dict)
    in_via: Sequence[Sequence[PartitionSpec]] = ()
    out_via: Sequence[Sequence[PartitionSpec]] = ()


def _pinned_body(loop: PinnedLoop, mesh) -> Callable:
    """``loop``'s body as a function of its inputs, its layouts pinned on ``mesh``."""
    named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    values = {v: named(s) for v, s in loop.value_specs.items()}
    operands = {k: named(s) for k, s in loop.operand_specs.items()}
    via = {k: tuple(named(s) for s in chain) for k, chain in loop.operand_via.items()}
    made_via = {v: tuple(named(s) for s in chain) for v, chain in loop.value_via.items()}

    def pinned(vals, specs, chains):
        chains = list(chains) or [()] * len(specs)
        out = []
        for val, spec, chain in zip(vals, specs, chains, strict=True):
            for layout in (*chain, spec):
                val = jax.lax.with_sharding_constraint(val, named(layout))
            out.append(val)
        return out

    def body(*args):
        outs = evaluate_program(loop.program, pinned(args, loop.in_specs, loop.in_via), values,
                                operands, via, made_via, mesh=mesh)
        return pinned(outs, loop.out_specs, loop.out_via)
    return body


def shard_program(
    program: Program,
    mesh: jax.sharding.Mesh,
    in_specs: Sequence[PartitionSpec],
    out_specs: Sequence[PartitionSpec],
    value_specs: Mapping[int, PartitionSpec] = {},
    operand_specs: Mapping[tuple[int, int], PartitionSpec] = {},
    donate_argnums: Sequence[int] = (),
    operand_via: Mapping[tuple[int, int], Sequence[PartitionSpec]] = {},
    value_via: Mapping[int, Sequence[PartitionSpec]] = {},
    loops: Mapping[int, PinnedLoop] = {},
) -> ShardedProgram:
    """Jit ``program`` on ``mesh`` so that XLA executes exactly the given shardings.

    ``in_specs``/``out_specs`` are per flat argument/output; ``value_specs`` and
    ``operand_specs`` (and ``operand_via``, ``value_via``) become ``with_sharding_constraint`` on
    intermediates (see :func:`evaluate_program`). ``donate_argnums`` index flat arguments.
    ``loops``: scan equation -> the layouts pinned inside its body (:class:`PinnedLoop`).
    """
    named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    in_shardings = tuple(named(s) for s in in_specs)
    out_shardings = tuple(named(s) for s in out_specs)
    value_shardings = {v: named(s) for v, s in value_specs.items()}
    operand_shardings = {k: named(s) for k, s in operand_specs.items()}
    via_shardings = {k: tuple(named(s) for s in chain) for k, chain in operand_via.items()}
    made_via = {v: tuple(named(s) for s in chain) for v, chain in value_via.items()}

    def run(*flat_args):
        with instead_of_explicit(mesh):
            return evaluate_program(program, flat_args, value_shardings, operand_shardings,
                                    via_shardings, made_via, mesh=mesh,
                                    loop_bodies={e: _pinned_body(loop, mesh)
                                                 for e, loop in loops.items()})

    jitted = jax.jit(run, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=tuple(donate_argnums))
    return ShardedProgram(mesh, in_shardings, out_shardings, jitted,
                          tuple(program.avals[v] for v in program.invars), run)
