"""Units for people: ``parse_bytes("16GiB")``, ``format_bytes(n)``, ``format_seconds(s)``:
the one formatter of bytes and seconds every message and view uses."""

from __future__ import annotations

import math
import numbers
import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")

# Lower-cased unit -> bytes. SI units are powers of 1000, IEC units powers of 1024.
_UNIT_BYTES = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}

_EXAMPLE = "e.g. 16GiB, '500MB', '1.5 GB', '64KiB' or an int number of bytes"


def parse_bytes(value: int | float | str) -> int:
    """Return ``value`` as a non-negative whole number of bytes.

    Accepts ints (bytes), finite non-negative floats (rounded) and strings such as
    ``"16GiB"``, ``"500MB"``, ``"1.5 GB"``, ``"64KiB"``, ``"123"``. Units are
    case-insensitive: kB/MB/GB/TB/PB are powers of 1000, KiB/MiB/GiB/TiB/PiB powers of
    1024, B or no unit means bytes. Raises ``ValueError`` for anything else
    (negatives, empty strings, unknown units, bools).
    """
    if isinstance(value, bool):
        raise ValueError(f"byte size must be a number or a string, got bool {value!r} ({_EXAMPLE})")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"byte size must be non-negative, got {value!r} ({_EXAMPLE})")
        return int(value)
    if isinstance(value, numbers.Real):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"byte size must be finite and non-negative, got {value!r} ({_EXAMPLE})")
        return int(round(value))
    if not isinstance(value, str):
        raise ValueError(f"byte size must be an int or a string, got {type(value).__name__} {value!r} ({_EXAMPLE})")
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"cannot parse byte size {value!r}: expected a non-negative number and a unit ({_EXAMPLE})")
    number, unit = match.groups()
    multiplier = _UNIT_BYTES.get(unit.lower())
    if multiplier is None:
        raise ValueError(
            f"unknown unit {unit!r} in byte size {value!r}: use B, kB, MB, GB, TB, PB, "
            f"KiB, MiB, GiB, TiB or PiB ({_EXAMPLE})"
        )
    if "." in number:
        return int(round(float(number) * multiplier))
    return int(number) * multiplier


def format_bytes(nbytes: int | float) -> str:
    """Human-readable IEC size: ``format_bytes(512) == "512 B"``, ``1.5 * 2**30 -> "1.50 GiB"``."""
    if not math.isfinite(nbytes):
        return f"{nbytes} B"
    sign = "-" if nbytes < 0 else ""
    size = abs(nbytes)
    if size < 1024:
        return f"{sign}{int(size) if float(size).is_integer() else size} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024:
            return f"{sign}{size:.2f} {unit}"
    return f"{sign}{size / 1024:.2f} PiB"


def format_seconds(seconds: float) -> str:
    """Human-readable time: ``1.5 -> "1.500 s"``, ``0.00123 -> "1.230 ms"``,
    ``2.5e-5 -> "25.0 µs"``, ``3e-9 -> "3.0 ns"`` (sign kept)."""
    seconds = float(seconds)
    if not math.isfinite(seconds):
        return f"{seconds} s"
    sign, size = ("-" if seconds < 0 else ""), abs(seconds)
    if size >= 1 or size == 0:
        return f"{sign}{size:.3f} s"
    if size >= 1e-3:
        return f"{sign}{size * 1e3:.3f} ms"
    if size >= 1e-6:
        return f"{sign}{size * 1e6:.1f} µs"
    return f"{sign}{size * 1e9:.1f} ns"
