"""The ``XLA_FLAGS`` that give a process ``n`` virtual CPU devices (imports no jax)."""
from __future__ import annotations

import os
import re
import sys

_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def with_host_devices(flags: str, n: int) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) asking for ``n`` virtual CPU devices instead of
    any count it names."""
    return (_COUNT.sub("", flags).strip() + f" --xla_force_host_platform_device_count={n}").strip()


def force_host_devices(n: int) -> None:
    """Give this process ``n`` virtual CPU devices; a no-op once jax is imported (it has
    read the flags then), so scripts call it before importing jax."""
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = with_host_devices(os.environ.get("XLA_FLAGS", ""), n)
