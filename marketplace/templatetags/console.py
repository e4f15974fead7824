"""Filters of the operator console's templates."""

from __future__ import annotations

from datetime import datetime, timedelta

from django import template

from core.charts import when as _when

register = template.Library()


@register.filter
def when(moment: datetime | None) -> str:
    """A time to the second, in the console's zone, with the zone's name ("-" for none)."""
    return _when(moment) if moment is not None else "-"


@register.filter
def percent(share: float | None) -> str:
    """0.25 → "25.0 %"; None (nothing to divide by) → "-"."""
    return f"{share * 100:.1f} %" if share is not None else "-"


@register.filter
def duration(span: timedelta) -> str:
    """A bucket's length: "5 min", "1 h"."""
    minutes = int(span.total_seconds() // 60)
    return f"{minutes // 60} h" if minutes % 60 == 0 else f"{minutes} min"
