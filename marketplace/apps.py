from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "Marketplace"

    def ready(self) -> None:
        from billing.signals import budgets_reserved

        # A job whose budget the escrow just reserved may be placed: match it at once.
        budgets_reserved.connect(_budgets_reserved, dispatch_uid="marketplace.match_reserved")


def _budgets_reserved(**kwargs: object) -> None:
    from marketplace.matching import matching_request_soon

    matching_request_soon()
