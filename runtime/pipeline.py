"""Running a pipeline: stage programs on sub-meshes, a micro-batch loop, gradient
accumulation and per-stage apply-gradient programs.

Values are named by keys: ``("v", id)`` a step-level value of the outer program (an
argument, a constant, a result of the pre-gradient program, the gradients, an output),
``("mb", id)`` one micro-batch of a batch argument, ``("act", id)`` one micro-batch's
activation made by a stage, ``("ct", id)`` its cotangent. Arrays move between sub-meshes
with :func:`~.transfer.move` (``jax.device_put``, also across ``jax.distributed``
processes); dispatch is asynchronous, so stages on different devices overlap.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .schedule import dispatch_order
from .sharded import ShardedProgram, untyped
from .transfer import as_global, move

Key = tuple


def _run(program: ShardedProgram, args) -> list:
    """``program`` on ``args``, each moved to its input's sharding first (:func:`move`)."""
    return program.jitted(*[move(a, s) for a, s in zip(args, program.in_shardings, strict=True)])


@jax.jit
def _add_all(accumulated, new):
    """One program per stage adds a micro-batch's gradients to the running sums."""
    return [a + b for a, b in zip(accumulated, new)]


def _combined(values, kind: str = "mean"):
    """The micro-batches' values combined into the whole batch's: ``"mean"`` (averaged) or
    ``"sum"``, summed in micro-batch order like the loss; ``"max"`` / ``"min"``; ``"rows"``
    (one value per row: concatenated on the first dim, in micro-batch order)."""
    if kind == "rows":
        return jax.numpy.concatenate(values, axis=0)
    fold = {"max": jax.numpy.maximum, "min": jax.numpy.minimum}.get(kind, operator.add)
    total = values[0]
    for value in values[1:]:
        total = fold(total, value)
    return total / len(values) if kind == "mean" and len(values) > 1 else total


@dataclasses.dataclass(frozen=True, eq=False)
class PipelineStage:
    """One stage: its forward and backward programs and where their values go.

    ``forward(inputs) → outputs + residuals``; ``backward(inputs[backward_inputs] +
    residuals + cotangents of outputs[cotangent_outputs]) → one gradient per
    ``grad_targets`` entry`` (``("ct", id)``: an activation's cotangent, sent back to the
    stage that made it; ``("v", id)``: a gradient, accumulated over micro-batches).
    ``partial``: positions in ``grad_targets`` of gradients the backward returns as
    per-device partial sums (a leading dim, one entry per device group); they are
    accumulated as they are and ``reduce`` sums them once per step.
    """

    forward: ShardedProgram
    backward: ShardedProgram
    inputs: tuple[Key, ...]
    outputs: tuple[Key, ...]
    cotangent_outputs: tuple[int, ...]
    backward_inputs: tuple[int, ...]
    grad_targets: tuple[Key, ...]
    reduce: ShardedProgram | None = None
    partial: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class StepProgram:
    """A program run once per step: reads and writes step-level keys."""

    program: ShardedProgram
    inputs: tuple[Key, ...]
    outputs: tuple[Key, ...]
    name: str = "step program"   # "pre-gradient", "apply on stage 0", "apply on the mesh"


