from django.db import migrations
from django.db.models import Q
from django.db.models.functions import Lower, Trim


def regions_as_keys(apps, schema_editor):  # type: ignore[no-untyped-def]
    """Machines' regions as providers.models.region_key stores them: the matcher compares a job's
    region with a machine's exactly, and a machine that reported "EU-West" never took a job that
    asked for "eu-west" (the search, which compares without case, offered it)."""
    Machine = apps.get_model("providers", "Machine")
    Machine.objects.filter(~Q(region=Lower(Trim("region")))).update(region=Lower(Trim("region")))


class Migration(migrations.Migration):
    dependencies = [
        ("providers", "0010_hot_updates"),
    ]

    operations = [
        migrations.RunPython(regions_as_keys, migrations.RunPython.noop),
    ]
