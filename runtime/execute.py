"""Evaluate a :class:`Program` with sharding constraints, for use inside ``jax.jit``."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax

from autoshard.ir.jax_compat import bind
from autoshard.ir.program import Literal, Program
from autoshard.ir.trace import struct_of_aval


def evaluate_program(
    program: Program,
    flat_args: Sequence,
    value_shardings: Mapping[int, jax.sharding.Sharding] = {},
    operand_shardings: Mapping[tuple[int, int], jax.sharding.Sharding] = {},
    operand_via: Mapping[tuple[int, int], Sequence[jax.sharding.Sharding]] = {},
    value_via: Mapping[int, Sequence[jax.sharding.Sharding]] = {},
    mesh: jax.sharding.Mesh | None = None,
    loop_bodies: Mapping[int, Callable] = {},
) -> tuple:
    """Run ``program`` on ``flat_args`` and return its flat outputs.

    ``value_shardings[v]`` pins value ``v`` (right after it is produced) with
    ``jax.lax.with_sharding_constraint``, after each layout of ``value_via[v]`` in turn;
    ``operand_shardings[(e, k)]`` pins operand ``k`` of equation ``e`` right before that
    equation reads it, so an operand the plan reshards is resharded exactly as planned;
    ``operand_via[(e, k)]`` pins it to each of those layouts first, in order (the copy
    other readers share, the steps of the planned resharding: XLA then runs those, not a
    route of its own).

    With ``mesh`` (the one the program runs on), the program's own sharding constraints
    written for another mesh of the same axis names (the whole mesh, when the program is
    a pipeline stage on a sub-mesh of it) constrain the same axes of ``mesh``.

    ``loop_bodies[e]``: the function scan equation ``e`` runs as its body instead of its
    own (the same computation, its layouts pinned).
    """
    params = {e: _on_mesh(eqn.params, mesh) for e, eqn in enumerate(program.eqns)
              if mesh is not None and eqn.primitive.name == "sharding_constraint"}
    for e, body in loop_bodies.items():
        own = program.eqns[e].params
        structs = [struct_of_aval(a) for a in own["jaxpr"].in_avals]
        params[e] = dict(own, jaxpr=jax.make_jaxpr(body)(*structs))
    env: dict[int, object] = {}

    def write(vid, val):
        for layout in value_via.get(vid, ()):
            val = jax.lax.with_sharding_constraint(val, layout)
        sharding = value_shardings.get(vid)
        if sharding is not None:
            val = jax.lax.with_sharding_constraint(val, sharding)
        env[vid] = val

    def read(atom):
        return atom.value if isinstance(atom, Literal) else env[atom]

    for vid, const in program.constants:
        write(vid, const)
    for vid, arg in zip(program.invars, flat_args, strict=True):
        write(vid, arg)
    # a value resharded through the same layouts for several readers is resharded once
    # and shared, as planned (XLA does not merge collectives it was asked for twice)
    resharded: dict[tuple, object] = {}
    for e, eqn in enumerate(program.eqns):
        invals = []
        for k, atom in enumerate(eqn.inputs):
            val = read(atom)
            chain = tuple(operand_via.get((e, k), ()))
            sharding = operand_shardings.get((e, k))
            if sharding is not None:
                chain += (sharding,)
            for i, layout in enumerate(chain):
                key = (atom, chain[:i + 1])
                if isinstance(atom, Literal):
                    val = jax.lax.with_sharding_constraint(val, layout)
                elif key in resharded:
                    val = resharded[key]
                else:
                    val = resharded[key] = jax.lax.with_sharding_constraint(val, layout)
            invals.append(val)
        outs = bind(eqn.primitive, params.get(e, eqn.params), invals, eqn.source_info)
        for vid, val in zip(eqn.outputs, outs, strict=True):
            write(vid, val)
    return tuple(read(atom) for atom in program.outvars)


def _on_mesh(params: dict, mesh: jax.sharding.Mesh) -> dict:
    """A ``sharding_constraint``'s ``params`` moved onto ``mesh`` when written for another
    mesh of its axis names (unchanged otherwise)."""
    sharding = params["sharding"]
    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh == mesh or \
            tuple(sharding.mesh.axis_names) != tuple(mesh.axis_names):
        return params
    moved = jax.sharding.NamedSharding(mesh, sharding.spec)
    context = params.get("context_mesh")
    return {**params, "sharding": moved,
            "context_mesh": context if context is None or context.empty else mesh.abstract_mesh}
