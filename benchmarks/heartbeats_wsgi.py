"""The project's WSGI app (marketplace.wsgi) for benchmarks/heartbeats.py, with one addition: each
answer carries `X-Bench-SQL-Statements`, how many SQL statements the request sent through
Django's database cursors (savepoints included; the BEGIN and COMMIT that psycopg sends for
transaction.atomic are not). Only the benchmark's web server loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.db import connection

from marketplace.wsgi import application as marketplace_application

HEADER = "X-Bench-SQL-Statements"


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    statements = 0

    def count(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        nonlocal statements
        statements += 1
        return execute(sql, params, many, context)

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        # Django calls this once the view has run, so every statement is counted by now.
        return start_response(status, [*headers, (HEADER, str(statements))], exc_info)

    with connection.execute_wrapper(count):
        return marketplace_application(environ, start)
