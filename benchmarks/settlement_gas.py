"""Gas per lease settled by GpgpuEscrow.settle, measured on a local anvil node.

Usage (from the repository root, after `npm ci`):  python benchmarks/settlement_gas.py [--sizes 1,10,100,300]

Starts its own anvil, deploys the committed artifacts, and for each batch size measures the receipt's
gasUsed (intrinsic 21,000 and calldata included) divided by the number of leases, in four cases:
  new_providers    first credit of each provider (zero -> non-zero earnings slot), budgets already active
  paid_providers   steady state: every lease has a distinct provider who already has earnings
  with_budgets     first settlement of each job: signature check and reservation in the same batch
  shared_providers the realistic batch: 10 leases per provider, items sorted by provider
and the path that keeps admitted work funded (docs/billing.md "Reserving budgets"):
  reserve          escrow.reserve(budgets): each job's signed budget checked and locked before its
                   lease starts (gas per budget)
  after_reserve    the first settlement of leases whose budgets `reserve` locked (no budget in it)
Prints one JSON line. The goal is at most 10,000 gas per lease in a batch of 100.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from eth_abi import encode as abi_encode  # noqa: E402
from eth_account import Account  # noqa: E402
from eth_utils import keccak, to_checksum_address  # noqa: E402
from web3.middleware import SignAndSendRawMiddlewareBuilder  # noqa: E402

from billing.chain.anvil import anvil_running  # noqa: E402
from billing.contract import (  # noqa: E402
    ESCROW,
    STABLECOIN,
    SettlementItem,
    budget_sign,
    contract_deploy,
    settlement_items_encode,
)

GOAL_GAS_PER_LEASE = 10_000
LEASES_PER_PROVIDER = 10
FEE_BPS = 500


def _address(label: str) -> str:
    return to_checksum_address(keccak(text=label)[-20:])


def _calldata_gas(data: bytes) -> int:
    """EIP-2028 calldata cost: 16 gas per non-zero byte, 4 per zero byte."""
    return sum(16 if b else 4 for b in data)


class Bench:
    def __init__(self, w3: Any) -> None:
        self.w3 = w3
        self.renter = Account.from_key(keccak(text="benchmark renter"))
        w3.middleware_onion.inject(SignAndSendRawMiddlewareBuilder.build([self.renter]), layer=0)
        self.admin = w3.eth.accounts[0]
        self._wait(w3.eth.send_transaction({"from": self.admin, "to": self.renter.address, "value": 10**20}))
        self.token = contract_deploy(w3, STABLECOIN, sender=self.admin)
        self.escrow = contract_deploy(
            w3, ESCROW, self.token.address, self.admin, self.admin, FEE_BPS, sender=self.admin
        )
        role = self.escrow.functions.OPERATOR_ROLE().call()
        self._send(self.escrow.functions.grantRole(role, self.admin), self.admin)
        funds = 10**15
        self._send(self.token.functions.mint(self.renter.address, funds), self.renter.address)
        self._send(self.token.functions.approve(self.escrow.address, funds), self.renter.address)
        self._send(self.escrow.functions.deposit(funds), self.renter.address)
        self.next_job = 1
        self.next_provider = 0

    def _wait(self, tx_hash: bytes) -> Any:
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
        if receipt["status"] != 1:
            raise RuntimeError(f"transaction {tx_hash.hex()} failed")
        return receipt

    def _send(self, call: Any, sender: str) -> Any:
        return self._wait(call.transact({"from": sender}))

    def jobs(self, count: int) -> list[int]:
        first = self.next_job
        self.next_job += count
        return list(range(first, first + count))

    def providers(self, count: int) -> list[str]:
        first = self.next_provider
        self.next_provider += count
        return [_address(f"benchmark provider {i}") for i in range(first, first + count)]

    def budgets(self, jobs: list[int]) -> list[Any]:
        deadline = self.w3.eth.get_block("latest")["timestamp"] + 86_400
        chain_id = self.w3.eth.chain_id
        return [
            budget_sign(
                private_key=self.renter.key,
                chain_id=chain_id,
                escrow=self.escrow.address,
                job_id=job,
                max_amount=10**9,
                deadline=deadline,
            ).as_abi()
            for job in jobs
        ]

    def reserve(self, budgets: list[Any]) -> Any:
        return self._send(self.escrow.functions.reserve(list(budgets)), self.admin)

    def settle(self, items: list[SettlementItem], budgets: list[Any] = ()) -> Any:  # type: ignore[assignment]
        call = self.escrow.functions.settle(settlement_items_encode(items), list(budgets))
        return self._send(call, self.admin)

    # ------------------------------------------------------------------ cases

    def case(self, name: str, n: int) -> dict[str, Any]:
        jobs = self.jobs(n)
        if name == "shared_providers":
            group = self.providers(max(1, -(-n // LEASES_PER_PROVIDER)))
            providers = [group[i // LEASES_PER_PROVIDER] for i in range(n)]
        else:
            providers = self.providers(n)
        budgets = self.budgets(jobs)

        def items(cumulative: int) -> list[SettlementItem]:
            return [
                SettlementItem(lease_id=1, job_id=j, provider=p, cumulative_charge=cumulative)
                for j, p in zip(jobs, providers, strict=True)
            ]

        if name == "reserve":
            receipt = self.reserve(budgets)
        elif name == "after_reserve":
            # Providers already have earnings, as in paid_providers; the budgets were reserved ahead.
            warm_jobs = self.jobs(n)
            self.settle(
                [
                    SettlementItem(lease_id=1, job_id=j, provider=p, cumulative_charge=1)
                    for j, p in zip(warm_jobs, providers, strict=True)
                ],
                self.budgets(warm_jobs),
            )
            self.reserve(budgets)
            receipt = self.settle(items(1_000))
        elif name == "new_providers":
            self.settle([], budgets)
            receipt = self.settle(items(1_000))
        elif name == "with_budgets":
            # Providers already have earnings from other jobs, so only the budget work is new.
            warm_jobs = self.jobs(n)
            warm = [
                SettlementItem(lease_id=1, job_id=j, provider=p, cumulative_charge=1)
                for j, p in zip(warm_jobs, providers, strict=True)
            ]
            self.settle(warm, self.budgets(warm_jobs))
            receipt = self.settle(items(1_000), budgets)
        else:  # paid_providers, shared_providers: steady state, second settlement of running leases
            self.settle(items(1_000), budgets)
            receipt = self.settle(items(2_000))

        tx = self.w3.eth.get_transaction(receipt["transactionHash"])
        calldata = bytes(tx["input"])
        return {
            "leases": n,
            "gas_used": receipt["gasUsed"],
            "gas_per_lease": round(receipt["gasUsed"] / n),
            "calldata_bytes": len(calldata),
            "calldata_gas": _calldata_gas(calldata),
        }


def _abi_struct_calldata_gas(n: int) -> int:
    """Calldata gas the same items would cost as an ABI array of (uint64,uint256,address,uint96) structs."""
    rows = [(1, 10_000 + i, _address(f"benchmark provider {i}"), 2_000) for i in range(n)]
    return _calldata_gas(abi_encode(["(uint64,uint256,address,uint96)[]"], [rows]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10,100,300", help="comma-separated batch sizes")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cases = ["new_providers", "paid_providers", "with_budgets", "shared_providers", "reserve", "after_reserve"]
    settle_cases = [case for case in cases if case != "reserve"]

    with anvil_running(gas_limit=500_000_000) as w3:
        bench = Bench(w3)
        results = {case: {str(n): bench.case(case, n) for n in sizes} for case in cases}
        node = w3.client_version
        packed = {str(n): results["paid_providers"][str(n)]["calldata_gas"] for n in sizes}

    reference = "100" if 100 in sizes else str(sizes[-1])
    per_lease = {case: results[case][reference]["gas_per_lease"] for case in settle_cases}
    print(
        json.dumps(
            {
                "node": node,
                "fee_bps": FEE_BPS,
                "leases_per_provider_in_shared_case": LEASES_PER_PROVIDER,
                "results": results,
                "calldata_gas_packed_vs_abi_structs": {
                    str(n): {"packed": packed[str(n)], "abi_structs": _abi_struct_calldata_gas(n)} for n in sizes
                },
                "reserve_gas_per_budget": {str(n): results["reserve"][str(n)]["gas_per_lease"] for n in sizes},
                "goal": {
                    "gas_per_lease_max": GOAL_GAS_PER_LEASE,
                    "batch": int(reference),
                    "gas_per_lease": per_lease,
                    "met": {case: gas <= GOAL_GAS_PER_LEASE for case, gas in per_lease.items()},
                },
            }
        )
    )


if __name__ == "__main__":
    main()
