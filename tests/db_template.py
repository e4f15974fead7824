"""On PostgreSQL under pytest-xdist: migrate one test database, then copy it for each worker.

pytest-django gives each xdist worker its own test database (`test_gpgpu_gw0`, …), and each
worker migrates its own: the project's 36 migrations took 4.9 s (3.9 s of it the worker's CPU) a
worker, five times over while the workers start together on the run's cores. Here the first
worker to get there migrates a template database and every worker then creates its own from it
(`CREATE DATABASE … TEMPLATE`, a copy of the files: a fraction of a second). The template belongs
to one run (its name carries an id the controller set before starting the workers) and the
controller drops it at the end, so a run never starts from another run's migrations.

A worker that keeps its database (`--reuse-db`), a run without xdist and SQLite go through
Django's own `create_test_db` as before.
"""

from __future__ import annotations

import os
import secrets
import warnings
from typing import Any

import pytest

RUN_ENV = "GPGPU_TEST_TEMPLATE_RUN"
# One lock for every worker of every run on the server (pg_advisory_lock's key).
_LOCK_KEY = 0x6770_6770


def template_name(test_database_name: str, run: str) -> str:
    """`test_gpgpu_gw3` of run `ab12…` → `test_gpgpu_template_ab12…` (under 63 characters)."""
    base = test_database_name.rsplit("_gw", 1)[0]
    return f"{base}_template_{run}"[:63]


def install() -> None:
    """Wrap Django's `create_test_db` (the one pytest-django's `django_db_setup` calls)."""
    from django.conf import settings
    from django.db.backends.base.creation import BaseDatabaseCreation

    create = BaseDatabaseCreation.create_test_db

    def create_test_db(
        self: BaseDatabaseCreation,
        verbosity: int = 1,
        autoclobber: bool = False,
        serialize: bool = True,
        keepdb: bool = False,
    ) -> str:
        run = os.environ.get(RUN_ENV)
        if self.connection.vendor != "postgresql" or keepdb or not run or not os.environ.get("PYTEST_XDIST_WORKER"):
            return create(self, verbosity, autoclobber, serialize, keepdb)
        target = self._get_test_db_name()
        template = template_name(target, run)
        test_settings = self.connection.settings_dict["TEST"]
        quote = self.connection.ops.quote_name
        with self._nodb_cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", [_LOCK_KEY])
            try:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [template])
                if cursor.fetchone() is None:
                    # Migrated under the template's name, by Django's own steps.
                    name = test_settings.get("NAME")
                    test_settings["NAME"] = template
                    try:
                        create(self, verbosity, True, False, False)
                    finally:
                        test_settings["NAME"] = name
                    self.connection.close()  # a template must have no session open on it
                if verbosity >= 1:
                    self.log(f"Creating test database {target} from {template}...")
                cursor.execute(f"DROP DATABASE IF EXISTS {quote(target)}")
                cursor.execute(f"CREATE DATABASE {quote(target)} TEMPLATE {quote(template)}")
            finally:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [_LOCK_KEY])
        self.connection.close()
        settings.DATABASES[self.connection.alias]["NAME"] = target
        self.connection.settings_dict["NAME"] = target
        if serialize:
            self.connection._test_serialized_contents = self.serialize_db_to_string()  # type: ignore[attr-defined]
        self.connection.ensure_connection()
        return target

    BaseDatabaseCreation.create_test_db = create_test_db  # type: ignore[method-assign]


def configure(config: pytest.Config) -> None:
    """In the controller, before xdist starts its workers (they inherit the environment): this
    run's id for the template's name."""
    if not hasattr(config, "workerinput") and not os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ[RUN_ENV] = secrets.token_hex(6)


def drop(config: pytest.Config) -> None:
    """In the controller, at the end of the run: drop the run's template if a worker made one."""
    run = os.environ.get(RUN_ENV)
    if hasattr(config, "workerinput") or os.environ.get("PYTEST_XDIST_WORKER") or not run:
        return
    from django.db import connections

    connection = connections["default"]
    if connection.vendor != "postgresql":
        return
    import psycopg

    params: dict[str, Any] = connection.get_connection_params()
    params["dbname"] = "postgres"
    test_name = connection.creation._get_test_db_name()
    try:
        with psycopg.connect(**params, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {connection.ops.quote_name(template_name(test_name, run))}")
    except psycopg.Error as exc:  # the server went away: the template is left, under this run's id
        warnings.warn(f"could not drop the test databases' template: {exc}", stacklevel=1)
