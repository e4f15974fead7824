from django.db import migrations, models

from core.migration_ops import AddIndexOnline


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY runs outside a transaction (core.migration_ops).
    atomic = False

    dependencies = [
        ("billing", "0007_ledger_check"),
    ]

    operations = [
        AddIndexOnline(
            model_name="ledgeraccount",
            index=models.Index(condition=models.Q(balance__gt=0), fields=["kind"], name="ledger_account_open"),
        ),
    ]
