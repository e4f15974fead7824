"""What a renter signs: proof that it owns a wallet (EIP-191), and a job's budget for the escrow
(EIP-712, billing.contract.budget_typed_data). Verifies signatures and stores a job's budget
authorization; the chain side (the escrow reserving it before the job runs) belongs to
billing.reservations, which a stored signature asks for a run right after commit.

The escrow's domain (chain id and address) comes from settings CHAIN_ID and the deployment
(ESCROW_ADDRESS or the deployment file); when CHAIN_ID is unset the node is asked through a
read-only chain client. Without either, ChainUnavailable (HTTP 503).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_utils import keccak, to_checksum_address

from billing import reservations, selectors
from billing.chain import ChainClient, ChainError, chain_client_from_settings
from billing.chain.deployment import deployment_load
from billing.contract import ESCROW, budget_typed_data
from billing.errors import Conflict, ValidationFailed
from billing.models import BudgetAuthorization, RenterWallet
from billing.services import MAX_AMOUNT, job_budget_micro_for
from core.errors import ServiceError
from gpgpu_agent.protocol import recover_signer
from jobs.models import Job, Renter

ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")
SIGNATURE_RE = re.compile(r"0x[0-9a-fA-F]{130}")
# A budget offered for signing stays valid for a whole run of its job (max_duration_s) and this
# long besides: to wait for GPUs, be preempted and placed again, and be settled.
BUDGET_DEADLINE = timedelta(days=30)
# A signed budget's deadline must leave at least a run of the job, a day to be placed and the
# settlement margin of the matcher's gate (billing.selectors.SETTLE_MARGIN): past the deadline the
# escrow lets the renter take the budget back, so the matcher places a job only while a whole run
# and its settlement fit before it.
PLACEMENT_ALLOWANCE = timedelta(days=1)


def budget_deadline_earliest(*, job: Job, now: datetime) -> int:
    """The earliest deadline (a Unix time) a budget signed for `job` at `now` may carry."""
    run = timedelta(seconds=job.max_duration_s)
    return int((now + run + PLACEMENT_ALLOWANCE + selectors.SETTLE_MARGIN).timestamp())


# Reads (eth_call) need a "from" address but never a signature: a fixed key that signs nothing.
_READER = Account.from_key(keccak(text="gpgpu billing api: read-only caller"))


class ChainUnavailable(ServiceError):
    """The escrow's chain id or address cannot be determined right now (node down, no deployment)."""

    status_code = 503
    default_code = "chain_unavailable"


def chain_reader() -> ChainClient:
    """A chain client for reads only (calls, never transactions), on CHAIN_RPC_URL."""
    return chain_client_from_settings(account=_READER)


@dataclass(frozen=True)
class EscrowDomain:
    chain_id: int
    escrow: str


def escrow_domain(*, client: ChainClient | None = None) -> EscrowDomain:
    """The chain id and escrow address renters sign budgets for. Raises ChainUnavailable."""
    try:
        chain_id = settings.CHAIN_ID or (client or chain_reader()).chain_id()
        deployment = deployment_load(chain_id)
    except ChainError as error:
        raise ChainUnavailable(f"The escrow's chain cannot be reached or is misconfigured: {error}") from None
    if deployment is None:
        raise ChainUnavailable(f"No escrow is deployed on chain {chain_id} yet.")
    return EscrowDomain(chain_id=chain_id, escrow=deployment.escrow)


@dataclass(frozen=True)
class EscrowEarnings:
    """What the escrow says a payout address may withdraw, and the fee it takes now (feeBps: the
    operator may change it, so the deployment's default says nothing of it). `reachable` is
    False (with `detail` saying why, and `withdrawable` and `fee_bps` None) when the node cannot
    be asked or no escrow is known."""

    chain_id: int | None
    escrow: str | None
    reachable: bool
    withdrawable: int | None
    detail: str = ""
    fee_bps: int | None = None


