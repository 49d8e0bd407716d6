"""The jaxpr-level IR every layer above shares: a traced function as a flat
:class:`~autoshard.ir.program.Program`, its fingerprint, PartitionSpec conversion, and
the one adapter to jax internals (:mod:`autoshard.ir.jax_compat`)."""
