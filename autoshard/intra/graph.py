"""The sharding graph: one node per input, constant and equation, one edge per tensor use."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence

import numpy as np

from autoshard.cost_model import CollectiveStep, MeshCostModel
from autoshard.ir.loop_view import LoopView
from autoshard.ir.program import Literal
from autoshard.ir.specs import Spec, enumerate_specs, replicated
from autoshard.ir.trace import TracedFunction

from .control_flow import control_flow_strategies
from .dot_layouts import dot_operands, widened_results
from .flops import value_bytes
from .fusion import fusion, fusion_reads, operand_fusion_writes, read_in_registers, unwritten
from .in_place import UPDATE_OPERAND, program_in_place, window_reads
from .layout_copies import layout_copy_reads, transposes_into_dot_operands, transposes_into_dots, transposes_undone
from .library_fusion import library_fusions
from .loop_op import size_of
from .loop_plans import use_weight, within_steps
from .manual_regions import shard_map_strategies
from .op_rules import CONTROL_FLOW, REPLICATED_QUIETLY, loop_op
from .strategies import Strategy, input_strategies, loop_strategies, replicated_strategy
from .user_constraints import CONSTRAINTS, constraint_text, honouring, required_layout


@dataclasses.dataclass(frozen=True, eq=False)
class Node:
    """A choice point. ``kind`` is ``"input"``, ``"constant"`` or ``"op"``.

    ``eqn`` indexes the program's equations (ops only); ``outputs`` are the value
    ids the node defines; ``strategies[i].out_specs[k]`` lays out ``outputs[k]``.
    """

    name: str
    kind: str
    eqn: int | None
    outputs: tuple[int, ...]
    strategies: tuple[Strategy, ...]

    def __repr__(self):
        return f"Node({self.name!r}, {len(self.strategies)} strategies)"


@dataclasses.dataclass(frozen=True)
class Use:
    """Value ``outputs[src_output]`` of node ``src`` read as operand ``operand`` of node ``dst``.

    ``operand == -1`` marks a loop-carried use: an output that becomes input ``dst``
    of the next call (or a loop's carry, its entry at the next step: ``loop_plans``).
    ``weight``: how many times per call the use is resharded (a use inside a loop
    planned once: every step).
    """

    src: int
    src_output: int
    dst: int
    operand: int
    weight: float = 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class ShardingGraph:
    """Nodes, tensor uses and which node produced each value."""

    traced: TracedFunction
    nodes: tuple[Node, ...]
    uses: tuple[Use, ...]
    producer: dict  # value id → (node index, output index)
    unsupported: tuple[tuple[str, str], ...]   # (primitive, source) run replicated with a warning
    control_flow: tuple[tuple[str, str], ...]  # (primitive, source) whose body splits nowhere
    #: (the constraint's sharding, source) of user sharding constraints no strategy meets
    unmet_constraints: tuple[tuple[str, str], ...] = ()
    #: the view of a program's loops ``traced`` is (``loop_plans``), if it is one
    view: LoopView | None = None

    def __repr__(self):
        return f"ShardingGraph({len(self.nodes)} nodes, {len(self.uses)} uses)"

    @property
    def per_step_copies(self) -> frozenset[int]:
        """``LoopView.per_step_copies`` (none outside a loop's view)."""
        return frozenset() if self.view is None else self.view.per_step_copies

    @property
    def loop_buffers(self) -> tuple[tuple[tuple[int, int, int], ...], frozenset[int]]:
        """(``LoopView.held_buffers``, ``LoopView.stack_equations``): ``live_ranges``'s
        ``held`` and ``writers`` (none outside a loop's view)."""
        return ((), frozenset()) if self.view is None else \
            (self.view.held_buffers, self.view.stack_equations)

    def input_node(self, flat_index: int) -> int:
        return self.producer[self.traced.program.invars[flat_index]][0]


def _aval(program, atom):
    return None if isinstance(atom, Literal) else program.avals[atom]


#: identities that move no data in the compiled program: ``optimization_barrier`` (the
#: operands of a ``jax.checkpoint`` block recomputed in the backward pass), ``name``
#: (``checkpoint_name``, read by a checkpoint policy) and sharding constraints (a
#: resharding they imply is priced on the use, as any other)
NO_TRAFFIC = frozenset({"optimization_barrier", "sharding_constraint", "reshard", "device_put", "name"})
#: ops that are a bitcast of a value in memory (dropping dims of size 1 keeps its bytes in
#: order in any layout): they read nothing; a fusion ending in one writes its result
BITCASTS = frozenset({"squeeze"})
#: ops that read only the part of operand 0 they return (XLA's ``cost_analysis`` of a
#: slice of a [2, 256, 768] array counts the slice read and written, 2x its bytes)
SLICES = frozenset({"slice", "dynamic_slice"})


#: host callbacks: jax runs one on the mesh's first device, and XLA sends its results to
#: the others with an all-reduce over the whole mesh (measured: a ``pure_callback``'s
#: scalar result all-reduced over both axes of 2x4)
HOST_CALLBACKS = frozenset({"pure_callback", "io_callback"})


def _sent_to_every_device(strategy: Strategy, out_avals, model: MeshCostModel) -> Strategy:
    """``strategy`` (a host callback's, replicated) with the all-reduce over every mesh
    axis that sends its results from the first device to the others."""
    axes = tuple(a for a, size in enumerate(model.mesh_shape) if size > 1)
    if not axes:
        return strategy
    steps = tuple(CollectiveStep("all-reduce", axes, nbytes, model.all_reduce(nbytes, axes))
                  for nbytes in map(value_bytes, out_avals))
    return dataclasses.replace(strategy, collectives=strategy.collectives + steps,
                               communication_s=strategy.communication_s
                               + sum(s.seconds for s in steps))


def build_graph(traced: TracedFunction, model: MeshCostModel,
                input_specs: Callable[[int, tuple], list[Spec]] | None = None,
                axis_names: Sequence[str] | None = None,
                donated: Collection[int] = (), view: LoopView | None = None) -> ShardingGraph:
    """Enumerate strategies for every node of ``traced`` on ``model``'s mesh.

    ``input_specs(flat_index, shape)`` may restrict the layouts an argument can
    take (presets use it); by default every valid spec is allowed. With ``axis_names``
    (the mesh's), the user's sharding constraints on that mesh are kept
    (``user_constraints``) and its ``shard_map`` regions priced as written
    (``manual_regions``). ``donated``: flat indices of the arguments the call donates
    (an update XLA writes over one in place moves only its window: ``in_place``).
    ``view``: ``traced`` is that view of a program's loops (``loop_plans``): a step's
    equations priced for every step, the steps' dim of stacked values kept whole.
    """
    program = traced.program
    mesh_shape = model.mesh_shape
    nodes: list[Node] = []
    producer: dict[int, tuple[int, int]] = {}
    uses: list[Use] = []
    unsupported, control_flow, unmet = [], [], []
    memo: dict[tuple, tuple] = {}
    by_specs: dict[tuple, tuple] = {}
    analysis = fusion(program)
    fused, fanout = analysis.fused, analysis.fanout
    fewer_reads = fusion_reads(program, analysis)
    broadcasts = library_fusions(program).broadcasts
    copied = layout_copy_reads(program)
    undone, undone_inner = transposes_undone(program)
    folded = transposes_into_dots(program) | transposes_into_dot_operands(program) | undone
    if model.cluster.low_precision_dots_in_f32:
        folded |= widened_results(program)
    dots = dot_operands(program)
    in_place = program_in_place(program, donated)
    stacked: set[tuple] = set()  # (shape, dtype) of the stacks of loops seen so far

    def add(node: Node):
        for k, vid in enumerate(node.outputs):
            producer[vid] = (len(nodes), k)
        nodes.append(node)

    for i, vid in enumerate(program.invars):
        if vid in producer:  # the same value passed twice cannot happen, but stay safe
            continue
        shape = tuple(program.avals[vid].shape)
        specs = input_specs(i, shape) if input_specs else enumerate_specs(shape, mesh_shape)
        # inputs of one shape and layouts share one tuple, as repeated layers' ops do, so
        # that the matrices priced per tuple (use_cost_matrix) are priced once
        specs = tuple(specs)
        if specs not in by_specs:
            by_specs[specs] = input_strategies(specs)
        add(Node(traced.in_paths[i], "input", None, (vid,), by_specs[specs]))
    for vid, _ in program.constants:
        rank = len(program.avals[vid].shape)
        add(Node(f"constant {vid}", "constant", None, (vid,), input_strategies([replicated(rank)])))

    for e, eqn in enumerate(program.eqns):
        in_avals = [_aval(program, a) for a in eqn.inputs]
        out_avals = [program.avals[v] for v in eqn.outputs]
        name = eqn.primitive.name
        # operands are read once per fusion the equation is duplicated into (and not
        # again in a fusion an earlier equation read them in); values that stay in
        # registers are no traffic, but for the large reductions they are written for
        copies = max((fanout.get(v, 1) for v in eqn.outputs), default=1)
        reads = tuple(0 if not isinstance(a, Literal) and read_in_registers(analysis, a, e)
                      else fewer_reads.get((e, k), copies) for k, a in enumerate(eqn.inputs))
        # a dot operand computed in an operand fusion: its first dot prices that write
        reads = tuple(r + (not isinstance(a, Literal) and operand_fusion_writes(analysis, a, e))
                      for r, a in zip(reads, eqn.inputs))
        reads += tuple(0 if unwritten(analysis, v) else 1 for v in eqn.outputs)
        # an operand a library fusion reads from a broadcast XLA writes at the result's
        # shape: that broadcast's traffic in place of the operand's
        widened = [broadcasts[(e, k)] for k in range(len(eqn.inputs)) if (e, k) in broadcasts]
        if widened:
            reads = tuple(0 if (e, k) in broadcasts else r for k, r in enumerate(reads[:-1])) \
                + (reads[-1] + sum(widened),)
        # an identity XLA does not copy; a transpose whose dot writes the transposed order
        # (fused into its readers instead, it stands for their read of the dot's result),
        # whose dot reads its operand in place, or that undoes another transpose; a
        # conversion to float32 that is its dot's float32 result
        if name in NO_TRAFFIC or e in undone_inner or e in folded and eqn.outputs[0] not in fused:
            reads = (0,) * len(reads)
        elif name in BITCASTS:  # written only where a fusion ends in it
            reads = (0,) * len(eqn.inputs) + (reads[-1] if eqn.inputs[0] in fused else 0,)
        elif name in SLICES:  # reads only what it keeps
            reads = (reads[0] * size_of(out_avals[0]) / max(size_of(in_avals[0]), 1),) + reads[1:]
        if e in copied:  # tensors XLA copies into the layout a convolution runs in
            reads = tuple(r + c for r, c in zip(reads, copied[e], strict=True))
        if e in in_place:  # written over its target: the window moves, not the target
            reads = _window_only(reads, name, len(eqn.inputs))
        if view is not None:
            reads = _loop_reads(view, e, eqn, in_avals, out_avals, reads, stacked)
        signature = (traced.signatures[e], reads, dots.get(e))
        strategies = memo.get(signature)  # a repeated layer: same rule, same strategies
        if strategies is None and name == "shard_map" and axis_names is not None:
            strategies = shard_map_strategies(eqn.params, in_avals, out_avals, model,
                                              axis_names)
            if strategies is not None:
                memo[signature] = strategies
        if strategies is None:
            op = loop_op(eqn, in_avals, out_avals)
            if op is not None:
                strategies = loop_strategies(op, in_avals, out_avals, model, reads=reads,
                                             dot=dots.get(e))
                required = None if axis_names is None or name not in CONSTRAINTS else \
                    required_layout(eqn.params, len(out_avals[0].shape), axis_names, mesh_shape)
                if required is not None:
                    kept = honouring(strategies, required)
                    if kept:
                        strategies = kept
                    else:
                        unmet.append((constraint_text(eqn.params), traced.sources[e]))
                memo[signature] = strategies
            else:
                strategies = ()
                if name not in CONTROL_FLOW and name not in REPLICATED_QUIETLY:
                    unsupported.append((name, traced.sources[e]))
        if not strategies and name in CONTROL_FLOW:
            strategies = control_flow_strategies(eqn, in_avals, out_avals, model, reads)
            if len(strategies) == 1 and any(n > 1 for n in mesh_shape):  # splits nowhere
                control_flow.append((name, traced.sources[e]))
        elif not strategies:
            strategies = (replicated_strategy(in_avals, out_avals, model,
                                              reads=reads),)
            if name in HOST_CALLBACKS:
                strategies = (_sent_to_every_device(strategies[0], out_avals, model),)
        weight = 1.0
        if view is not None:
            strategies, weight = within_steps(view, e, strategies), use_weight(view, e)
        node_index = len(nodes)
        for k, atom in enumerate(eqn.inputs):
            if not isinstance(atom, Literal):
                src, out = producer[atom]
                uses.append(Use(src, out, node_index, k, weight))
        add(Node(f"{name}#{e}", "op", e, tuple(eqn.outputs), strategies))
    return ShardingGraph(traced, tuple(nodes), tuple(uses), producer,
                         tuple(unsupported), tuple(control_flow), tuple(unmet),
                         view)


def _loop_reads(view: LoopView, e: int, eqn, in_avals, out_avals, reads: tuple,
                stacked: set) -> tuple:
    """``reads`` of view equation ``e`` as the loop runs it (``loop_plans``). A step's
    slice of a stacked operand is a dynamic slice XLA writes (it fuses into no reader in
    the loop's body). A stacked result's buffer is written whole before the loop (the
    stack's broadcast); XLA makes one such buffer per shape and copies it for the others
    (measured: an RNN's forward scan, three [6, 64, 32] residual buffers, one broadcast
    and two copies), so a stack of a shape seen before writes it twice (read and write)."""
    kind = view.origins[e][0]
    if kind == "slice":
        return (size_of(out_avals[0]) / max(size_of(in_avals[0]), 1),) + \
            (0,) * (len(eqn.inputs) - 1) + (1,)
    if kind == "stack":
        key = (tuple(out_avals[0].shape), out_avals[0].dtype)
        copied = key in stacked
        stacked.add(key)
        return reads[:-1] + (2 if copied else 1,)
    return reads


def _window_only(reads: tuple, name: str, num_operands: int) -> tuple:
    """``reads`` (per operand, then the result) of an update XLA writes over its target in
    place: the target is neither read nor written whole; the update's bytes are read and
    written into the window (``in_place.window_reads``)."""
    update = UPDATE_OPERAND[name]
    reads = list(reads)
    reads[0] = reads[num_operands] = 0
    reads[update] += window_reads(name) - 1
    return tuple(reads)


def use_cost_matrix(graph: ShardingGraph, use: Use, model: MeshCostModel,
                    memo: dict | None = None) -> np.ndarray:
    """Resharding seconds [strategies of src, strategies of dst] for one tensor use, with
    the traffic of a fused value the resharding makes XLA write and read
    (:func:`unfused_ends`; ``memo``: see :func:`use_layout_matrix`)."""
    ends = unfused_ends(graph, use)

    def seconds(aval, srcs, dsts):
        shape, itemsize = tuple(aval.shape), aval.dtype.itemsize
        matrix = model.resharding_matrix(shape, itemsize, srcs, dsts)
        if any(ends):
            matrix += unfused_traffic_matrix(model, shape, itemsize, srcs, dsts, ends) \
                / model.cluster.memory_bandwidth
        return matrix
    return use_layout_matrix(graph, use, seconds,
                             None if memo is None else memo.setdefault(ends, {}))


def unfused_ends(graph: ShardingGraph, use: Use) -> tuple[bool, bool]:
    """(the producer writes the value, the reader reads it) only because a resharding
    stands between them: the value is fused (``fusion.fused_values``: computed in its
    readers' fusions, never in memory), so neither end's strategy counts that traffic.
    A collective cannot run inside a fusion: XLA writes the value in the producer's layout
    and the reader reads the collective's result (measured: ``g * 0.1`` split, gathered for
    a replicated ``w + ·``, adds the product's write and the gathered read to
    ``cost_analysis``). A value written anyway (a program output, or a copy written for
    the reductions that read it) adds the read alone; a loop-carried use neither. Read by an
    identity XLA does not copy (``NO_TRAFFIC``: a user's sharding constraint), the read is
    its readers': added only where they compute its output in registers (measured: ``tanh``
    split, pinned whole, then summed squared: the sum's fusion reads the gathered value once,
    priced twice before)."""
    if use.operand < 0:
        return False, False
    program = graph.traced.program
    analysis = fusion(program)
    vid = graph.nodes[use.src].outputs[use.src_output]
    reader = graph.nodes[use.dst].eqn
    read = read_in_registers(analysis, vid, reader)
    if read and reader is not None and program.eqns[reader].primitive.name in NO_TRAFFIC:
        # an identity (a sharding constraint; output k is operand k) whose output is the
        # collective's result: its readers read that, and price the read unless they
        # compute it in registers
        read = program.eqns[reader].outputs[use.operand] in analysis.fused
    return unwritten(analysis, vid), read


def unfused_traffic(model: MeshCostModel, shape: tuple[int, ...], itemsize: int, src: Spec,
                    dst: Spec, ends: tuple[bool, bool]) -> int:
    """Bytes per device a resharding of a fused value from ``src`` to ``dst`` adds to the
    program beside its own copies (``ends``: :func:`unfused_ends`): the producer's write
    in ``src`` and the reader's read in ``dst``, when the resharding runs a collective (a
    local slice is fused into the reader, as its producer is)."""
    if not any(ends) or not model.resharding_steps(shape, itemsize, src, dst):
        return 0
    write, read = ends
    return write * model.bytes_per_device(shape, itemsize, src) + \
        read * model.bytes_per_device(shape, itemsize, dst)


def unfused_traffic_matrix(model: MeshCostModel, shape: tuple[int, ...], itemsize: int,
                           srcs: Sequence[Spec], dsts: Sequence[Spec], ends: tuple[bool, bool]
                           ) -> np.ndarray:
    """:func:`unfused_traffic` of every (src, dst) pair: float64 [len(srcs), len(dsts)]."""
    write, read = ends
    written = np.array([write * model.bytes_per_device(shape, itemsize, s) for s in srcs],
                       dtype=np.float64)
    read_back = np.array([read * model.bytes_per_device(shape, itemsize, d) for d in dsts],
                         dtype=np.float64)
    return model.collective_matrix(shape, srcs, dsts) * (written[:, None] + read_back[None, :])


def use_layout_matrix(graph: ShardingGraph, use: Use, table: Callable, memo: dict | None = None
                      ) -> np.ndarray:
    """``table(aval, src layouts, dst layouts)`` (a matrix over the distinct layouts the
    two ends of one tensor use can have) spread over [strategies of src, strategies of dst].

    ``memo`` (one dict per planning call and table) shares matrices between uses of
    repeated layers: their nodes hold the very same strategy tuples."""
    program = graph.traced.program
    src, dst = graph.nodes[use.src], graph.nodes[use.dst]
    aval = program.avals[src.outputs[use.src_output]]
    if memo is not None:
        key = (id(src.strategies), use.src_output, id(dst.strategies), use.operand,
               tuple(aval.shape), aval.dtype)
        if key not in memo:
            memo[key] = (src.strategies, dst.strategies,  # keep the ids alive
                         use_layout_matrix(graph, use, table))
        return memo[key][2]
    src_specs = [s.out_specs[use.src_output] for s in src.strategies]
    if use.operand < 0:  # loop-carried into an input node: its own layout
        dst_specs = [s.out_specs[0] for s in dst.strategies]
    else:
        dst_specs = [s.in_specs[use.operand] for s in dst.strategies]
    usrc = sorted(set(src_specs))
    udst = sorted(set(dst_specs))
    small = table(aval, tuple(usrc), tuple(udst))
    row_of = {spec: k for k, spec in enumerate(usrc)}
    col_of = {spec: k for k, spec in enumerate(udst)}
    return small[np.ix_([row_of[s] for s in src_specs], [col_of[s] for s in dst_specs])]