def escrow_earnings_read(*, payout_address: str | None) -> EscrowEarnings:
    """Read escrow.earnings(payout_address) through the read-only chain client. Never raises
    for a chain problem: an unreachable node or a missing deployment is reported in the result."""
    chain_id: int | None = settings.CHAIN_ID
    escrow: str | None = None
    try:
        if chain_id is not None:
            deployment = deployment_load(chain_id)
            escrow = deployment.escrow if deployment else None
        client = chain_reader()
        chain_id = client.chain_id()
        deployment = deployment_load(chain_id)
        if deployment is None:
            return EscrowEarnings(chain_id, None, True, None, f"No escrow is deployed on chain {chain_id} yet.")
        escrow = deployment.escrow
        contract = client.contract(ESCROW, escrow)
        fee_bps = int(client.call(contract.functions.feeBps()))
        if not payout_address:
            return EscrowEarnings(chain_id, escrow, True, None, "No payout address is set.", fee_bps=fee_bps)
        withdrawable = int(client.call(contract.functions.earnings(to_checksum_address(payout_address))))
    except ChainError as error:
        return EscrowEarnings(chain_id, escrow, False, None, f"The chain node could not be read: {error}")
    return EscrowEarnings(chain_id, escrow, True, withdrawable, fee_bps=fee_bps)


# --- wallets --------------------------------------------------------------------------------


def wallet_link_message(*, renter_id: int, address: str) -> str:
    """The exact text a renter signs (personal_sign, EIP-191) to link `address`."""
    return f"Link wallet {address.lower()} to GPGPU renter {renter_id}"


def wallet_signature_verify(*, renter: Renter, address: str, signature: str) -> str:
    """The lowercase address, once `signature` is shown to be its personal_sign of
    wallet_link_message. Raises ValidationFailed (invalid_signature) otherwise."""
    if not ADDRESS_RE.fullmatch(address or ""):
        raise ValidationFailed("address must be 0x followed by 40 hex digits.", code="invalid_address")
    if not SIGNATURE_RE.fullmatch(signature or ""):
        raise ValidationFailed("signature must be 0x followed by 130 hex digits (65 bytes).", code="invalid_signature")
    message = wallet_link_message(renter_id=renter.pk, address=address)
    signer = recover_signer(encode_defunct(text=message), signature)
    if signer is None or signer.lower() != address.lower():
        raise ValidationFailed(
            f"The signature was not made by {address.lower()} over the message {message!r}.",
            code="invalid_signature",
        )
    return address.lower()


def renter_wallets(*, renter: Renter) -> QuerySet[RenterWallet]:
    return RenterWallet.objects.filter(renter=renter).order_by("pk")


# --- budget authorizations ------------------------------------------------------------------


def job_budget_to_authorize(*, job: Job) -> int:
    """The smallest max_amount a renter may sign for the job: its reserved budget in micro (the
    budget its spec implies for a job admitted before reservations existed)."""
    return selectors.job_budget(job_id=job.pk).reserved or job_budget_micro_for(job)


def budget_typed_data_for(
    *, job: Job, renter_address: str, max_amount: int, deadline: int, domain: EscrowDomain
) -> dict[str, Any]:  # the EIP-712 message, JSON
    return budget_typed_data(
        chain_id=domain.chain_id,
        escrow=domain.escrow,
        job_id=job.pk,
        renter=renter_address,
        max_amount=max_amount,
        deadline=deadline,
    )


def budget_offer(*, job: Job, renter_address: str | None, domain: EscrowDomain, now: datetime | None = None) -> dict:
    """The typed data the renter should sign for `job`: its reserved budget, valid for a run of the
    job and BUDGET_DEADLINE, for `renter_address` or else the renter's most recently linked wallet.
    Raises Conflict (wallet_not_linked) when the renter has no wallet and names none."""
    if renter_address is None:
        wallet = RenterWallet.objects.filter(renter_id=job.renter_id).order_by("-pk").first()
        if wallet is None:
            raise Conflict(
                "Link a wallet first (POST /api/v1/billing/wallets/) or name one with ?address=.",
                code="wallet_not_linked",
            )
        renter_address = wallet.address
    deadline = int(((now or timezone.now()) + timedelta(seconds=job.max_duration_s) + BUDGET_DEADLINE).timestamp())
    return budget_typed_data_for(
        job=job,
        renter_address=renter_address,
        max_amount=job_budget_to_authorize(job=job),
        deadline=deadline,
        domain=domain,
    )


