"""Test set-up: 8 virtual CPU devices, before jax is imported anywhere."""
import os

from tests.compile_flags import FAST_COMPILE  # noqa: E402  (imports no jax)

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
# Plans as jax.distributed processes make them (CP-SAT's deterministic limit, not the wall
# clock), so a loaded machine cannot change what a test sees; the wall-clock path is
# tested where a test unsets it (tests/test_parallelize.py, tests/test_ilp.py).
os.environ.setdefault("AUTOSHARD_DETERMINISTIC", "1")
