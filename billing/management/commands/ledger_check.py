"""manage.py ledger_check: the ledger's invariants, and the ledger against the chain as of a
confirmed block (billing.ledger_check). Exit 0 when they agree, 1 on any violation or difference,
2 when the chain could not be read."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.ledger_check import LedgerCheckResult, ledger_check_run

EXIT_DIFFERENCES = 1
EXIT_CHAIN_UNREADABLE = 2


class Command(BaseCommand):
    help = (
        "Check the billing ledger (entries sum to zero, cached balances match postings, no guarded balance "
        "is negative, money is conserved, finished jobs have released their budgets) and compare it with the "
        "escrow on chain as of the newest block CHAIN_CONFIRMATIONS deep: providers' earnings, fees, each "
        "renter's balance and reserved part, each job's budget and settled charge, with what is in flight "
        "accounted for. Exit 0: they agree; 1: violations or differences (printed); 2: the chain could not "
        "be read."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--confirmations",
            type=int,
            default=None,
            help="compare at the newest block this deep (default: CHAIN_CONFIRMATIONS)",
        )
        parser.add_argument("--ledger-only", action="store_true", help="check the ledger's invariants only")
        parser.add_argument("--json", action="store_true", help="print the result as one JSON object")

    def handle(self, *args: Any, **options: Any) -> None:  # BaseCommand.handle's signature
        result = ledger_check_run(confirmations=options["confirmations"], chain=not options["ledger_only"])
        if options["json"]:
            self.stdout.write(json.dumps(result.as_dict(), sort_keys=True))
        else:
            self._report(result)
        if result.problems or result.differences:
            raise CommandError("the ledger has violations or differs from the chain", returncode=EXIT_DIFFERENCES)
        if result.error:
            raise CommandError(result.error, returncode=EXIT_CHAIN_UNREADABLE)

    def _report(self, result: LedgerCheckResult) -> None:
        write = self.stdout.write
        write(f"Checked {result.entries} entries and {result.accounts} accounts.")
        if result.chain_compared:
            counts = result.compared
            compared = ", ".join(f"{counts.get(what, 0)} {what}" for what in ("provider groups", "renters", "jobs"))
            write(
                f"Chain: compared at block {result.block} ({result.block_hash}; head {result.head}, "
                f"{result.confirmations} confirmation(s)): {compared}, fees."
            )
        elif result.error:
            write(f"Chain: NOT compared: {result.error}")
        elif result.note:
            write(f"Chain: {result.note}.")
        if result.in_flight:
            write("In flight (accounted for):")
            for what, count in sorted(result.in_flight.items()):
                write(f"  {count} {what}")
        if result.problems:
            write(f"{len(result.problems)} violation(s):")
            for problem in result.problems:
                write(f"  - {problem}")
        if result.differences:
            write(f"{len(result.differences)} difference(s) between the ledger and the chain:")
            for difference in result.differences:
                write(f"  - {difference}")
        if result.ok:
            write(
                "OK: every invariant holds"
                + (" and the ledger agrees with the chain." if result.chain_compared else ".")
            )
