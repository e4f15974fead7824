"""Migration operations shared by the apps."""

from __future__ import annotations

from typing import Any

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db.migrations import AddIndex, AlterField


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


class AlterFieldDropIndex(AlterField):
    """AlterField for a field that loses its own index (db_index=True to False, a foreign key's
    included), whose database side is only that: DROP INDEX of each single-column, non-unique
    index on the field's column, as the database lists them (on PostgreSQL a CharField's
    `varchar_pattern_ops` twin too). AlterField's own schema change drops and re-adds a foreign
    key's constraint as well, which makes PostgreSQL check every row of the table under a lock
    that holds its writes; nothing about the constraint changes here. Backwards, AlterField's
    (the index made again)."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        model = to_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        column = model._meta.get_field(self.name).column
        names = schema_editor._constraint_names(model, [column], index=True, unique=False, primary_key=False)
        for name in sorted(names):
            schema_editor.execute(schema_editor._delete_index_sql(model, name))

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        # AlterField's backwards is its forwards (from the state after the migration to the one
        # before): its own, not the above.
        AlterField.database_forwards(self, app_label, schema_editor, from_state, to_state)
