"""Test set-up: 8 virtual CPU devices, before jax is imported anywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Plans as jax.distributed processes make them (CP-SAT's deterministic limit, not the wall
# clock), so a loaded machine cannot change what a test sees; the wall-clock path is
# tested where a test unsets it (tests/test_parallelize.py, tests/test_ilp.py).
os.environ.setdefault("AUTOSHARD_DETERMINISTIC", "1")
