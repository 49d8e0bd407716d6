"""XLA flags of every program the tests compile, in this process and the ones it starts.

LLVM at -O0: the tests compile hundreds of sharded programs and run them on tiny inputs,
so code generation, not running, is what takes their time (test_presets.py: 46 -> 29 s).
The optimised HLO the tests inspect (SPMD partitioning, collectives, fusion, buffer
assignment, cost and memory analyses) is XLA's HLO pipeline, unchanged by it (checked:
the same optimised HLO, byte for byte, and the same analyses for a GPT on 2x4); only the
machine code differs (e.g. no fused multiply-add contraction, last-bit differences), and
every numerical comparison compiles both sides with it.
"""
FAST_COMPILE = "--xla_backend_optimization_level=0"
