"""The one beat schedule: every entry names a task a worker knows, and expires."""

from __future__ import annotations

from django.conf import settings

from marketplace.celery import app


def test_every_beat_entry_names_a_registered_task_and_expires():
    app.loader.import_default_modules()
    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        assert entry["task"] in app.tasks, f"{name}: no task {entry['task']}"
        assert 0 < entry["options"]["expires"] <= entry["schedule"], name
