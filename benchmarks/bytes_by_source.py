"""Where a step's memory traffic goes, modelled against compiled, per line of user code.

The cost model prices each equation's bytes (its strategy's ``bytes_accessed``); XLA moves
bytes per top-level instruction of the compiled program (a fusion reads its operands and
writes its result). Both are attributed to the user's source line: an equation to its
own, an instruction to its root's (HLO stack frames), forward and backward apart. Lines
whose figures differ show where the fusion model departs from XLA's; an elementwise
chain priced at its own lines but compiled into a fusion rooted at a later line moves
bytes between lines, so compare a function's total first (the default), then its lines
(``--lines``).

On one device, every equation replicated: the program XLA compiles is the user's own,
and the question is fusion alone. The compiled figure is the instructions' operand and
result sizes, which ``cost_analysis`` refines (a slice reads part of its operand); both
totals are printed.

    PYTHONPATH=. python -m benchmarks.bytes_by_source gpt_small [--lines]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from typing import NamedTuple

#: instructions that move no bytes of their own
_NO_TRAFFIC = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast"})


class Source(NamedTuple):
    """A line of user code, and whether the bytes are its backward pass's."""

    file: str
    function: str
    line: int
    backward: bool


def _table(text: str, section: str, following: str) -> dict[str, str]:
    body = text.split(f"\n{section}\n", 1)[1].split(f"\n{following}\n", 1)[0]
    return dict(re.findall(r'^(\d+) "(.*)"$', body, re.M))


def compiled_bytes_by_source(hlo_text: str) -> Counter:
    """Bytes each top-level instruction of a compiled module reads and writes (its
    operands' and result's sizes), per :class:`Source` of its root; instructions without
    a stack frame under ``Source("", opcode, 0, backward)``."""
    from autoshard.ir.hlo import INSTRUCTION, operand_names, shape_bytes
    files = _table(hlo_text, "FileNames", "FunctionNames")
    functions = _table(hlo_text, "FunctionNames", "FileLocations")
    locations = {k: (f, fn, int(line)) for k, f, fn, line in re.findall(
        r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", hlo_text, re.M)}
    frames = dict(re.findall(r"^(\d+) \{file_location_id=(\d+)", hlo_text, re.M))
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    sizes: dict[str, int] = {}
    found: Counter = Counter()
    for line in entry.splitlines()[1:]:
        match = INSTRUCTION.match(line)
        if match is None:
            continue
        name, opcode = match.group("name"), match.group("op")
        sizes[name] = shape_bytes(match.group("shape"))
        if opcode in _NO_TRAFFIC:
            continue
        moved = sizes[name] + sum(sizes.get(o, 0) for o in operand_names(line, match.end() - 1))
        op_name = re.search(r'op_name="([^"]*)"', line)
        backward = op_name is not None and "transpose(" in op_name.group(1)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        if frame is None:
            found[Source("", opcode, 0, backward)] += moved
            continue
        file_id, function_id, number = locations[frames[frame.group(1)]]
        found[Source(os.path.basename(files[file_id]), functions[function_id], number,
                     backward)] += moved
    return found


def modelled_bytes_by_source(traced, graph) -> Counter:
    """Bytes the cost model prices for each equation (its node's first strategy: on one
    device, the only one), per :class:`Source` of the equation."""
    found: Counter = Counter()
    for node in graph.nodes:
        if node.eqn is None:
            continue
        innermost = traced.sources[node.eqn].rsplit(" via ", 1)[-1]  # as HLO's frame
        where = re.search(r"([^/]*):(\d+):\d+ \((.*)\)$", innermost)
        backward = "transpose(" in (traced.scopes[node.eqn] if traced.scopes else "")
        source = Source("", "?", 0, backward) if where is None else \
            Source(where.group(1), where.group(3), int(where.group(2)), backward)
        found[source] += node.strategies[0].bytes_accessed
    return found


def compare(fn, args) -> tuple[Counter, Counter, float]:
    """(modelled, compiled bytes per :class:`Source`, ``cost_analysis``'s total) of
    ``fn(*args)`` on one device."""
    import jax

    import autoshard
    from autoshard.intra.graph import build_graph
    from autoshard.ir.trace import trace
    from cost_model import MeshCostModel
    traced = trace(fn, args)
    graph = build_graph(traced, MeshCostModel(autoshard.cluster_preset("host-cpu"), (1,)))
    compiled = jax.jit(fn).lower(*args).compile()
    return (modelled_bytes_by_source(traced, graph), compiled_bytes_by_source(compiled.as_text()),
            float(compiled.cost_analysis()["bytes accessed"]))


def report(modelled: Counter, compiled: Counter, total: float, lines: bool = False) -> str:
    """The comparison as text: totals, then per function (and pass), largest difference
    first; with ``lines``, each function's lines beneath it."""
    def per_function(counter):
        out: Counter = Counter()
        for s, nbytes in counter.items():
            out[(s.file, s.function, s.backward)] += nbytes
        return out
    mf, cf = per_function(modelled), per_function(compiled)
    rows = [f"modelled {sum(modelled.values()) / 1e6:.3f} MB, compiled {sum(compiled.values()) / 1e6:.3f} "
            f"MB (operand and result sizes; cost_analysis {total / 1e6:.3f} MB)",
            f"{'function':<48} {'pass':<8} {'modelled MB':>12} {'compiled MB':>12} {'diff MB':>10}"]
    for key in sorted(set(mf) | set(cf), key=lambda k: (-abs(mf[k] - cf[k]), k)):
        file, function, backward = key
        rows.append(f"{(file + ' ' + function)[:48]:<48} {'backward' if backward else 'forward':<8} "
                    f"{mf[key] / 1e6:12.3f} {cf[key] / 1e6:12.3f} {(mf[key] - cf[key]) / 1e6:+10.3f}")
        if lines:
            for s in sorted({s for s in (*modelled, *compiled)
                             if (s.file, s.function, s.backward) == key}, key=lambda s: s.line):
                rows.append(f"{'':>4}line {s.line:<37} {'':<8} {modelled[s] / 1e6:12.3f} "
                            f"{compiled[s] / 1e6:12.3f} {(modelled[s] - compiled[s]) / 1e6:+10.3f}")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", help="a benchmarks.run workload name (gpt_small, moe, ...)")
    parser.add_argument("--lines", action="store_true", help="each function's lines too")
    options = parser.parse_args(argv)
    from benchmarks.run import WORKLOAD_CONFIGS
    if options.workload not in WORKLOAD_CONFIGS:
        sys.exit(f"unknown workload {options.workload!r}: one of {', '.join(WORKLOAD_CONFIGS)}")
    workload = WORKLOAD_CONFIGS[options.workload][0](True)
    print(report(*compare(workload.fn, workload.args), lines=options.lines))


if __name__ == "__main__":
    main()