@dataclasses.dataclass(frozen=True, eq=False)
class PipelineProgram:
    """The whole pipelined step. ``loss``: ``(activation key, step key)``: the micro-batch
    losses are averaged into the step key (summed, the gradient with them, where
    ``loss_sum``: a sum over the batch); every ``aux`` triple's activation (an output of the
    last stage) is combined into its step key as its kind says (``"mean"``, ``"sum"``,
    ``"max"``, ``"min"``: ``pipeline.microbatch_outputs``); an ``aux_once`` pair's
    activation is the same in every micro-batch (it does not depend on the batch): the
    first micro-batch's value is taken, whatever its dtype. ``zero_grads``: ``(step key, shape, dtype)`` for
    gradients no stage produces. ``outputs``: a step key or ``("literal", value)`` per flat
    output. ``cotangents`` (a loss of several combined values, under GPipe): run once every
    micro-batch's forward has, on the loss's and the aux leaves' totals; its output
    ``("head ct", v)`` is the cotangent of the last stage's output ``("act", v)`` in every
    micro-batch's backward (the loss's too, in place of 1 or ``1 / B``)."""

    invars: tuple[Key, ...]
    batch: tuple[tuple[Key, Key], ...]     # (step key of a batch argument, its micro key)
    constants: tuple[tuple[Key, Any], ...]
    pre: tuple[StepProgram, ...]
    stages: tuple[PipelineStage, ...]
    loss: tuple[Key, Key]
    zero_grads: tuple[tuple[Key, tuple, Any], ...]
    apply: tuple[StepProgram, ...]
    outputs: tuple[Key, ...]
    num_microbatches: int
    schedule: str
    aux: tuple[tuple[Key, Key, str], ...] = ()
    loss_sum: bool = False
    donated: tuple[int, ...] = ()          # positions of donated arguments
    aux_once: tuple[tuple[Key, Key], ...] = ()
    mesh: Any = None    # the whole mesh (multi-process runs: where scalar outputs go)
    cotangents: StepProgram | None = None
    forward_only: bool = False   # a step without a gradient: no backward program runs

    def __call__(self, flat_args) -> list:
        # each program runs on its own sub-mesh: a mesh the caller set (``jax.set_mesh``,
        # usually the whole one) would be the context of every jit call and placement
        with jax.set_mesh(None):
            return self._run_step(flat_args)

    def _run_step(self, flat_args) -> list:
        B = self.num_microbatches
        multiprocess = jax.process_count() > 1
        if multiprocess:
            known = {frozenset(p.mesh.devices.flat) for _, p, _ in self.programs()} | \
                {frozenset(self.mesh.devices.flat)}
            flat_args = [as_global(a, known) for a in flat_args]
        env: dict = dict(self.constants)
        env.update(zip(self.invars, map(untyped, flat_args), strict=True))
        for step in self.pre:
            env.update(zip(step.outputs, _run(step.program, [env[k] for k in step.inputs])))
        micro: list[dict] = [{} for _ in range(B)]
        for key, mkey in self.batch:
            x = env[key]
            shape = np.shape(x)
            parts = x.reshape((B, shape[0] // B) + tuple(shape[1:]))
            for m in range(B):
                micro[m][mkey] = parts[m]
        cts: list[dict] = [{} for _ in range(B)]
        saved: dict = {}
        placed: dict = {}
        acc: dict = {}
        act_loss, step_loss = self.loss
        last = len(self.stages) - 1
        aux_values: dict = {skey: [] for _, skey, _ in self.aux}
        head_cts = {} if self.cotangents is None else \
            {("act",) + key[1:]: key for key in self.cotangents.outputs}

        def totals():
            """The loss's and aux leaves' totals over the micro-batches (each micro-batch
            keeps its loss), once every micro-batch's forward has run."""
            env[step_loss] = _combined([micro[m][act_loss] for m in range(B)],
                                       "sum" if self.loss_sum else "mean")
            for _, skey, kind in self.aux:
                env[skey] = _combined(aux_values[skey], kind)

        def add(store, key, value):
            old = store.get(key)
            if old is None:
                store[key] = value
            else:
                store[key] = old + move(value, old.sharding)

        for kind, s, m in dispatch_order(len(self.stages), B, self.schedule):
            st = self.stages[s]
            if kind == "F":
                ins = []
                for k, (key, sharding) in enumerate(zip(st.inputs, st.forward.in_shardings)):
                    if key[0] in ("mb", "act"):
                        ins.append(move(micro[m][key], sharding))
                        continue
                    if (s, key) not in placed:  # step-level values move once per step
                        placed[(s, key)] = move(env[key], sharding)
                    ins.append(placed[(s, key)])
                outs = st.forward.jitted(*ins)
                n = len(st.outputs)
                micro[m].update(zip(st.outputs, outs[:n]))
                if s == last:
                    for akey, skey, _ in self.aux:
                        aux_values[skey].append(micro[m][akey])
                    for akey, skey in self.aux_once:
                        env.setdefault(skey, micro[m][akey])
                saved[(s, m)] = ([ins[p] for p in st.backward_inputs], list(outs[n:]))
                continue
            kept, residuals = saved.pop((s, m))
            if self.forward_only:   # the next stage has read this micro-batch's outputs
                for key in st.outputs:
                    if key != act_loss:
                        micro[m].pop(key, None)
                continue
            cot = []
            for p in st.cotangent_outputs:
                key = st.outputs[p]
                if key in head_cts:
                    if head_cts[key] not in env:   # the heads' cotangents, from the totals
                        if any(len(values) != B for values in aux_values.values()):
                            raise RuntimeError("a loss of several combined values needs every "
                                               "micro-batch's forward before the backward "
                                               "passes")
                        totals()
                        step = self.cotangents
                        env.update(zip(step.outputs,
                                       _run(step.program, [env[k] for k in step.inputs])))
                    cot.append(env[head_cts[key]])
                elif key == act_loss:
                    cot.append(np.asarray(1.0 if self.loss_sum else 1.0 / B,
                                          dtype=micro[m][key].dtype))
                else:
                    ct = cts[m].pop(("ct",) + key[1:], None)
                    cot.append(ct if ct is not None else jax.numpy.zeros_like(micro[m][key]))
            grads = _run(st.backward, kept + residuals + cot)
            for key in st.outputs:  # every later stage has run this micro-batch's forward
                if key != act_loss:
                    micro[m].pop(key, None)
            params = []
            for target, g in zip(st.grad_targets, grads, strict=True):
                if target[0] == "ct":
                    add(cts[m], target, g)
                else:
                    params.append(((s, target), g))
            if params:
                keys = [k for k, _ in params]
                if keys[0] in acc:
                    acc.update(zip(keys, _add_all([acc[k] for k in keys],
                                                  [g for _, g in params])))
                else:
                    acc.update(params)
        if step_loss not in env:   # (not already, for the heads' cotangents)
            totals()
        for s, st in enumerate(self.stages):   # partial sums: one reduction per step
            keys = [(s, st.grad_targets[j]) for j in st.partial]
            if keys and keys[0] in acc:
                acc.update(zip(keys, _run(st.reduce, [acc[k] for k in keys])))
        for (s, key), value in sorted(acc.items(), key=lambda kv: kv[0][0]):
            add(env, key, value)
        for key, shape, dtype in self.zero_grads:
            env.setdefault(key, jax.numpy.zeros(shape, dtype))
        for step in self.apply:
            env.update(zip(step.outputs, _run(step.program, [env[k] for k in step.inputs])))
        results = [k[1] if k[0] == "literal" else env[k] for k in self.outputs]
        if multiprocess:   # a scalar (the loss, a metric) readable in every process
            whole = NamedSharding(self.mesh, PartitionSpec())
            results = [move(r, whole) if isinstance(r, jax.Array) and r.ndim == 0 else r
                       for r in results]
        returned = {id(r) for r in results}
        for k in self.donated:  # as jax.jit: a donated array is unusable after the call
            arg = flat_args[k]
            if isinstance(arg, jax.Array) and not arg.is_deleted() and id(arg) not in returned:
                arg.delete()
        return results

    def programs(self) -> list[tuple[str, ShardedProgram, int]]:
        """``(name, program, runs per step)`` of every program the step runs, in order."""
        B = self.num_microbatches
        out = [(p.name, p.program, 1) for p in self.pre]
        for s, st in enumerate(self.stages):
            out.append((f"stage {s} forward", st.forward, B))
            if not self.forward_only:
                out.append((f"stage {s} backward", st.backward, B))
        out += [(f"stage {s} gradient reduction", st.reduce, 1)
                for s, st in enumerate(self.stages) if st.reduce is not None]
        if self.cotangents is not None:
            out.append((self.cotangents.name, self.cotangents.program, 1))
        return out + [(p.name, p.program, 1) for p in self.apply]

    def lower(self) -> "PipelineLowered":
        """Every program lowered for its sub-mesh and shapes (see :class:`PipelineLowered`)."""
        programs = self.programs()
        return PipelineLowered(tuple((name, prog.lower(), n) for name, prog, n in programs),
                               self.num_microbatches, self.schedule,
                               {name: tuple(int(d.id) for d in prog.mesh.devices.flat)
                                for name, prog, _ in programs})


class _Programs:
    """Name-keyed access shared by :class:`PipelineLowered` and :class:`PipelineCompiled`."""

    def __init__(self, items, num_microbatches: int, schedule: str,
                 device_ids: dict[str, tuple[int, ...]]):
        self._items = tuple(items)
        self.num_microbatches = num_microbatches
        self.schedule = schedule
        self.device_ids = dict(device_ids)  # name -> ids of the devices that program runs on

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self._items)

    @property
    def runs_per_step(self) -> dict[str, int]:
        """How many times each program runs in one step (stages: once per micro-batch)."""
        return {name: n for name, _, n in self._items}

    def __getitem__(self, name: str):
        for n, value, _ in self._items:
            if n == name:
                return value
        raise KeyError(f"no program named {name!r}; the pipeline's programs are "
                       f"{list(self.names)}")

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self._items)

    def items(self):
        return [(name, value) for name, value, _ in self._items]

    def as_text(self) -> str:
        """Every program's text, each under a ``// ----- name (runs N× per step)`` header."""
        return "\n".join(f"// ----- {name} (runs {n}x per step)\n{value.as_text()}"
                         for name, value, n in self._items)

    def __repr__(self):
        return (f"{type(self).__name__}({len(self)} programs, {self.num_microbatches} "
                f"micro-batches, schedule {self.schedule}: {', '.join(self.names)})")


class PipelineLowered(_Programs):
    """``lower()`` of a pipelined step: one ``jax.stages.Lowered`` per program it runs
    (pre-gradient, each stage's forward and backward for one micro-batch on its sub-mesh,
    the apply-gradient programs), by name: ``lowered["stage 0 forward"]``,
    ``lowered.names``, ``lowered.runs_per_step``, ``lowered.as_text()``,
    ``lowered.compile()``."""

    def compile(self, compiler_options=None) -> "PipelineCompiled":
        return PipelineCompiled(tuple((name, value.compile(compiler_options=compiler_options), n)
                                      for name, value, n in self._items),
                                self.num_microbatches, self.schedule, self.device_ids)


class PipelineCompiled(_Programs):
    """The compiled programs of a pipelined step, by name (``jax.stages.Compiled`` each).
    ``cost_analysis()`` / ``memory_analysis()`` give a dict name → that program's
    analysis; a stage's figures are for one micro-batch (``runs_per_step`` says how often
    each program runs)."""

    def cost_analysis(self) -> dict:
        return {name: value.cost_analysis() for name, value, _ in self._items}

    def memory_analysis(self) -> dict:
        return {name: value.memory_analysis() for name, value, _ in self._items}
