from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('jobs', '0017_lease_start_reported_at'),
    ]

    operations = [
        migrations.AddField(
            model_name='lease',
            name='unlisted_since',
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
