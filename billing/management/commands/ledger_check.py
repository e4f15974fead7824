"""manage.py ledger_check: verify the ledger's invariants; exit 1 on any violation."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from billing.models import LedgerAccount, LedgerEntry
from billing.selectors import ledger_violations


class Command(BaseCommand):
    help = (
        "Check the billing ledger: entries sum to zero, cached balances match postings, no guarded "
        "balance is negative, money is conserved, finished jobs have released their budgets."
    )

    def handle(self, *args: Any, **options: Any) -> None:  # BaseCommand.handle's signature
        from billing.deposits import chain_flags

        problems = ledger_violations() + chain_flags()
        self.stdout.write(
            f"Checked {LedgerEntry.objects.count()} entries and {LedgerAccount.objects.count()} accounts."
        )
        if not problems:
            self.stdout.write("OK: every invariant holds.")
            return
        self.stdout.write(f"{len(problems)} violation(s):")
        for problem in problems:
            self.stdout.write(f"  - {problem}")
        raise CommandError("the ledger has violations", returncode=1)
