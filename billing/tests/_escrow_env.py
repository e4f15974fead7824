"""A deployed escrow on an in-process chain with the marketplace's operator, for the watcher and
settlement tests, plus the helper that compares the escrow's balances with the ledger's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.utils import timezone
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address

from billing import services
from billing.chain import ChainClient, chain_client_eth_tester
from billing.chain.deployment import Deployment, deployment_ensure, deployment_save
from billing.contract import ESCROW, STABLECOIN, budget_sign
from billing.models import BudgetAuthorization, LedgerAccount
from jobs.models import Job, Lease, Renter, UsageReport
from jobs.services import JobSpec, lease_end
from marketplace.submit import job_submit
from tests.factories import ProviderFactory, placed_lease

ONE = 10**6


@dataclass
class EscrowEnv:
    client: ChainClient
    deployment: Deployment
    escrow: Any
    token: Any

    def account(self, label: str) -> LocalAccount:
        """A deterministic account funded with gas."""
        account = Account.from_key(keccak(text=f"gpgpu settlement tests: {label}"))
        if self.client.native_balance(account.address) == 0:
            self.client.wait_receipt(self.client.send_value(account.address, 10**18).hash)
        return account

    def send_as(self, account: LocalAccount, fn: Any) -> Any:
        sender = self.client.for_account(account)
        return sender.wait_receipt(sender.transact(fn).hash)

    def deposit(self, account: LocalAccount, amount: int) -> Any:
        self.send_as(account, self.token.functions.mint(account.address, amount))
        self.send_as(account, self.token.functions.approve(self.escrow.address, amount))
        return self.send_as(account, self.escrow.functions.deposit(amount))

    def sign_budget(self, account: LocalAccount, job: Job, max_amount: int) -> BudgetAuthorization:
        deadline = int((timezone.now() + timedelta(days=1)).timestamp())
        signed = budget_sign(
            private_key=account.key,
            chain_id=self.client.chain_id(),
            escrow=self.deployment.escrow,
            job_id=job.pk,
            max_amount=max_amount,
            deadline=deadline,
        )
        return BudgetAuthorization.objects.create(
            job=job,
            renter_address=account.address.lower(),
            max_amount=max_amount,
            deadline=datetime.fromtimestamp(deadline, tz=UTC),
            signature="0x" + signed.signature.hex(),
        )

    # ----------------------------------------------------------------- ledger vs chain

    def disagreements(self, renters: dict[int, str], providers: dict[int, str]) -> list[str]:
        """Where the escrow and the ledger disagree: per renter, available + job reservations on
        chain vs the ledger's available + reserved + unsettled + in settlement; per provider,
        earnings vs provider_payable; fees vs platform_fees. `renters`/`providers`: id → address.

        Exact whenever the watcher has read every block and no settlement is in flight, whatever
        else is pending: a budget not yet reserved on chain is in the escrow's available balance
        and in the ledger's job_reserved; one the ledger released but the escrow has not yet is
        in the ledger's available balance and in the escrow's job reservation."""
        problems = []
        for renter_id, address in renters.items():
            chain = int(self.escrow.functions.availableBalance(to_checksum_address(address)).call())
            ledger = _balance(LedgerAccount.Kind.RENTER_AVAILABLE, f"renter:{renter_id}")
            for job in Job.objects.filter(renter_id=renter_id):
                _renter, _deadline, remaining, *_ = self.escrow.functions.job(job.pk).call()
                chain += int(remaining)
                ledger += _balance(LedgerAccount.Kind.JOB_RESERVED, f"job:{job.pk}")
                ledger += sum(
                    _balance(kind, f"lease:{lease.pk}")
                    for lease in job.leases.all()
                    for kind in (LedgerAccount.Kind.LEASE_UNSETTLED, LedgerAccount.Kind.IN_SETTLEMENT)
                )
            if chain != ledger:
                problems.append(f"renter {renter_id}: escrow holds {chain}, ledger {ledger}")
        for provider_id, address in providers.items():
            chain = int(self.escrow.functions.earnings(to_checksum_address(address)).call())
            ledger = _balance(LedgerAccount.Kind.PROVIDER_PAYABLE, f"provider:{provider_id}")
            if chain != ledger:
                problems.append(f"provider {provider_id}: escrow earnings {chain}, ledger payable {ledger}")
        fees_chain = int(self.escrow.functions.feesAccrued().call())
        fees_ledger = _balance(LedgerAccount.Kind.PLATFORM_FEES, "")
        if fees_chain != fees_ledger:
            problems.append(f"fees: escrow {fees_chain}, ledger {fees_ledger}")
        return problems


def _balance(kind: str, owner_key: str) -> int:
    return LedgerAccount.objects.filter(kind=kind, owner_key=owner_key).values_list("balance", flat=True).first() or 0


# Per process and fee: the chain just after the escrow's deployment, and its snapshot there.
_DEPLOYED: dict[int, tuple[ChainClient, Any, Deployment]] = {}


def escrow_env(tmp_path: Path, *, fee_bps: int = 1000) -> EscrowEnv:
    """An in-process chain with the escrow and the mock token deployed, as no test has used it.

    The chain is made and the contracts deployed once per process (and fee); every later call
    reverts it to the snapshot taken right after that deployment (blocks, balances, contract
    storage) and turns automatic mining back on, instead of deploying again. The client is new
    each time (its own nonce counter), and the deployment is recorded under `tmp_path`."""
    if fee_bps not in _DEPLOYED:
        client = chain_client_eth_tester()
        deployment, _ = deployment_ensure(
            client=client, treasury=client.address, fee_bps=fee_bps, dev_token=True, path=tmp_path / "deployment.json"
        )
        tester = client.web3.provider.ethereum_tester  # type: ignore[attr-defined]
        _DEPLOYED[fee_bps] = (client, tester.take_snapshot(), deployment)
    else:
        first, snapshot, deployment = _DEPLOYED[fee_bps]
        tester = first.web3.provider.ethereum_tester  # type: ignore[attr-defined]
        tester.revert_to_snapshot(snapshot)
        tester.enable_auto_mine_transactions()
        client = first.for_account(first.account)
        deployment_save(deployment, path=tmp_path / "deployment.json")
    return EscrowEnv(
        client=client,
        deployment=deployment,
        escrow=client.contract(ESCROW, deployment.escrow),
        token=client.contract(STABLECOIN, deployment.token),
    )


def escrow_env_deployed(client: ChainClient, path: Path, *, fee_bps: int = 1000) -> EscrowEnv:
    """The escrow and the mock token deployed afresh by `client` on its chain (treasury: the
    operator), the deployment recorded at `path`."""
    deployment, _ = deployment_ensure(
        client=client, treasury=client.address, fee_bps=fee_bps, dev_token=True, path=path
    )
    return EscrowEnv(
        client=client,
        deployment=deployment,
        escrow=client.contract(ESCROW, deployment.escrow),
        token=client.contract(STABLECOIN, deployment.token),
    )


def charged_job(renter: Renter, *, charge_s: int = 3600, provider_address: str | None = None) -> tuple[Job, Lease]:
    """A job (1 GPU at 1.00/GPU-hour, budget for 2 h) whose one lease ran `charge_s` seconds,
    ended and was finally metered (charge_s/3600 tokens unsettled)."""
    spec = JobSpec(
        gpu_count=1,
        max_price_per_gpu_hour=Decimal("1.00"),
        expected_duration_s=3600,
        max_duration_s=7200,
        kind=Job.Kind.PROCESS,
        command=["true"],
    )
    job, _ = job_submit(renter=renter, spec=spec)
    provider = ProviderFactory(payout_address=provider_address) if provider_address is not None else None
    t0 = timezone.now() - timedelta(days=1)
    lease = placed_lease(job=job, provider=provider, price="1.00", started=t0)
    UsageReport.objects.create(
        lease=lease, report_id="all", period_start=t0, period_end=t0 + timedelta(seconds=charge_s), gpu_seconds=1
    )
    lease_end(
        lease_id=lease.pk,
        reason=Lease.EndReason.SUCCEEDED,
        actor="test",
        exit_code=0,
        at=t0 + timedelta(seconds=charge_s),
    )
    services.lease_meter(lease_id=lease.pk)
    return job, lease


__all__ = ["ONE", "EscrowEnv", "ProviderFactory", "charged_job", "escrow_env", "escrow_env_deployed"]
