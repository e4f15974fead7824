"""What the marketplace's database and the escrow say, as one JSON object on stdout.

    DJANGO_SETTINGS_MODULE=tests.faults.settings DATABASE_URL=… CHAIN_RPC_URL=… \\
        python -m tests.faults.probe

The fault suite runs it in a subprocess with the cluster's environment after each fault (its own
process holds no database connection: the database is one of the things it stops). It only reads.
Times are Unix seconds (floats), amounts micro (ints); tests/faults/invariants.py judges them.

- jobs, leases (with their signed and unsigned usage inside the lease, their charge, what the
  ledger's charge entries posted to them, their lease events), settlements and reservations;
- ledger balances by kind, and the escrow's view of the same money: each provider's earnings and
  the platform's fees, read between two reads of the settlements in flight so that a batch
  confirming meanwhile shows as `consistent: false` rather than as a difference.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def snapshot() -> dict[str, Any]:
    import django

    django.setup()
    from django.db.models import Sum

    from billing import metering
    from billing.models import (
        BudgetAuthorization,
        BudgetReservation,
        LeaseCharge,
        LedgerAccount,
        LedgerEntry,
        Posting,
        Settlement,
    )
    from jobs.models import Event, Job, Lease, UsageReport
    from providers.models import Machine

    now = time.time()
    jobs: list[dict[str, Any]] = [
        {
            "id": job.pk,
            "key": job.idempotency_key or "",
            "status": job.status,
            "created_at": _ts(job.created_at),
            "finished_at": _ts(job.finished_at),
            "attempts": job.attempts,
            "exit_code": job.exit_code,
            "failure_reason": job.failure_reason,
            "unplaced_code": job.unplaced_code,
        }
        for job in Job.objects.order_by("pk")
    ]
    budgets = {
        auth.job_id: {"status": auth.status, "released_on_chain": auth.released_on_chain_at is not None}
        for auth in BudgetAuthorization.objects.all()
    }
    for job in jobs:
        job["budget"] = budgets.get(job["id"])

    reports: dict[int, list[tuple[datetime, datetime, bool]]] = defaultdict(list)
    for lease_id, start, end, signer in UsageReport.objects.values_list(
        "lease_id", "period_start", "period_end", "verified_signer"
    ):
        reports[lease_id].append((start, end, bool(signer)))
    charges = {charge.lease_id: charge for charge in LeaseCharge.objects.all()}
    charged = dict(
        Posting.objects.filter(account__kind=LedgerAccount.Kind.LEASE_UNSETTLED, entry__kind=LedgerEntry.Kind.CHARGE)
        .values_list("account__lease_id")
        .annotate(total=Sum("amount"))
        .values_list("account__lease_id", "total")
    )
    charge_entries = Counter(
        LedgerEntry.objects.filter(kind=LedgerEntry.Kind.CHARGE).values_list("lease_id", flat=True)
    )
    events: dict[int, Counter[str]] = defaultdict(Counter)
    reported_after_loss: dict[int, datetime] = {}
    ended_recorded: dict[int, datetime] = {}
    for lease_id, kind, created_at in Event.objects.filter(lease__isnull=False).values_list(
        "lease_id", "kind", "created_at"
    ):
        events[lease_id][kind] += 1
        if kind == "lease.reported_after_loss":
            reported_after_loss.setdefault(lease_id, created_at)
        elif kind == "lease.ended":
            ended_recorded.setdefault(lease_id, created_at)

    leases = []
    for lease in Lease.objects.order_by("pk"):
        own = reports.get(lease.pk, [])
        row: dict[str, Any] = {
            "id": lease.pk,
            "job_id": lease.job_id,
            "machine_id": lease.machine_id,
            "status": lease.status,
            "end_reason": lease.end_reason,
            "end_detail": lease.end_detail[:200],
            "exit_code": lease.exit_code,
            "created_at": _ts(lease.created_at),
            "started_at": _ts(lease.started_at),
            "ended_at": _ts(lease.ended_at),
            # When the marketplace ended it (ended_at may be earlier: a lost lease ends as of its
            # machine's last heartbeat).
            "ended_recorded_at": _ts(ended_recorded.get(lease.pk)),
            "gpu_count": lease.gpu_count,
            "price_micro_per_gpu_hour": metering.price_micro(lease.price_per_gpu_hour),
            "reports": len(own),
            "usage_signed_s": 0,
            "usage_unsigned_s": 0,
            "usage_outside_s": 0,
            "events": dict(events.get(lease.pk, {})),
            # When the agent of a lease declared lost told how its workload ended.
            "reported_after_loss_at": _ts(reported_after_loss.get(lease.pk)),
            "ledger_charged_micro": int(charged.get(lease.pk) or 0),
            "charge_entries": charge_entries.get(lease.pk, 0),
            "charge": None,
        }
        if lease.started_at is not None:
            end = lease.ended_at or datetime.fromtimestamp(now, tz=lease.started_at.tzinfo)
            signed = [(a, b) for a, b, ok in own if ok]
            unsigned = [(a, b) for a, b, ok in own if not ok]
            row["usage_signed_s"] = metering.covered_seconds(signed, start=lease.started_at, end=end)
            row["usage_unsigned_s"] = metering.covered_seconds(unsigned, start=lease.started_at, end=end)
            everything = metering.covered_seconds(
                [(a, b) for a, b, _ in own],
                start=min([lease.started_at, *[a for a, _, _ in own]]),
                end=max([end, *[b for _, b, _ in own]]),
            )
            row["usage_outside_s"] = max(
                0, everything - metering.covered_seconds([(a, b) for a, b, _ in own], start=lease.started_at, end=end)
            )
        charge = charges.get(lease.pk)
        if charge is not None:
            row["charge"] = {
                "billable_seconds": charge.billable_seconds,
                "cumulative_micro": charge.cumulative_micro,
                "uncapped_micro": charge.uncapped_micro,
                "capped": charge.capped,
                "final": charge.final,
                "expected_micro": metering.charge_micro(
                    price_micro_per_gpu_hour=row["price_micro_per_gpu_hour"],
                    gpu_count=lease.gpu_count,
                    billable_seconds=charge.billable_seconds,
                ),
            }
        leases.append(row)

    def batches(model: Any) -> list[dict[str, Any]]:
        return [
            {
                "id": b.pk,
                "status": b.status,
                "created_at": _ts(b.created_at),
                "submitted_at": _ts(b.submitted_at),
                "confirmed_at": _ts(b.confirmed_at),
                "updated_at": _ts(b.updated_at),
                "tx_hash": b.tx_hash,
                "block_number": b.block_number,
                "attempts": b.attempts,
                "last_error": (b.last_error or "")[:300],
                **({"total_micro": b.total_micro, "item_count": b.item_count} if model is Settlement else {}),
            }
            for b in model.objects.order_by("pk")
        ]

    machines = [
        {"id": m.pk, "status": m.status, "last_heartbeat_at": _ts(m.last_heartbeat_at)}
        for m in Machine.objects.order_by("pk")
    ]
    return {
        "now": now,
        "jobs": jobs,
        "leases": leases,
        "machines": machines,
        "settlements": batches(Settlement),
        "reservations": batches(BudgetReservation),
        "money": _money(),
    }


def _in_flight() -> tuple[list[int], int]:
    from django.db.models import Max

    from billing.models import Settlement

    pending = list(
        Settlement.objects.filter(status__in=[Settlement.Status.PENDING, Settlement.Status.SUBMITTED])
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    last = Settlement.objects.aggregate(last=Max("pk"), confirmed=Max("confirmed_at"))
    return pending, hash((last["last"], last["confirmed"]))


def _ledger() -> dict[str, Any]:
    from django.db.models import Sum

    from billing.models import LedgerAccount
    from providers.models import Provider

    kinds = dict(LedgerAccount.objects.values_list("kind").annotate(total=Sum("balance")).values_list("kind", "total"))
    payable: dict[str, int] = defaultdict(int)
    for provider_id, balance in LedgerAccount.objects.filter(kind=LedgerAccount.Kind.PROVIDER_PAYABLE).values_list(
        "provider_id", "balance"
    ):
        address = Provider.objects.filter(pk=provider_id).values_list("payout_address", flat=True).first() or ""
        payable[address.lower()] += balance
    return {"by_kind": {k: int(v or 0) for k, v in kinds.items()}, "provider_payable": dict(payable)}


def _money() -> dict[str, Any]:
    """The ledger's balances and the escrow's, the latter read between two reads of the
    settlements in flight (`consistent`: nothing confirmed or started meanwhile)."""
    from billing.chain import ChainError, chain_client_from_settings
    from billing.chain.deployment import deployment_require
    from billing.contract import ESCROW, STABLECOIN
    from billing.models import RenterWallet

    before, mark = _in_flight()
    ledger = _ledger()
    chain: dict[str, Any] = {"error": None}
    try:
        client = chain_client_from_settings()
        deployment = deployment_require(client)
        escrow = client.contract(ESCROW, deployment.escrow)
        token = client.contract(STABLECOIN, deployment.token)
        block = client.block_number()
        chain["block"] = block
        chain["earnings"] = {
            address: int(client.call(escrow.functions.earnings(_checksum(address)), block=block))
            for address in ledger["provider_payable"]
            if address
        }
        chain["fees_accrued"] = int(client.call(escrow.functions.feesAccrued(), block=block))
        chain["available"] = {
            wallet: int(client.call(escrow.functions.availableBalance(_checksum(wallet)), block=block))
            for wallet in RenterWallet.objects.values_list("address", flat=True)
        }
        chain["escrow_tokens"] = int(client.call(token.functions.balanceOf(deployment.escrow), block=block))
        chain["missing"] = _confirmed_not_on_chain(client)
    except (ChainError, OSError, ValueError) as error:
        chain["error"] = f"{type(error).__name__}: {error}"[:300]
    after, mark_after = _in_flight()
    return {
        "ledger": ledger,
        "chain": chain,
        "in_flight": sorted(set(before) | set(after)),
        "consistent": before == after and mark == mark_after,
    }


def _confirmed_not_on_chain(client: Any, limit: int = 300) -> list[dict[str, Any]]:
    """The operator's transactions the ledger holds confirmed (settlements, reservations, releases
    of the last `limit` of each) that the node's chain does not have in the block recorded."""
    from billing.models import BudgetAuthorization, BudgetReservation, Settlement

    missing = []
    for model in (Settlement, BudgetReservation):
        rows = model.objects.filter(status="confirmed").exclude(tx_hash="").order_by("-pk")[:limit]
        for row in rows:
            receipt = client.receipt(row.tx_hash)
            if receipt is None or (row.block_number is not None and receipt.block_number != row.block_number):
                missing.append(
                    {
                        "what": f"{model.__name__.lower()} {row.pk}",
                        "tx_hash": row.tx_hash,
                        "block_number": row.block_number,
                        "on_chain_block": None if receipt is None else receipt.block_number,
                        "confirmed_at": _ts(row.confirmed_at),
                    }
                )
    # Recorded released only: a releaseJob sent and not confirmed yet (release_tx_hash alone) may
    # wait in the node's pool, or be gone with a rollback; the release run follows it.
    released = (
        BudgetAuthorization.objects.filter(released_on_chain_at__isnull=False)
        .exclude(release_tx_hash="")
        .order_by("-pk")
        .values_list("job_id", "release_tx_hash")
    )
    for job_id, tx_hash in released[:limit]:
        if client.receipt(tx_hash) is None:
            missing.append(
                {
                    "what": f"release of job {job_id}",
                    "tx_hash": tx_hash,
                    "block_number": None,
                    "on_chain_block": None,
                    "confirmed_at": None,
                }
            )
    return missing


