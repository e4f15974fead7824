"""Durations, memory sizes and prices as people write them, to the API's units."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_DURATION_RE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>s|m|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>gb|g|gib|mb|m|mib)?", re.IGNORECASE)
# The API counts VRAM in MiB, as NVIDIA's driver reports it (a 24 GB card shows 24564 MiB).
MIB_PER_GB = 1024
_PRICE_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_duration(text: str | int) -> int:
    """Seconds from `3600`, `90s`, `30m`, `2h`, `1.5h` or `1d`; ValueError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return text
    match = _DURATION_RE.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 3600, 90s, 30m, 2h, 1d)")
    unit = (match["unit"] or "s").lower()
    return round(Decimal(match["number"]) * _DURATION_UNITS[unit])


def parse_vram_mb(text: str | int) -> int:
    """MiB from a size: a bare number or `GB`/`G` is gigabytes (×1024), `MB`/`M` is MiB."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text * MIB_PER_GB
    match = _SIZE_RE.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a memory size (e.g. 24, 24gb, 24564mb)")
    unit = (match["unit"] or "gb").lower()
    number = Decimal(match["number"])
    return round(number if unit in {"mb", "m", "mib"} else number * MIB_PER_GB)


def parse_price(text: str | int | float) -> Decimal:
    """A price per GPU-hour as a Decimal (from a string such as "0.5", an int, or a TOML/YAML
    float, read through its shortest repr)."""
    raw = repr(text) if isinstance(text, float) else str(text).strip()
    if isinstance(text, bool) or not _PRICE_RE.fullmatch(raw):
        raise ValueError(f"{text!r} is not a price (e.g. 0.5)")
    try:
        return Decimal(raw)
    except InvalidOperation as exc:
        raise ValueError(f"{text!r} is not a price (e.g. 0.5)") from exc
