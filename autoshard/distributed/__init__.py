"""Multi-process (``jax.distributed``) runs: plan agreement across processes, and
process-local data as global arrays, and outputs as whole values in every process."""
