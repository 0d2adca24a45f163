"""Byte sizes as people write them ("4GiB", "512M", "1.5g") and back."""
from __future__ import annotations

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str | float) -> int:
    """Bytes from ``"4GiB"``, ``"4G"``, ``"4gb"`` (all binary units, k to P), ``"512M"``
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


def resolve_size(text: str | float, *, whole: int | None = None, what: str = "the whole") -> int:
    """Bytes from a size (:func:`parse_size`) or a share: ``"50%"`` is half of
    ``whole`` (e.g. the model's weights), ``"25%ram"`` a quarter of the memory
    available now (``MemAvailable``)."""
    if isinstance(text, str) and "%" in text:
        number, _, of = text.strip().lower().partition("%")
        try:
            share = float(number) / 100
        except ValueError:
            raise ValueError(f"not a share: {text!r} (try 50% or 25%ram)") from None
        of = of.strip()
        if share <= 0 or (of == "ram" and share > 1):
            raise ValueError(f"a share must be above 0%{' and at most 100% of RAM' if of == 'ram' else ''}: {text!r}")
        if of == "ram":
            return int(share * available_ram())
        if of:
            raise ValueError(f"not a share: {text!r} (50% is of {what}; 25%ram of the memory available)")
        if whole is None:
            raise ValueError(f"{text!r}: a share needs something to be a share of here; give a size such as 4GiB")
        return int(share * whole)
    return parse_size(text)


def available_ram() -> int:
    """Bytes of memory available to new work now (``MemAvailable`` of /proc/meminfo)."""
    return _meminfo("MemAvailable")


def total_ram() -> int:
    """Bytes of physical memory (``MemTotal`` of /proc/meminfo)."""
    return _meminfo("MemTotal")


def _meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == field:
                    return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import os  # noqa: PLC0415 - only where /proc is missing

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def human(n: float) -> str:
    """``2.00 GiB``, ``12.5 MiB``, ``900 B``."""
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit in ("GiB", "TiB", "PiB") else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


__all__ = ["available_ram", "human", "parse_size", "resolve_size", "total_ram"]
