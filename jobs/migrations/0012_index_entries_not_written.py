from django.db import migrations, models

from core.migration_ops import AddConstraintOnline, AddIndexOnline, AlterFieldDropIndex


class Migration(migrations.Migration):
    # Index entries every new lease and every event the marketplace writes itself made for
    # nothing: the lease status's pattern-matching twin (no query matches a pattern on it), the
    # running leases' NULL ended_at, and the events' NULL idempotency key in its unique index and
    # that index's pattern twin. Each new index is made online, before the one it replaces goes.
    atomic = False

    dependencies = [
        ("jobs", "0011_indexes_others_cover"),
    ]

    operations = [
        AddIndexOnline(
            model_name="lease",
            index=models.Index(fields=["status"], name="lease_status"),
        ),
        AlterFieldDropIndex(
            model_name="lease",
            name="status",
            field=models.CharField(
                choices=[("assigned", "Assigned"), ("running", "Running"), ("ended", "Ended")],
                default="assigned",
                max_length=16,
            ),
        ),
        AddIndexOnline(
            model_name="lease",
            index=models.Index(
                condition=models.Q(("ended_at__isnull", False)), fields=["ended_at"], name="lease_ended"
            ),
        ),
        migrations.RemoveIndex(model_name="lease", name="lease_ended_at"),
        AddConstraintOnline(
            model_name="event",
            constraint=models.UniqueConstraint(
                condition=models.Q(("idempotency_key__isnull", False)),
                fields=("idempotency_key",),
                name="event_unique_idempotency_key",
            ),
        ),
        migrations.AlterField(
            model_name="event",
            name="idempotency_key",
            field=models.CharField(blank=True, max_length=128, null=True),
        ),
    ]
