"""Is the compiled program the priced plan? A plan lists the collectives it pays for (kind,
mesh axes, result bytes per device) and the flops and bytes its compute prices; the audit
reads the same from the compiled program (its HLO text and ``cost_analysis``) and lists
every difference:

* collectives XLA emits that the plan did not price (unexpected), or prices that XLA
  does not emit (missing), per kind and set of mesh axes;
* differing bytes (beyond 2 % and 1 KiB), or counts (XLA merges independent
  all-reduces into one, so fewer all-reduces are not a difference; fewer of another kind
  are: XLA ran one where the plan priced several);
* "Involuntary full rematerialization": XLA replicating a tensor and slicing it because
  it cannot reshard directly (read from the compiler's log when the caller captured it);
* the compiled flops and bytes accessed against the modelled ones (reported, and a
  difference beyond 25 %).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from autoshard.cost_model import format_bytes
from autoshard.ir import hlo

BYTES_RTOL, BYTES_ATOL = 0.02, 1024
WORK_RTOL = 0.25
#: flops or bytes below which modelled and compiled work are not compared: the scalar
#: programs of a step (a masked mean from its totals: 24 bytes modelled, 40 compiled)
WORK_ATOL = 1024


@dataclasses.dataclass(frozen=True)
class CollectiveRow:
    """The collectives of one ``kind`` over mesh ``axes``: planned and compiled (count,
    result bytes per device)."""

    kind: str
    axes: tuple[str, ...]
    planned_count: int
    planned_bytes: int
    compiled_count: int
    compiled_bytes: int

    def __repr__(self):
        return (f"{self.kind}[{','.join(self.axes)}]: planned {self.planned_count}× "
                f"{format_bytes(self.planned_bytes)}, compiled {self.compiled_count}× "
                f"{format_bytes(self.compiled_bytes)}")


@dataclasses.dataclass(frozen=True)
class Audit:
    """What :meth:`Plan.audit` found. ``differences`` is empty when the compiled program
    runs the collectives the plan priced; ``flops`` and ``bytes_accessed`` are (modelled,
    compiled) per device."""

    rows: tuple[CollectiveRow, ...]
    differences: tuple[str, ...]
    flops: tuple[float, float]
    bytes_accessed: tuple[float, float]
    rematerializations: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.differences

    def __repr__(self):
        return f"Audit({_verdict(self.differences, 'ok')}, {len(self.rows)} collective kinds)"

    def summary(self) -> str:
        """One line per collective kind and set of axes, then every difference."""
        lines = [f"audit: {_verdict(self.differences, 'the compiled program runs what the plan priced')}"]
        lines += [f"  {row!r}" for row in self.rows]
        lines.append(f"  flops per device: modelled {self.flops[0]:.4g}, compiled "
                     f"{self.flops[1]:.4g}; bytes accessed: modelled "
                     f"{format_bytes(self.bytes_accessed[0])}, compiled "
                     f"{format_bytes(self.bytes_accessed[1])}")
        lines += [f"  difference: {d}" for d in self.differences]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class PipelineAudit:
    """What :meth:`Plan.audit` found for a pipeline: an :class:`Audit` per program the
    step runs (``"stage 0"``: its forward and backward programs together, one
    micro-batch; ``"stage 0 gradient reduction"``: the once-per-step reduction of its
    deferred gradient collectives, collectives only; ``"pre-gradient"``, ``"apply on
    stage 1"``...), each against the part of the plan that program prices."""

    programs: tuple[tuple[str, Audit], ...]
    rematerializations: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def differences(self) -> tuple[str, ...]:
        return tuple(f"{name}: {d}" for name, report in self.programs
                     for d in report.differences) + tuple(
            f"XLA rematerialized a tensor it could not reshard: {line}"
            for line in self.rematerializations)

    def __getitem__(self, name: str) -> Audit:
        return dict(self.programs)[name]

    def __repr__(self):
        return f"PipelineAudit({_verdict(self.differences, 'ok')}, {len(self.programs)} programs)"

    def summary(self) -> str:
        """Each program's :meth:`Audit.summary`, under its name."""
        verdict = _verdict(self.differences, "every program runs what the plan priced")
        lines = [f"audit of a pipeline: {verdict}"]
        for name, report in self.programs:
            lines.append(f"{name}:")
            lines += ["  " + line for line in report.summary().splitlines()]
        lines += [f"  difference: XLA rematerialized a tensor it could not reshard: {line}"
                  for line in self.rematerializations]
        return "\n".join(lines)


#: the once-per-step collectives of a stage (its deferred gradient reductions) are named
#: ``"stage s: op once per step"`` in a pipeline plan, and run in this program
ONCE_PER_STEP = " once per step"


def audit_pipeline(plan, compiled: Mapping[str, tuple[str, dict]],
                   compiler_log: str | None = None,
                   reduce_scatter_as_all_reduce: bool = False) -> PipelineAudit:
    """Compare each program of ``plan`` (a pipeline's) with its compiled programs:
    ``compiled`` maps the runtime's program names (``"stage 0 forward"``, ``"stage 0
    backward"``, ``"stage 0 gradient reduction"``, ``"pre-gradient"``, ``"apply on stage
    0"``...) to (HLO text, ``cost_analysis``). A stage's forward and backward programs are
    compared together with the stage's plan (one micro-batch; a step run forward only has
    no backward programs); each runs on the program's own sub-mesh, whose axes the plan's
    collectives name."""
    reports = []
    for program in plan.programs:
        stage = program.name.startswith("stage ")
        parts = [f"{program.name} forward", f"{program.name} backward"] if stage \
            else [program.name]
        own = tuple(c for c in plan.collectives if c.op.startswith(program.name + ": ")
                    and not c.op.endswith(ONCE_PER_STEP))
        shape = program.mesh_shape or plan.mesh_shape
        cost = dataclasses.replace(plan.cost, flops=program.flops,
                                   bytes_accessed=program.bytes_accessed)
        reports.append((program.name, _audit_parts(
            dataclasses.replace(plan, mesh_shape=shape, collectives=own, cost=cost,
                                programs=()),
            [compiled[p] for p in parts if p in compiled], reduce_scatter_as_all_reduce)))
        reduction = f"{program.name} gradient reduction"
        deferred = tuple(c for c in plan.collectives if c.op.startswith(program.name + ": ")
                         and c.op.endswith(ONCE_PER_STEP))
        if stage and (deferred or reduction in compiled):
            text = compiled[reduction][0] if reduction in compiled else ""
            reports.append((reduction, audit(
                dataclasses.replace(plan, mesh_shape=shape, collectives=deferred,
                                    programs=()),
                text, {}, reduce_scatter_as_all_reduce=reduce_scatter_as_all_reduce)))
    log = compiler_log or ""
    return PipelineAudit(tuple(reports), tuple(
        line.strip() for line in log.splitlines()
        if "Involuntary full rematerialization" in line))


def _audit_parts(plan, parts: Sequence[tuple[str, dict]],
                 reduce_scatter_as_all_reduce: bool) -> Audit:
    """:func:`audit` of ``plan`` against several compiled programs taken as one: their
    collectives together, their flops and bytes summed."""
    work = {key: sum(max(0.0, float(analysis.get(key, 0.0))) for _, analysis in parts)
            for key in ("flops", "bytes accessed")}
    return audit(plan, "\n".join(text for text, _ in parts), work,
                 reduce_scatter_as_all_reduce=reduce_scatter_as_all_reduce)


def _verdict(differences: Sequence[str], clean: str) -> str:
    return f"{len(differences)} difference(s)" if differences else clean


def refuse_pipeline(plan) -> None:
    """``ValueError`` with advice when ``plan`` is a pipeline's (several programs):
    :func:`audit_pipeline` compares those."""
    if plan.programs:
        raise ValueError("audit compares one program with its plan; a pipeline plan runs "
                         "several: audit it with plan.audit(step.lower(*args).compile()), "
                         "which compares each of its programs")


def audit(plan, compiled_text: str, cost_analysis: dict,
          compiler_log: str | None = None, reduce_scatter_as_all_reduce: bool = False) -> Audit:
    """Compare ``plan`` (one program: not a pipeline) with the compiled program whose HLO
    text and ``cost_analysis`` (one dict) are given; ``compiler_log``: what XLA printed
    while compiling it, if captured; ``reduce_scatter_as_all_reduce``: the program was
    compiled for a backend that runs a reduce-scatter as an all-reduce and a slice (XLA's
    CPU compiler), whatever the plan's cluster assumed."""
    refuse_pipeline(plan)
    names = tuple(plan.axis_names)
    planned: dict[tuple, list[int]] = {}
    for kind, axes, nbytes in _as_compiled(plan, reduce_scatter_as_all_reduce):
        row = planned.setdefault((kind, axes), [0, 0])
        row[0] += 1
        row[1] += nbytes
    compiled: dict[tuple, list[int]] = {}
    for c in hlo.parse_collectives(compiled_text):
        axes = tuple(names[a] for a in c.axes(plan.mesh_shape))
        if not axes:
            continue  # groups of one device move nothing
        row = compiled.setdefault((c.kind, axes), [0, 0])
        row[0] += 1
        row[1] += c.result_bytes
    order = lambda key: (hlo.COLLECTIVE_KINDS.index(key[0]), key[1])  # noqa: E731
    rows = tuple(CollectiveRow(kind, axes, *planned.get((kind, axes), (0, 0)),
                               *compiled.get((kind, axes), (0, 0)))
                 for kind, axes in sorted(set(planned) | set(compiled), key=order))
    differences = [_difference(row) for row in rows]
    differences = [d for d in differences if d]
    log = compiler_log or ""
    remat = tuple(line.strip() for line in log.splitlines()
                  if "Involuntary full rematerialization" in line)
    differences += [f"XLA rematerialized a tensor it could not reshard: {line}"
                    for line in remat]
    work = [("flops", plan.cost.flops, cost_analysis.get("flops", 0.0)),
            ("bytes accessed", plan.cost.bytes_accessed,
             cost_analysis.get("bytes accessed", 0.0))]
    for what, modelled, got in work:
        # XLA counts -1 for each op it cannot price (a custom call: TopK, LAPACK), so a
        # program of such ops alone has no count to compare with
        if got > 0 and abs(modelled - got) > max(WORK_RTOL * got, WORK_ATOL):
            differences.append(f"{what} per device: modelled {modelled:.4g}, compiled "
                               f"{got:.4g} ({modelled / got:.2f}×)")
    return Audit(rows, tuple(differences), (work[0][1], work[0][2]), (work[1][1], work[1][2]),
                 remat)


def _as_compiled(plan, reduce_scatter_as_all_reduce: bool) -> list[tuple[str, tuple, int]]:
    """(kind, mesh axes, result bytes) of each collective the plan prices, as the backend
    runs it. On one that runs a reduce-scatter as an all-reduce and a slice (XLA's CPU
    compiler), the reduce-scatter is that all-reduce; and where an op reduces its partial
    sums with an all-reduce over some of its contracting axes and a reduce-scatter over
    the others, XLA folds the two all-reduces into one over both sets of axes (measured on
    jax 0.10: a GPT of width 1024 on 2x2x2, planned for h100-80gb, each attention output
    projection's all-reduce over "model" and reduce-scatter over "fsdp" compile for the
    CPU to one all-reduce over "fsdp" and "model"). A ``shard_map`` body's reduce-scatter
    (``psum_scatter``) is compiled as one on every backend."""
    names = tuple(plan.axis_names)
    sizes = dict(zip(names, plan.mesh_shape))
    out: list[list] = []
    own_all_reduce: dict[str, int] = {}  # op -> the index in ``out`` of its all-reduce
    for c in plan.collectives:
        if c.nbytes == 0 and c.op.startswith("merged all-reduce"):
            continue  # the shared latency of the merged all-reduce, not a collective
        kind, nbytes = c.kind, int(c.nbytes)
        # a shard_map body's psum_scatter is the user's own: compiled as written
        manual = c.op.startswith("shard_map#")
        if kind == "reduce-scatter" and reduce_scatter_as_all_reduce and not manual:
            kind, nbytes = "all-reduce", nbytes * math.prod(sizes[a] for a in c.axes)
            k = None if c.resharding else own_all_reduce.pop(c.op, None)
            if k is not None and out[k][2] == nbytes and not set(out[k][1]) & set(c.axes):
                out[k][1] = tuple(a for a in names if a in set(out[k][1]) | set(c.axes))
                continue
        if kind == "all-reduce" and not c.resharding:
            own_all_reduce[c.op] = len(out)
        out.append([kind, tuple(c.axes), nbytes])
    return [tuple(entry) for entry in out]


def _difference(row: CollectiveRow) -> str | None:
    where = f"{row.kind} over {_axes_text(row.axes)}"
    if not row.planned_count:
        return (f"unexpected {where}: {row.compiled_count} in the compiled program "
                f"({format_bytes(row.compiled_bytes)}), none priced")
    if not row.compiled_count:
        return (f"missing {where}: {row.planned_count} priced "
                f"({format_bytes(row.planned_bytes)}), none in the compiled program")
    if abs(row.planned_bytes - row.compiled_bytes) > BYTES_ATOL + \
            BYTES_RTOL * row.compiled_bytes:
        return (f"{where}: priced {format_bytes(row.planned_bytes)}, the compiled program "
                f"moves {format_bytes(row.compiled_bytes)}")
    if row.compiled_count > row.planned_count or (
            row.kind != "all-reduce" and row.compiled_count != row.planned_count):
        return (f"{where}: priced {row.planned_count}, the compiled program runs "
                f"{row.compiled_count}")
    return None


def _axes_text(axes: Sequence[str]) -> str:
    return "mesh axis " + axes[0] if len(axes) == 1 else f"mesh axes {', '.join(axes)}"
