from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('jobs', '0015_logchunk_job_charged'),
    ]

    operations = [
        migrations.AddField(
            model_name='lease',
            name='start_reported_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
