from __future__ import annotations

from datetime import datetime

from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "Marketplace"

    def ready(self) -> None:
        from billing.signals import budgets_reserved
        from jobs.signals import lease_ended
        from providers.signals import rollups_written

        # A job whose budget the escrow just reserved may be placed, and one waiting for a GPU may
        # get the one a lease just freed: match at once, not at the next beat run.
        budgets_reserved.connect(_match_soon, dispatch_uid="marketplace.match_reserved")
        lease_ended.connect(_match_soon, dispatch_uid="marketplace.match_freed")
        # The fleet summary's hours whose sources changed after they were summarised: a late or
        # backfilled rollup, a lease ended back in an earlier hour (marketplace.fleet_summary).
        rollups_written.connect(_rollups_written, dispatch_uid="marketplace.summary_rollups")
        lease_ended.connect(_lease_ended, dispatch_uid="marketplace.summary_lease_ended")


def _match_soon(**kwargs: object) -> None:
    from marketplace.matching import matching_request_soon

    matching_request_soon()


def _rollups_written(*, start: datetime, end: datetime, **kwargs: object) -> None:
    from marketplace.fleet_summary import fleet_hours_changed

    fleet_hours_changed(start=start, end=end)


def _lease_ended(*, ended_at: datetime, **kwargs: object) -> None:
    from marketplace.fleet_summary import HOUR, fleet_hours_changed

    fleet_hours_changed(start=ended_at, end=ended_at + HOUR)