def budget_authorization_store(
    *,
    job: Job,
    renter_address: str,
    max_amount: int,
    deadline: int,
    signature: str,
    domain: EscrowDomain,
    now: datetime | None = None,
) -> tuple[BudgetAuthorization, bool]:
    """Verify and store the renter's signed budget for `job`; returns (authorization, changed).

    Refused with ValidationFailed, storing nothing, when: the signature does not recover
    `renter_address` over exactly budget_typed_data(job, renter_address, max_amount, deadline)
    (invalid_signature); `renter_address` is not one of the job's renter's linked wallets
    (wallet_not_linked); max_amount is below the job's reserved budget (budget_too_small) or
    above MAX_AMOUNT; the deadline has passed (deadline_passed) or comes before
    budget_deadline_earliest (deadline_too_soon, with `earliest`). The same body again changes
    nothing; another body replaces an authorization not yet sent to the escrow (status signed),
    and is refused with Conflict once it is: authorization_reserving (in a reservation batch),
    authorization_active (reserved on chain), authorization_refused (the escrow refused it and the
    job was cancelled). A stored or replaced signature asks for a reservation run after commit.
    """
    now = now or timezone.now()
    address = renter_address.lower()
    if not ADDRESS_RE.fullmatch(renter_address):
        raise ValidationFailed("renter_address must be 0x followed by 40 hex digits.", code="invalid_address")
    if not SIGNATURE_RE.fullmatch(signature):
        raise ValidationFailed("signature must be 0x followed by 130 hex digits (65 bytes).", code="invalid_signature")
    if not RenterWallet.objects.filter(renter_id=job.renter_id, address=address).exists():
        raise ValidationFailed(
            f"{address} is not a wallet linked to this renter; link it first (POST /api/v1/billing/wallets/).",
            code="wallet_not_linked",
        )
    needed = job_budget_to_authorize(job=job)
    if not needed <= max_amount <= MAX_AMOUNT:
        raise ValidationFailed(
            f"max_amount must cover the job's budget of {needed} micro (and be at most {MAX_AMOUNT}).",
            code="budget_too_small",
            extra={"needed": needed},
        )
    if deadline <= int(now.timestamp()):
        raise ValidationFailed("The deadline has passed; sign a fresh budget.", code="deadline_passed")
    if deadline < (earliest := budget_deadline_earliest(job=job, now=now)):
        raise ValidationFailed(
            f"The deadline must be at least {earliest} (a run of the job's max_duration_s, "
            f"{job.max_duration_s} s, a day to be placed and a day to settle): after it you could "
            "take the budget back while the job runs. Sign the budget as offered (GET).",
            code="deadline_too_soon",
            extra={"earliest": earliest},
        )
    typed = budget_typed_data_for(
        job=job, renter_address=address, max_amount=max_amount, deadline=deadline, domain=domain
    )
    signer = recover_signer(encode_typed_data(full_message=typed), signature)
    if signer is None or signer.lower() != address:
        raise ValidationFailed(
            f"The signature was not made by {to_checksum_address(address)} over this job's budget "
            "(check chainId, verifyingContract, jobId, maxAmount and deadline).",
            code="invalid_signature",
        )

    fields = {
        "renter_address": address,
        "max_amount": max_amount,
        "deadline": datetime.fromtimestamp(deadline, tz=UTC),
        "signature": signature.lower(),
    }
    status = BudgetAuthorization.Status
    with transaction.atomic():
        existing = BudgetAuthorization.objects.select_for_update().filter(job=job).first()
        if existing is None:
            created = BudgetAuthorization.objects.create(job=job, status=status.SIGNED, **fields)
            reservations.reservation_request_soon()
            return created, True
        if all(getattr(existing, name) == value for name, value in fields.items()):
            return existing, False
        if existing.activated_at is not None or existing.status == status.RESERVED:
            raise Conflict(
                "This job's budget is already active on chain; its authorization can no longer change.",
                code="authorization_active",
            )
        if existing.status == status.RESERVING:
            raise Conflict(
                "This job's budget is being reserved on chain; its authorization cannot change meanwhile.",
                code="authorization_reserving",
            )
        if existing.status == status.REFUSED and job.status in Job.TERMINAL:
            raise Conflict(
                f"The escrow refused this job's budget ({existing.rejected_reason}) and the job was "
                "cancelled; submit the job again.",
                code="authorization_refused",
            )
        for name, value in fields.items():
            setattr(existing, name, value)
        existing.status = status.SIGNED
        existing.save(update_fields=[*fields, "status"])
        reservations.reservation_request_soon()
    return existing, True