def _checksum(address: str) -> Any:
    from eth_utils import to_checksum_address

    return to_checksum_address(address)


def ledger_check(*, tries: int, pause_s: float) -> dict[str, Any]:
    """`manage.py ledger_check` (in this process: the same command, without a second Django
    start), up to `tries` times `pause_s` apart while it fails: {"ok", "tries", "output",
    "persistent"}.

    A finished job's leftover budget is released by a beat task a few seconds after its charge
    is final, and while jobs keep finishing some job is nearly always in that gap: so a failure
    counts only if some violation line is in every try's output (the same job, still not
    released `pause_s` later), or the output has no such lines to compare."""
    from django.core.management import call_command
    from django.core.management.base import CommandError

    persistent: set[str] | None = None
    output = ""
    for attempt in range(1, tries + 1):
        buffer = io.StringIO()
        try:
            call_command("ledger_check", stdout=buffer, stderr=buffer)
        except CommandError as error:
            output = f"{buffer.getvalue()}{error} (exit {getattr(error, 'returncode', 1)})"
        except Exception as error:  # a crash of the check is its failure, with what it said
            output = f"{buffer.getvalue()}{type(error).__name__}: {error}"
        else:
            return {"ok": True, "tries": attempt, "output": buffer.getvalue(), "persistent": []}
        lines = {line.strip() for line in output.splitlines() if line.strip().startswith("- ")}
        lines = lines or {output.strip().splitlines()[-1] if output.strip() else "(no output)"}
        persistent = lines if persistent is None else persistent & lines
        if not persistent:
            return {"ok": True, "tries": attempt, "output": output, "persistent": []}
        if attempt < tries:
            time.sleep(pause_s)
    return {"ok": False, "tries": tries, "output": output, "persistent": sorted(persistent or [])}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.faults.probe")
    parser.add_argument("--ledger-check-tries", type=int, default=3)
    parser.add_argument("--ledger-check-pause-s", type=float, default=4.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.faults.settings")
    started = time.monotonic()
    result = snapshot()
    result["probe_s"] = round(time.monotonic() - started, 2)
    if args.ledger_check_tries > 0:
        result["ledger_check"] = ledger_check(tries=args.ledger_check_tries, pause_s=args.ledger_check_pause_s)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
