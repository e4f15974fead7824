"""manage.py fleet_summarise: compute the fleet's hourly summary over the last days (a backfill)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from core.locks import try_lock
from marketplace.fleet_summary import HOUR, SUMMARY_DAYS, fleet_hours_summarise, floor_to


class Command(BaseCommand):
    help = (
        "Compute (or recompute) the fleet's hourly summary, which the console's dashboard reads, for "
        "every hour that ended in the last --days days, a day at a time; existing hours are replaced. "
        "The summary task (beat entry summarise-fleet) fills missing hours of the last week by itself; "
        "this does it at once, or over a span the task would not touch."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, default=SUMMARY_DAYS, help=f"how far back (default {SUMMARY_DAYS})")

    def handle(self, *args: Any, **options: Any) -> None:  # BaseCommand.handle's signature
        if options["days"] < 1:
            raise CommandError("--days must be at least 1")
        now = timezone.now()
        end = floor_to(now, HOUR)
        at = end - timedelta(days=options["days"])
        started, hours = time.monotonic(), 0
        # The summary task's lock: two writers of one hour would insert its breakdown rows twice.
        with try_lock("marketplace.tasks.summarise_fleet") as locked:
            if not locked:
                raise CommandError("the summary task is running; try again when it is done")
            while at < end:
                # A day per call: each commits on its own, and a day's sources fit in memory.
                hours += fleet_hours_summarise(start=at, end=min(at + timedelta(days=1), end), now=now)
                at += timedelta(days=1)
        self.stdout.write(f"{hours} hours summarised in {time.monotonic() - started:.1f} s")
