"""Intra-operator parallelism: sharding strategies per equation, the sharding graph, their
prices, and the planner that turns them into an ILP (``autoshard.ilp``) and back into a
:class:`~autoshard.plan.record.Plan`."""
