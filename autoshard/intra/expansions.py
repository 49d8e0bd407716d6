"""Ops a backend rewrites into several before it runs them, and what the rewrite moves.

XLA's CPU backend (with jax's CPU lowering) runs these ops as many kernels, where GPUs run
each as one kernel or fuse it:

* ``random_bits``: jax lowers threefry for the CPU with rolled loops, five passes over two
  uint32 arrays of the output's size, and XLA fuses the last round into each reader
  (``Cluster.threefry_in_loops``);
* ``select_and_scatter_add`` (max-pool's gradient): XLA's ``SelectAndScatterExpander``
  writes an iota per operand dim, finds each window's argmax with a variadic reduce-window
  over the operand and the iotas, concatenates the indices and scatters the source into
  zeros (``Cluster.select_and_scatter_expanded``);
* a convolution with ``batch_group_count`` B > 1 (the filter gradient of a depthwise
  convolution): XLA's ``ConvolutionGroupConverter`` runs it as a dense convolution of all
  B x B group pairs, masks the pairs off the diagonal and sums them away
  (``Cluster.batch_groups_dense``): B times the flops;
* a ``dot_general`` of bfloat16 or float16 result: XLA:CPU runs it in float32, each
  operand converted first (``Cluster.low_precision_dots_in_f32``).

:func:`expansion_traffic` prices the difference from the op's own reads and writes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from .dot_layouts import DotOperands
from .loop_op import LoopOp

#: uint32 arrays of the output's size that jax's rolled threefry loop writes and reads:
#: its two words written at the start, then read and written by five passes, as
#: ``cost_analysis`` counts them (jax 0.10.2, CPU: ``jax.random.bits`` of N words, 15 N
#: words in all with the result's write and the final xor's read of both words)
THREEFRY_LOOP_ARRAYS = 12


def expansion_traffic(op: LoopOp, cluster, in_bytes: Sequence[int], out_bytes: Sequence[int],
                      reads: Sequence[float], first_loop_split: int = 1,
                      dot: DotOperands | None = None, copied: Sequence[int] = ()
                      ) -> tuple[int, int, int]:
    """(bytes moved beyond the op's own operand reads and result writes, bytes of its
    temporaries, the factor of its flops) per device, for ``op`` with operands and results
    of ``in_bytes`` and ``out_bytes`` per device, read and written as ``reads`` says
    (``loop_strategies``), its first loop split ``first_loop_split`` ways, on a backend
    that expands it as ``cluster`` says; (0, 0, 1) where it does not. A dot's ``dot``
    (``dot_layouts.dot_operands``) and the operands ``copied`` into the order it runs them
    in, as priced beside this."""
    if op.expansion == "f32_dot" and cluster.low_precision_dots_in_f32 and dot is not None:
        return (*f32_dot_traffic(in_bytes, out_bytes[0], dot, copied), 1)
    if op.expansion == "threefry" and cluster.threefry_in_loops:
        return threefry_loop_traffic(out_bytes[0], reads), 0, 1
    if op.expansion == "select_and_scatter" and cluster.select_and_scatter_expanded:
        return (*select_and_scatter_traffic(op, in_bytes[0], in_bytes[1]), 1)
    if op.expansion == "batch_groups" and cluster.batch_groups_dense:
        groups = op.sizes[0] // first_loop_split   # the group loop is the first
        return (*batch_groups_traffic(out_bytes[0], groups), groups)
    return 0, 0, 1


def f32_dot_traffic(in_bytes: Sequence[int], out_bytes: int, dot: DotOperands,
                    copied: Sequence[int]) -> tuple[int, int]:
    """(bytes beyond the dot's own reads and write, temporary bytes) per device of a dot
    run in float32 (``DotOperands.upcast``: the operands converted; all of them where its
    result is of low precision): each such operand is converted (read, written as
    float32 at twice its bytes) and read as float32 (an operand read once: 4 more
    operands' bytes; 2 where the conversion replaces a copy into another order, or is
    computed where the operand is made: ``DotOperands.converted_where_made``; 1 where an
    earlier dot converted it: ``DotOperands.converted_before``); the float32
    result is written and read back (2 more results' bytes where its one reading fusion
    reads it, ``DotOperands.result_read_once``; else a conversion writes the result and
    its readers read that: 4; only its float32 write, 1, where its one reader is its
    written conversion to float32, ``DotOperands.widened_by``), where it is of low
    precision. The float32 copies are temporaries, but for an operand's that several dots
    read (``memory_points.float32_operand_copies`` holds it from the first to the last). jax 0.10.2:
    bf16 ``x @ w`` of [256, 512] by [512, 1024], ``tanh(x @ w)`` and ``tanh(x) @ w``
    move 5 times their operands' and results' bytes, as do batched einsums and attention's
    ``bqhd,bkhd->bhqk``; a result read by two fusions 9 times its bytes."""
    extra = sum(size * (1 if dot.converted_before[k] else
                        2 if k in copied or dot.converted_where_made[k] else 4)
                for k, size in enumerate(in_bytes[:2]) if dot.upcast[k])
    temporary = 2 * sum(size for k, size in enumerate(in_bytes[:2]) if dot.upcast[k] and
                        not dot.converted_before[k] and not dot.converted_later[k])
    if dot.widened_by is not None:   # written once, as the float32 its one reader wants
        extra += out_bytes
    elif dot.low_precision:
        extra += out_bytes * (2 if dot.result_read_once else 4)
        temporary += (1 if dot.result_read_once else 2) * out_bytes
    return int(extra), int(temporary)


def batch_groups_traffic(out_bytes: int, groups: int) -> tuple[int, int]:
    """(bytes beyond the op's own reads and writes, temporary bytes) per device of a
    filter gradient of ``groups`` groups per device run densely: the dense result, of
    ``groups`` times the output's size, written, read and written by the mask, read by
    the sum. (The copies of both operands into the order the dense convolution runs in
    are the layout copies every convolution's operands get: ``layout_copies``.) jax
    0.10.2, a depthwise 3x3 filter gradient of [8, 16, 16, 64]: 3.738 MB of cost analysis,
    priced 3.74."""
    dense = out_bytes * groups
    return 4 * dense, 2 * dense


def threefry_loop_traffic(out_bytes: int, reads: Sequence[float]) -> int:
    """Bytes per device a rolled threefry loop moves beside its result's write, for a
    ``random_bits`` of ``out_bytes`` per device whose ``reads`` (the key's, then the
    result's: 0 when fused into its readers) are as ``loop_strategies`` takes them: the
    loop's arrays, and both words read by each fusion computing the last round (the key's
    read count: once per fusion the bits are fused into, else the one that writes them)."""
    fusions = reads[0] if len(reads) > 1 and not reads[-1] else 1
    return int((THREEFRY_LOOP_ARRAYS + 2 * fusions) * out_bytes)


def select_and_scatter_traffic(op: LoopOp, source: int, operand: int) -> tuple[int, int]:
    """(bytes beyond reading ``source`` and ``operand`` and writing a result of the
    operand's size, temporary bytes) per device of max-pool's gradient expanded for the
    CPU, the operand of rank r padded to P bytes (only unsplit dims are padded, so P
    scales with the operand's shard): r iotas of P; the reduce-window reads the operand
    and the iotas, writes the maxima and r index arrays of the source's size S; their
    concatenation reads and writes the indices; the scatter reads zeros of P, the indices
    and the source, and writes P; the source is copied once (2 S); a padded operand is
    padded (X read, P written) and the result sliced (P read, X written). In all
    (2r + 4) P + (4r + 4) S (+ 2 X + 2 P padded): jax 0.10.2, [4, 16, 16, 8] through a
    2x2 window, 29.6 operands' bytes; [8, 16, 16, 64], padded, 37.7. The temporaries: the
    iotas and the reduce-window's results (and the padded operand)."""
    rank = len(op.out_dims[0])
    whole = max(1, math.prod(op.sizes))   # the result's elements: the operand's
    padded_bytes = operand * op.padded // whole
    padding = op.padded > whole
    total = (2 * rank + 4) * padded_bytes + (4 * rank + 4) * source
    if padding:
        total += 2 * operand + 2 * padded_bytes
    temporary = rank * padded_bytes + (rank + 1) * source + (padded_bytes if padding else 0)
    return int(total - 2 * operand - source), int(temporary)
