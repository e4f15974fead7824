"""Migration operations shared by the apps."""

from __future__ import annotations

from typing import Any

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db.migrations import AddConstraint, AddIndex, AlterField
from django.db.migrations.operations.base import Operation


class AddIndexOnline(AddIndexConcurrently):
    """AddIndex that does not block writes on PostgreSQL (CREATE INDEX CONCURRENTLY: the lease
    and ledger tables take writes all the time, and a plain CREATE INDEX would hold them for as
    long as it reads the table); a plain CREATE INDEX elsewhere (SQLite, the embedded default).
    Its migration must say `atomic = False`, and holds nothing else."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)
        else:
            AddIndex.database_forwards(self, app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)
        else:
            AddIndex.database_backwards(self, app_label, schema_editor, from_state, to_state)


class AddConstraintOnline(AddConstraint):
    """AddConstraint of a UniqueConstraint with a condition (on PostgreSQL a unique partial
    index) that does not block writes there: CREATE UNIQUE INDEX CONCURRENTLY, as
    AddIndexOnline does for an index; a plain AddConstraint elsewhere. Its migration must say
    `atomic = False`."""

    def __init__(self, model_name: str, constraint: Any) -> None:
        if getattr(constraint, "condition", None) is None or not hasattr(constraint, "fields"):
            raise ValueError("AddConstraintOnline makes unique constraints with a condition (unique partial indexes)")
        super().__init__(model_name, constraint)

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        model = to_state.apps.get_model(app_label, self.model_name)
        if schema_editor.connection.vendor != "postgresql" or not self.allow_migrate_model(
            schema_editor.connection.alias, model
        ):
            super().database_forwards(app_label, schema_editor, from_state, to_state)
            return
        sql = str(self.constraint.create_sql(model, schema_editor))
        if not sql.startswith("CREATE UNIQUE INDEX "):
            raise ValueError(f"not a unique index: {sql}")
        schema_editor.execute("CREATE UNIQUE INDEX CONCURRENTLY " + sql.removeprefix("CREATE UNIQUE INDEX "))


class AlterFieldDropIndex(AlterField):
    """AlterField for a field that loses its own index (db_index=True to False, a foreign key's
    included), whose database side is only that: DROP INDEX of each single-column, non-unique
    index on the field's column, as the database lists them (on PostgreSQL a CharField's
    `varchar_pattern_ops` twin too). AlterField's own schema change drops and re-adds a foreign
    key's constraint as well, which makes PostgreSQL check every row of the table under a lock
    that holds its writes; nothing about the constraint changes here. An index the model
    declares in Meta.indexes under its name is kept (one made before, online, to take over).
    Backwards, AlterField's (the index made again)."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        model = to_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        column = model._meta.get_field(self.name).column
        names = schema_editor._constraint_names(model, [column], index=True, unique=False, primary_key=False)
        names = set(names) - {index.name for index in model._meta.indexes}
        for name in sorted(names):
            schema_editor.execute(schema_editor._delete_index_sql(model, name))

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        # AlterField's backwards is its forwards (from the state after the migration to the one
        # before): its own, not the above.
        AlterField.database_forwards(self, app_label, schema_editor, from_state, to_state)


class SetFillFactor(Operation):
    """Set a model's table's `fillfactor` on PostgreSQL (the share of each heap page new rows
    fill; the rest is kept for new versions of the rows already there); nothing elsewhere, and
    nothing in the migration state (a storage parameter, not a model option). An UPDATE that
    changes no indexed column writes its new version on the same page when there is room (a HOT
    update: no index written at all); a table whose rows are updated over and over, many rows of
    a page each time, needs that room kept. Pages already full get it as their rows move; a
    `VACUUM FULL` of the table gives it at once. Backwards: the default (100) again."""

    reduces_to_sql = True
    reversible = True

    def __init__(self, model_name: str, fillfactor: int) -> None:
        if not 10 <= fillfactor <= 100:
            raise ValueError("a fillfactor is a percentage from 10 to 100")
        self.model_name = model_name
        self.fillfactor = fillfactor

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        return self.__class__.__name__, [], {"model_name": self.model_name, "fillfactor": self.fillfactor}

    def state_forwards(self, app_label: str, state: Any) -> None:
        pass

    def _set(self, app_label: str, schema_editor: Any, state: Any, value: int | None) -> None:
        model = state.apps.get_model(app_label, self.model_name)
        if schema_editor.connection.vendor != "postgresql" or not self.allow_migrate_model(
            schema_editor.connection.alias, model
        ):
            return
        table = schema_editor.quote_name(model._meta.db_table)
        if value is None:
            schema_editor.execute(f"ALTER TABLE {table} RESET (fillfactor)")
        else:
            schema_editor.execute(f"ALTER TABLE {table} SET (fillfactor = {int(value)})")

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        self._set(app_label, schema_editor, to_state, self.fillfactor)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        self._set(app_label, schema_editor, to_state, None)

    def describe(self) -> str:
        return f"Set the fillfactor of {self.model_name}'s table to {self.fillfactor} (PostgreSQL)"

    @property
    def migration_name_fragment(self) -> str:
        return f"{self.model_name.lower()}_fillfactor_{self.fillfactor}"
