"""Column names for the SQL the providers app writes itself (set-based heartbeat writes)."""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.db.models import Field, Model


def field_column(model: type[Model], name: str) -> tuple[Field[Any, Any], str]:
    """A concrete field of `model` and its column's quoted name."""
    field = model._meta.get_field(name)
    assert isinstance(field, Field) and field.column is not None
    return field, connection.ops.quote_name(field.column)
