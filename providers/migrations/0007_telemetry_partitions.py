"""Raw telemetry partitioned by time on PostgreSQL (providers.telemetry_partitions).

Not atomic: the conversion validates a constraint and builds an index concurrently before its
short cutover transaction, so heartbeats keep writing samples while it runs. Nothing changes in
Django's model state, and nothing happens on SQLite. Reversing it leaves the table partitioned
(every query and the ORM work the same on it); applying it again only adds partitions.
"""

from django.db import migrations
from django.utils import timezone


def partition(apps, schema_editor):
    from providers import telemetry_partitions

    if schema_editor.connection.vendor != "postgresql":
        return
    telemetry_partitions.convert(now=timezone.now(), using=schema_editor.connection.alias)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("providers", "0006_idle_profiles"),
    ]

    operations = [
        migrations.RunPython(partition, migrations.RunPython.noop, elidable=False),
    ]
