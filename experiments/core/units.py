"""Units and their readable forms, defined once for every table, row, figure and message."""

from __future__ import annotations

KIB = float(1 << 10)
MIB = float(1 << 20)
GIB = float(1 << 30)


def format_bytes(n: float | None, digits: int = 3) -> str:
    """``n`` bytes in the largest unit that keeps the number at least 1: ``512 B``, ``7.2 MiB``,
    ``46.2 GiB`` (``-`` for ``None``)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.{digits}g} {unit}" if abs(value) < 10**digits else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def byte_unit(values_bytes) -> tuple[str, float]:
    """One unit for a set of byte values (a table column, a figure axis): ``GiB`` when the largest
    is at least 1 GiB, else ``MiB``, else ``KiB``; returns ``(name, bytes per unit)``."""
    top = max((abs(v) for v in values_bytes if v is not None), default=0.0)
    if top >= GIB:
        return "GiB", GIB
    if top >= MIB:
        return "MiB", MIB
    return "KiB", KIB


def format_tokens(n: float) -> str:
    """Token counts as ``12K``, ``1M``, ``1.5M`` (binary: 1K = 1024)."""
    if abs(n) >= 1 << 20:
        return f"{n / (1 << 20):g}M"
    if abs(n) >= 1 << 10:
        return f"{n / (1 << 10):g}K"
    return f"{n:g}"
