from django.db import migrations

# jobs.ingestion.LOG_CHUNK_MIN_CHARGE when this was written (a migration keeps its own copy).
MIN_CHARGE = 256


def count_up(apps, schema_editor):  # type: ignore[no-untyped-def]
    """Each kept chunk's job_charged: its job's charged bytes up to and including it, in id order
    (what the job's bound was checked against when it was stored)."""
    LogChunk = apps.get_model("jobs", "LogChunk")
    rows = LogChunk.objects.order_by("job_id", "pk").values_list("pk", "job_id", "size")
    job, total, batch = None, 0, []
    for pk, job_id, size in rows.iterator(chunk_size=2000):
        if job_id != job:
            job, total = job_id, 0
        total += max(size, MIN_CHARGE)
        batch.append(LogChunk(pk=pk, job_charged=total))
        if len(batch) >= 2000:
            LogChunk.objects.bulk_update(batch, ["job_charged"])
            batch = []
    if batch:
        LogChunk.objects.bulk_update(batch, ["job_charged"])


class Migration(migrations.Migration):
    # Not atomic: each batch commits on its own, so the table is never held for the whole fill (a
    # fill stopped half-way is done again from the start, the same values).
    atomic = False

    dependencies = [
        ("jobs", "0016_lease_start_reported_at"),
    ]

    operations = [
        migrations.RunPython(count_up, migrations.RunPython.noop),
    ]
