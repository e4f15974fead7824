from django.db import migrations, models

from core.migration_ops import AddIndexOnline


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY runs outside a transaction (core.migration_ops).
    atomic = False

    dependencies = [
        ("jobs", "0009_job_keep_checkpoint"),
    ]

    operations = [
        AddIndexOnline(model_name="lease", index=models.Index(fields=["created_at"], name="lease_created_at")),
        AddIndexOnline(model_name="lease", index=models.Index(fields=["ended_at"], name="lease_ended_at")),
    ]
