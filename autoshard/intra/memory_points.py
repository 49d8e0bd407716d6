"""Memory constraints for the ILP: bytes per device of every tensor, at the steps that can peak.

A tensor's bytes per device depend on the strategy of the node that produces it,
so on the choice of that node's ILP root (followers map a root's choice to their
own): each tensor becomes a vector over its root's strategies, exact. A strategy's
temporary buffer (the partial result a reduce-scatter or an all-reduce reads) is a
tensor live at its own step only, or, for an all-reduce XLA merges with others, at the
merged all-reduce's step when the outputs take over donated buffers (``merged_step``).
A resharding copy (an operand read in another layout than it was made in: a gathered
weight, a sliced activation) is a tensor of the reader's
layout live at the reader's step; whether it exists depends on both ends, so it
is a matrix over the two roots' strategies (one vector when both share a root). A copy
several ops read through one read node (``shared_reads``) is made once and lives from the
first of them to the last, as XLA's common-subexpression pass leaves it.
An all-reduce XLA merges with others (``combining``) runs once every member's operand
is made, at the last member's step: each member's partial result lives until then.
The plan's reported peak
(``planned_peak_bytes``) counts the same tensors, placed as XLA's buffer assignment
places them (``buffer_assignment``: temporaries in the outputs' buffers before the
outputs are written, copies XLA makes of donated arguments), with the copies XLA makes of
dot operands read in another dimension order (``dot_layouts``) and of convolution tensors
(``layout_copies``). The constraints count each tensor as its own buffer and leave those
layout copies out: usually more than the reported peak, less where XLA copies a donated
argument or relayouts an operand or holds a buffer empty until the output is written; the
final budget checks (``parallelize``'s, rematerialization's) read the reported peak.

Candidate peaks: a step can only be the peak if the most its live tensors can
take (every one at its largest layout) reaches the least the fullest step must
take; of those, the ``max_points`` steps with the largest upper bound become
constraints. The planner re-checks the chosen plan's whole liveness profile and
adds the step that peaked if it was missed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from autoshard.cost_model import MeshCostModel
from autoshard.ir.program import Literal, readers

from .buffer_assignment import assigned_peak_bytes
from .combining import MergedAllReduce
from .dot_layouts import dot_operands
from .dot_orders import copied_orders
from .following import Grouping
from .fusion import fusion
from .graph import ShardingGraph, use_layout_matrix
from .layout_copies import layout_copy_reads
from .liveness import aliased_outputs, live_bytes, live_ranges, random_words
from .shared_reads import READ, read_steps


@dataclasses.dataclass(frozen=True, eq=False)
class TensorBytes:
    """Per tensor id: ``roots`` (the ILP nodes deciding its bytes: one, or two for a
    resharding copy), ``values`` (its bytes per device for each strategy of that node,
    or each pair of strategies of the two; read-only, repeated layers share them) and
    ``steps`` (first, last step it is live). Temporaries and copies get negative ids."""

    roots: Mapping[int, tuple[int, ...]]
    values: Mapping[int, np.ndarray]
    steps: Mapping[int, tuple[int, int]]


def copy_bytes(model: MeshCostModel, aval, src_spec, dst_spec) -> int:
    """Bytes per device of the copy made when a value laid out ``src_spec`` is read as
    ``dst_spec`` (0 when the layouts agree). Gathering a dimension that is not the
    outermost non-trivial one takes two buffers: XLA gathers it as the major dimension,
    then copies the result into row-major order."""
    if src_spec == dst_spec:  # most reads: nothing to work out
        return 0
    return int(copy_bytes_table(model, aval, [src_spec], [dst_spec])[0, 0])


def copy_bytes_table(model: MeshCostModel, aval, srcs, dsts) -> np.ndarray:
    """float64 array [len(srcs), len(dsts)] of ``copy_bytes`` (each dst's shard shape
    worked out once)."""
    shape, itemsize = tuple(aval.shape), aval.dtype.itemsize
    table = np.zeros((len(srcs), len(dsts)), dtype=np.float64)
    for j, dst in enumerate(dsts):
        local = model.shard_shape(shape, dst)
        size = itemsize * math.prod(local)
        split_before = [math.prod(local[:d]) > 1 for d in range(len(local))]
        for i, src in enumerate(srcs):
            if src != dst:
                inner = any(split_before[d] for d in _gathered_dims(src, dst))
                table[i, j] = 2 * size if inner else size
    return table


@functools.lru_cache(maxsize=1 << 16)
def _gathered_dims(src_spec, dst_spec) -> tuple[int, ...]:
    """Dims from which ``dst_spec`` drops a mesh axis ``src_spec`` splits them by."""
    return tuple(d for d, (held, wanted) in enumerate(zip(src_spec, dst_spec))
                 if set(held) - set(wanted))


def _dot_operand_copies(graph: ShardingGraph, model: MeshCostModel, chosen, ranges, resharded,
                        read_copy, spans) -> list[tuple[tuple[int, int], int]]:
    """(span, bytes) of each copy XLA makes of a dot operand in another dimension order
    (``dot_layouts``); shortens the lives of the sources they are made from, in place
    (``ranges`` of values, ``spans[read_copy[r]]`` of a read node's shared copy).

    A read resharded on its own is copied at the dot, beside the resharded buffer, unless
    the resharding's own relayout writes that order (it gathers an inner dimension). Other
    sources (a value, a read node's shared copy) get one copy per order, made at the first
    dot reading it so, or, when nothing else reads the source after that, where its last
    other read is (or where it is made): the source then dies there and the copy holds the
    data until its last dot, as XLA schedules it (a gathered MoE expert output read by the
    combining dot and by its gradient: both copies made at once, the gathered buffer freed)."""
    program = graph.traced.program
    dots = dot_operands(program)
    if not dots:
        return []
    into = {(use.dst, use.operand): u for u, use in enumerate(graph.uses)}
    found: list[tuple[tuple[int, int], int]] = []
    groups: dict[tuple, dict[tuple, list[int]]] = {}  # source -> (order, bytes) -> dot steps
    for v, node in enumerate(graph.nodes):
        if node.kind == READ or node.eqn not in dots:
            continue
        eqn, dot = program.eqns[node.eqn], dots[node.eqn]
        local = [model.shard_shape(tuple(program.avals[atom].shape), spec)
                 for atom, spec in zip(eqn.inputs, chosen[v].in_specs)]
        for operand, order in copied_orders(dot.dimension_numbers, *local[:2]):
            u = into.get((v, operand))
            if u is None:
                continue
            atom = eqn.inputs[operand]
            size = program.avals[atom].dtype.itemsize * math.prod(local[operand])
            if u in resharded:
                if resharded[u] <= size:
                    found.append(((node.eqn, node.eqn), size))
                continue
            src = graph.uses[u].src
            if src in read_copy:
                key = ("read", src)
            elif dot.fusible[operand]:
                continue
            else:
                key = ("value", atom)
            groups.setdefault(key, {}).setdefault((order, size), []).append(node.eqn)
    if not groups:
        return found
    # source -> steps of every equation reading it
    reads: dict[tuple, list[int]] = {("value", v): steps for v, steps in readers(program).items()}
    for use in graph.uses:
        if use.src in read_copy and use.operand >= 0:
            reads.setdefault(("read", use.src), []).append(graph.nodes[use.dst].eqn)
    kept = set(program.invars) | {v for v in program.outvars if not isinstance(v, Literal)}
    for key, by_order in groups.items():
        copied = {e for steps in by_order.values() for e in steps}
        if key[0] == "read":
            (born, end), _ = spans[read_copy[key[1]]]
        else:
            born, end = ranges.get(key[1], (None, None))
        pinned = born is None or (key[0] == "value" and key[1] in kept)
        last_other = max((e for e in reads.get(key, ()) if e not in copied),
                         default=0 if pinned else born)
        made = []
        for (_, size), steps in by_order.items():
            first = min(steps)
            made.append(first if pinned or first <= last_other else last_other)
            found.append(((made[-1], max(steps)), size))
        dies = max(last_other, *made)
        if key[0] == "read" and dies == born and \
                all(e in copied for e in reads.get(key, ())):
            # resharded only to be copied, at the first dot reading it: XLA frees it once
            # copied, before that dot runs (a MoE's expert outputs gathered, copied in the
            # two orders the combining dot and its gradient read, then dropped)
            spans[read_copy[key[1]]] = ((born, born), 0)
            continue
        if pinned or dies >= end:
            continue
        if key[0] == "read":
            spans[read_copy[key[1]]] = ((born, dies), spans[read_copy[key[1]]][1])
        else:
            ranges[key[1]] = (born, dies)
    return found


def float32_operand_copies(graph: ShardingGraph, model: MeshCostModel, chosen, ranges
                           ) -> list[tuple[tuple[int, int], int]]:
    """(span, bytes) of each float32 copy of a low-precision dot operand that several dots
    read, on a backend that runs such dots in float32 (``Cluster.low_precision_dots_in_f32``,
    ``DotOperands.upcast``): XLA converts it once, at the first of them, and holds it
    until the last (jax 0.10.2, CPU: a bf16 weight times an f32 batch, converted for the
    forward dot and read again by the input gradient's); an operand only such dots read,
    neither argument nor output, dies once converted (its ``ranges`` entry shortened in
    place). A copy only one dot reads is that dot's temporary
    (``expansions.f32_dot_traffic``)."""
    if not model.cluster.low_precision_dots_in_f32:
        return []
    program = graph.traced.program
    dots = dot_operands(program)
    held: dict[int, list[int]] = {}   # operand -> [first dot, last dot, bytes]
    for v, node in enumerate(graph.nodes):
        dot = dots.get(node.eqn) if node.kind != READ else None
        if dot is None:
            continue
        eqn = program.eqns[node.eqn]
        for k, (atom, spec) in enumerate(zip(eqn.inputs[:2], chosen[v].in_specs[:2])):
            if dot.upcast[k] and (dot.converted_before[k] or dot.converted_later[k]):
                aval = program.avals[atom]
                size = 2 * model.bytes_per_device(tuple(aval.shape), aval.dtype.itemsize, spec)
                span = held.setdefault(atom, [node.eqn, node.eqn, 0])
                span[0], span[1] = min(span[0], node.eqn), max(span[1], node.eqn)
                span[2] = max(span[2], size)
    kept = set(program.invars) | {v for v in program.outvars if not isinstance(v, Literal)}
    read_by = readers(program)
    for atom, (first, _, _) in held.items():
        if atom not in kept and atom in ranges and all(
                e in dots and dots[e].upcast[program.eqns[e].inputs.index(atom)]
                for e in read_by.get(atom, ())):
            ranges[atom] = (ranges[atom][0], first)
    return [((first, end), size) for first, end, size in held.values()]


def _convolution_copies(graph: ShardingGraph, nbytes, chosen
                        ) -> list[tuple[tuple[int, int], int]]:
    """(span, bytes) of the copies XLA makes of a convolution's operands and result in the
    dimension orders it runs in (``layout_copies``): each lives at the convolution's step
    (a kernel read by the input gradient, a filter gradient written in (out, spatial...,
    in) order and copied out)."""
    program = graph.traced.program
    copied = layout_copy_reads(program)
    found = []
    for v, node in enumerate(graph.nodes):
        reads = copied.get(node.eqn) if node.kind != READ else None
        if not reads:
            continue
        eqn = program.eqns[node.eqn]
        values = [(atom, spec) for atom, spec in zip(eqn.inputs, chosen[v].in_specs)] + \
            list(zip(eqn.outputs, chosen[v].out_specs))
        found += [((node.eqn, node.eqn), nbytes(vid, spec))
                  for extra, (vid, spec) in zip(reads, values) if extra]
    return found


def _copy_steps(graph: ShardingGraph, use, shared: Mapping[int, tuple[int, int]]
                ) -> tuple[int, int]:
    """Where the copy a use makes lives: at its reader's step, or for a copy shared by
    a read node's readers, from the first of them to the last."""
    if use.dst in shared:
        return shared[use.dst]
    eqn = graph.nodes[use.dst].eqn
    return (eqn, eqn)


def merged_members(merged: Sequence[MergedAllReduce]) -> dict[int, set[int]]:
    """Node → its strategies whose all-reduce XLA merges with the other terminal ones at
    the end of the step (the gradients')."""
    members: dict[int, set[int]] = {}
    for group in merged:
        if not group.terminal:
            continue
        for v, i in group.members:
            members.setdefault(v, set()).add(i)
    return members


def merged_step(graph: ShardingGraph, members: Mapping[int, set[int]],
                donated: Sequence[int]) -> int | None:
    """Where a merged all-reduce member's temporary buffer (its unreduced partial result)
    lives: at the merged all-reduce's step (its last member's) when the program's
    outputs take over donated arguments' buffers, for XLA's CPU all-reduce is not in
    place and the reduced results, which the updated state can no longer be written
    over, need buffers of their own beside the partials there (on donated training steps
    XLA's temporaries grow by exactly the reduced gradients' bytes); else (``None``) at
    its own step: the reduced results are written into the outputs' buffers, which the
    liveness holds for the whole run."""
    if not members or not aliased_outputs(graph.traced.program, list(donated)):
        return None
    return max(graph.nodes[v].eqn for v in members)


def _merged_extensions(graph: ShardingGraph, members: Mapping[int, set[int]],
                       ranges: Mapping[int, tuple[int, int]]):
    """Per member node and output: ``(node, output value, steps the partial result
    outlives its last reader until the merged all-reduce)``; empty without members."""
    if not members:
        return []
    step = max(graph.nodes[v].eqn for v in members)
    out = []
    for v in sorted(members):
        for vid in graph.nodes[v].outputs:
            if vid in ranges:
                out.append((v, vid, (ranges[vid][1] + 1, step)))
    return out


def held_bytes_factors(program, model: MeshCostModel) -> dict[int, float]:
    """Value → how many times its own bytes it holds while :func:`live_ranges` keeps it,
    for the values not held once: random bits computed in a loop
    (``Cluster.threefry_in_loops``) hold its two words, fused or not; fused bits on another
    backend hold nothing (computed in their readers)."""
    if model.cluster.threefry_in_loops:
        return dict.fromkeys(random_words(program), 2.0)
    return dict.fromkeys(random_words(program) & fusion(program).fused, 0.0)


def tensor_bytes(graph: ShardingGraph, grouping: Grouping, model: MeshCostModel,
                 ranges: Mapping[int, tuple[int, int]],
                 merged: Sequence[MergedAllReduce] = (), *, donated: Sequence[int] = ()
                 ) -> TensorBytes:
    """Bytes per device of every tensor of the program, over the strategies of the ILP
    node that decides them (see :class:`TensorBytes`); ``ranges``: ``live_ranges(program,
    donated)``."""
    program = graph.traced.program
    position = {r: p for p, r in enumerate(grouping.roots)}
    per_strategy: dict = {}

    def own_bytes(strategies, k, aval) -> np.ndarray:
        """Bytes of output ``k`` per strategy (repeated layers share their strategies)."""
        key = (id(strategies), k, tuple(aval.shape), aval.dtype)
        if key not in per_strategy:
            shape, itemsize = tuple(aval.shape), aval.dtype.itemsize
            per_strategy[key] = (strategies, np.array(  # (strategies kept alive for the id)
                [model.bytes_per_device(shape, itemsize, s.out_specs[k]) for s in strategies],
                dtype=np.float64))
        return per_strategy[key][1]

    def temp_bytes(strategies) -> np.ndarray:
        key = ("temporary", id(strategies))
        if key not in per_strategy:
            per_strategy[key] = (strategies, np.array([s.temp_bytes for s in strategies],
                                                      dtype=np.float64))
        return per_strategy[key][1]

    members = merged_members(merged)
    step = merged_step(graph, members, donated)
    extensions = _merged_extensions(graph, members, ranges)
    held = held_bytes_factors(program, model)
    roots, values, steps = {}, {}, {}
    for v, node in enumerate(graph.nodes):
        if node.kind == READ:  # its value is its producer's; its copy is a use's below
            continue
        p, index = position[grouping.root[v]], grouping.index[v]
        for k, vid in enumerate(node.outputs):
            if vid not in ranges:  # overwritten in place by an output: no buffer of its own
                continue
            own = own_bytes(node.strategies, k, program.avals[vid])
            roots[vid], values[vid], steps[vid] = (p,), own[index] * held.get(vid, 1.0), \
                ranges[vid]
        temps = temp_bytes(node.strategies)
        if not temps.any() or node.eqn is None:
            continue
        if step is not None and v in members:  # partials wait for the merged all-reduce
            merging = np.isin(np.arange(len(temps)), sorted(members[v]))
            mid = -1 - len(graph.nodes) - len(graph.uses) - len(extensions) - v
            roots[mid], values[mid], steps[mid] = (p,), np.where(merging, temps, 0.0)[index], \
                (step, step)
            temps = np.where(merging, 0.0, temps)
        tid = -1 - v
        roots[tid], values[tid], steps[tid] = (p,), temps[index], (node.eqn, node.eqn)
    copies: dict = {}  # per-use matrices, shared by repeated layers
    tables: dict = {}  # (shape, item size, layouts): the same layouts read by another op

    def copy_table(aval, srcs, dsts) -> np.ndarray:
        key = (tuple(aval.shape), aval.dtype.itemsize, srcs, dsts)
        if key not in tables:
            tables[key] = copy_bytes_table(model, aval, srcs, dsts)
        return tables[key]

    picked: dict = {}  # a matrix over the two roots' strategies, shared by repeated layers

    def over_roots(matrix: np.ndarray, rows: np.ndarray, cols: np.ndarray, diagonal: bool):
        key = (id(matrix), rows.tobytes(), cols.tobytes(), diagonal)
        if key not in picked:
            values = None if not matrix.any() else \
                matrix[rows, cols] if diagonal else matrix[np.ix_(rows, cols)]
            if values is not None:
                values.flags.writeable = False
            picked[key] = (matrix, values)  # (the matrix kept alive for its id)
        return picked[key][1]

    shared = read_steps(graph)
    for u, use in enumerate(graph.uses):
        matrix = use_layout_matrix(graph, use, copy_table, copies)
        ps, pd = position[grouping.root[use.src]], position[grouping.root[use.dst]]
        cells = over_roots(matrix, grouping.index[use.src], grouping.index[use.dst], ps == pd)
        if cells is None:  # the layouts always agree: no copy
            continue
        cid = -1 - len(graph.nodes) - u
        roots[cid], values[cid] = ((ps,) if ps == pd else (ps, pd)), cells
        steps[cid] = _copy_steps(graph, use, shared)
    for k, (v, vid, longer) in enumerate(extensions):
        node = graph.nodes[v]
        p, index = position[grouping.root[v]], grouping.index[v]
        out = node.outputs.index(vid)
        aval = program.avals[vid]
        own = np.array([model.bytes_per_device(tuple(aval.shape), aval.dtype.itemsize,
                                               s.out_specs[out])
                        if i in members[v] else 0.0 for i, s in enumerate(node.strategies)],
                       dtype=np.float64)[index]
        tid = -1 - len(graph.nodes) - len(graph.uses) - k
        if longer[0] <= longer[1]:  # the partial result waits for the merged all-reduce
            roots[tid], values[tid], steps[tid] = (p,), own, longer
    return TensorBytes(roots, values, steps)


def candidate_steps(tensors: TensorBytes, num_steps: int, max_points: int = 12) -> list[int]:
    """Steps whose live tensors could make the peak, in step order."""
    hi = live_bytes(tensors.steps, {t: v.max() for t, v in tensors.values.items()}, num_steps)
    lo = live_bytes(tensors.steps, {t: v.min() for t, v in tensors.values.items()}, num_steps)
    possible = np.flatnonzero(hi >= lo.max())
    steps = sorted(possible.tolist(), key=lambda s: (-hi[s], s))[:max_points]
    return sorted(set(steps) | {int(np.argmax(lo))})


def memory_terms(tensors: TensorBytes, steps: Iterable[int]):
    """One ILP memory point per step: ``(ILP node, bytes per strategy)`` and
    ``(src, dst, bytes per strategy pair)`` terms of what is live."""
    points = []
    for step in steps:
        summed: dict[tuple[int, ...], np.ndarray] = {}
        for tid, (born, last) in tensors.steps.items():
            if born <= step <= last:
                key = tensors.roots[tid]
                summed[key] = summed[key] + tensors.values[tid] if key in summed \
                    else tensors.values[tid]
        if summed:
            points.append(tuple((*key, values) for key, values in sorted(summed.items(),
                                                                        key=lambda kv: kv[0])))
    return tuple(points)


def _chosen_bytes(tensors: TensorBytes, choices) -> dict[int, float]:
    return {t: float(v[tuple(choices[r] for r in tensors.roots[t])])
            for t, v in tensors.values.items()}


def counted_peak_bytes(tensors: TensorBytes, choices, num_steps: int) -> float:
    """The most bytes the memory rows count live at one step under ILP ``choices``."""
    return float(live_bytes(tensors.steps, _chosen_bytes(tensors, choices), num_steps).max())


def steps_over(tensors: TensorBytes, choices, num_steps: int, budget: float,
               limit: int = 16) -> list[int]:
    """The (at most ``limit``) fullest steps whose live bytes under ILP ``choices`` exceed
    ``budget``."""
    live = live_bytes(tensors.steps, _chosen_bytes(tensors, choices), num_steps)
    over = np.flatnonzero(live > budget)
    return sorted(over[np.argsort(-live[over], kind="stable")][:limit].tolist())


def planned_peak_bytes(graph: ShardingGraph, model: MeshCostModel, choices: Sequence[int],
                       donated, merged: Sequence[MergedAllReduce] = ()) -> int:
    """Peak bytes per device of the plan choosing strategy ``choices[v]`` at node ``v``:
    the tensors the memory constraints count (every tensor from definition to last
    read, the temporaries of the chosen strategies, the resharding copies each operand
    read makes, at their step, and partial results waiting for the merged all-reduce),
    with the copies XLA makes of dot operands read in another dimension order
    (``dot_layouts``) and of convolution tensors (``layout_copies``), placed as XLA's
    buffer assignment places them (``buffer_assignment``)."""
    chosen = [n.strategies[c] for n, c in zip(graph.nodes, choices)]
    program = graph.traced.program

    def nbytes(vid, spec):
        aval = program.avals[vid]
        return model.bytes_per_device(tuple(aval.shape), aval.dtype.itemsize, spec)

    ranges = dict(live_ranges(program, donated, *graph.loop_buffers))
    held = held_bytes_factors(program, model)
    sizes = {vid: nbytes(vid, spec) * held.get(vid, 1.0) for node, s in zip(graph.nodes, chosen)
             if node.kind != READ for vid, spec in zip(node.outputs, s.out_specs)}
    members = merged_members(merged)
    step = merged_step(graph, members, donated)
    spans = [((step, step) if step is not None and choices[v] in members.get(v, ())
              else (node.eqn, node.eqn),
              s.temp_bytes) for v, (node, s) in enumerate(zip(graph.nodes, chosen))
             if s.temp_bytes]
    shared = read_steps(graph)
    resharded, read_copy = {}, {}  # use -> its copy's bytes; read node -> its copy in spans
    for u, use in enumerate(graph.uses):
        src = graph.nodes[use.src]
        size = copy_bytes(model, program.avals[src.outputs[use.src_output]],
                          chosen[use.src].out_specs[use.src_output],
                          chosen[use.dst].in_specs[use.operand])
        if size:
            resharded[u] = size
            if use.dst in shared:
                read_copy[use.dst] = len(spans)
            spans.append((_copy_steps(graph, use, shared), size))
    spans += _dot_operand_copies(graph, model, chosen, ranges, resharded, read_copy, spans)
    spans += _convolution_copies(graph, nbytes, chosen)
    spans += float32_operand_copies(graph, model, chosen, ranges)
    for v, vid, longer in _merged_extensions(graph, members, ranges):
        if choices[v] in members[v] and longer[0] <= longer[1]:
            spans.append((longer, sizes[vid]))
    for k, (span, size) in enumerate(spans):
        ranges[-1 - k] = span
        sizes[-1 - k] = size
    reduced = [vid for v, strategies in members.items() if choices[v] in strategies
               for vid in graph.nodes[v].outputs]
    return assigned_peak_bytes(program, ranges, sizes, donated, reduced)
