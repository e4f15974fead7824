from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "Marketplace"

    def ready(self) -> None:
        from billing.signals import budgets_reserved
        from jobs.signals import lease_ended

        # A job whose budget the escrow just reserved may be placed, and one waiting for a GPU may
        # get the one a lease just freed: match at once, not at the next beat run.
        budgets_reserved.connect(_match_soon, dispatch_uid="marketplace.match_reserved")
        lease_ended.connect(_match_soon, dispatch_uid="marketplace.match_freed")


def _match_soon(**kwargs: object) -> None:
    from marketplace.matching import matching_request_soon

    matching_request_soon()
