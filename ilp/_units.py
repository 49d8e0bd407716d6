"""Human-readable units for messages (bytes per device, seconds)."""

from __future__ import annotations

import math

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(num_bytes: float) -> str:
    """``13421772800`` -> ``"12.50 GiB"`` (binary units, two decimals)."""
    if not math.isfinite(num_bytes):
        return f"{num_bytes} B"
    value = float(num_bytes)
    for unit in _BYTE_UNITS:
        if abs(value) < 1024.0 or unit == _BYTE_UNITS[-1]:
            return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024.0
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    """``0.00123`` -> ``"1.230 ms"``."""
    if not math.isfinite(seconds):
        return f"{seconds} s"
    magnitude = abs(seconds)
    if magnitude >= 1.0 or magnitude == 0.0:
        return f"{seconds:.3f} s"
    if magnitude >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    if magnitude >= 1e-6:
        return f"{seconds * 1e6:.3f} us"
    return f"{seconds * 1e9:.3f} ns"
