"""Database-level guards of the ledger, beyond what the ORM enforces:

- entries and postings cannot be updated (both backends) or deleted (PostgreSQL; SQLite's test
  flush deletes rows, so there the ORM guard alone refuses deletes);
- on PostgreSQL, a deferred constraint trigger refuses, at commit, any entry whose postings do
  not sum to zero.
"""

from django.db import migrations

SQLITE_FORWARD = [
    "CREATE TRIGGER billing_ledgerentry_no_update BEFORE UPDATE ON billing_ledgerentry "
    "BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;",
    "CREATE TRIGGER billing_posting_no_update BEFORE UPDATE ON billing_posting "
    "BEGIN SELECT RAISE(ABORT, 'ledger postings are append-only'); END;",
]
SQLITE_BACKWARD = [
    "DROP TRIGGER IF EXISTS billing_ledgerentry_no_update;",
    "DROP TRIGGER IF EXISTS billing_posting_no_update;",
]

POSTGRES_FORWARD = [
    """
    CREATE FUNCTION billing_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION '% rows are append-only', TG_TABLE_NAME;
    END $$;
    """,
    "CREATE TRIGGER billing_ledgerentry_append_only BEFORE UPDATE OR DELETE ON billing_ledgerentry "
    "FOR EACH ROW EXECUTE FUNCTION billing_append_only();",
    "CREATE TRIGGER billing_posting_append_only BEFORE UPDATE OR DELETE ON billing_posting "
    "FOR EACH ROW EXECUTE FUNCTION billing_append_only();",
    """
    CREATE FUNCTION billing_entry_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE total numeric;
    BEGIN
        SELECT COALESCE(SUM(amount), 0) INTO total FROM billing_posting WHERE entry_id = NEW.entry_id;
        IF total <> 0 THEN
            RAISE EXCEPTION 'ledger entry % sums to %, not zero', NEW.entry_id, total;
        END IF;
        RETURN NULL;
    END $$;
    """,
    "CREATE CONSTRAINT TRIGGER billing_posting_balanced AFTER INSERT ON billing_posting "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION billing_entry_balanced();",
]
POSTGRES_BACKWARD = [
    "DROP TRIGGER IF EXISTS billing_posting_balanced ON billing_posting;",
    "DROP FUNCTION IF EXISTS billing_entry_balanced();",
    "DROP TRIGGER IF EXISTS billing_posting_append_only ON billing_posting;",
    "DROP TRIGGER IF EXISTS billing_ledgerentry_append_only ON billing_ledgerentry;",
    "DROP FUNCTION IF EXISTS billing_append_only();",
]


def _run(statements_by_vendor):
    def run(apps, schema_editor):
        for statement in statements_by_vendor.get(schema_editor.connection.vendor, []):
            schema_editor.execute(statement, params=None)

    return run


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]

    operations = [
        migrations.RunPython(
            _run({"sqlite": SQLITE_FORWARD, "postgresql": POSTGRES_FORWARD}),
            _run({"sqlite": SQLITE_BACKWARD, "postgresql": POSTGRES_BACKWARD}),
        )
    ]
