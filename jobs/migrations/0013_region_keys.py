from django.db import migrations
from django.db.models import Q
from django.db.models.functions import Lower, Trim


def regions_as_keys(apps, schema_editor):  # type: ignore[no-untyped-def]
    """Jobs' regions as providers.models.region_key stores them (providers 0011 does the
    machines'): a pending job that asked for "EU-West" is matched with the machines of eu-west."""
    Job = apps.get_model("jobs", "Job")
    Job.objects.filter(~Q(region=Lower(Trim("region")))).update(region=Lower(Trim("region")))


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0012_index_entries_not_written"),
        ("providers", "0011_region_keys"),
    ]

    operations = [
        migrations.RunPython(regions_as_keys, migrations.RunPython.noop),
    ]
