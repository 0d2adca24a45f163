"""Byte sizes as people write them ("4GiB", "512M", "1.5g") and back."""
from __future__ import annotations

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | float) -> int:
    """Bytes from ``"4GiB"``, ``"4G"``, ``"4gb"`` (all binary units), ``"512M"``
    or a plain integer; raises ``ValueError`` for anything else or a negative size."""
    if isinstance(text, (int, float)):
        n = int(text)
    else:
        t = str(text).strip().lower().removesuffix("ib").removesuffix("b")
        try:
            n = int(float(t[:-1]) * _UNITS[t[-1]]) if t and t[-1] in _UNITS else int(t)
        except (ValueError, KeyError):
            raise ValueError(f"not a size: {text!r} (try 4GiB, 512MiB or a byte count)") from None
    if n < 0:
        raise ValueError(f"a size cannot be negative: {text!r}")
    return n


def human(n: float) -> str:
    """``2.00 GiB``, ``12.5 MiB``, ``900 B``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


__all__ = ["human", "parse_size"]
