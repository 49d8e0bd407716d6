"""The intermediate representations every layer above shares: a traced function as a flat
:class:`~autoshard.ir.program.Program` (its fingerprint, PartitionSpec conversion, and the
one adapter to jax internals, :mod:`autoshard.ir.jax_compat`), and a compiled program's
HLO as XLA printed it (:mod:`autoshard.ir.hlo`: collectives, cost and memory analyses)."""
