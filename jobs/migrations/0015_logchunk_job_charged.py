from django.db import migrations, models


class Migration(migrations.Migration):
    # A job's output used up to now is read from its newest chunk rather than summed over all its
    # chunks for each new one (up to 65,536 rows per job at the default bound). The column is
    # filled in for the kept chunks by the next migration, outside this one's table lock.

    dependencies = [
        ("jobs", "0014_lease_checkpoint_uploads"),
    ]

    operations = [
        migrations.AddField(
            model_name="logchunk",
            name="job_charged",
            field=models.BigIntegerField(default=0),
        ),
    ]
