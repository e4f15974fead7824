"""The in-process EVM's gas estimate (billing/chain/evm.py): enough for the transaction, close to
py-evm's own bisection, the transaction's error when it cannot succeed."""

from __future__ import annotations

import pytest
from eth.estimators.gas import binary_gas_search_intrinsic_tolerance
from eth_tester.exceptions import TransactionFailed
from web3.exceptions import ContractLogicError

from billing.chain.evm import estimate_gas
from billing.contract import revert_decode
from billing.tests.conftest import ONE_TOKEN, Chain


def _bisected(chain: Chain, call: object, sender: str) -> int:
    """py-evm's default estimate of the same call, swapped in for one estimate."""
    evm = chain.w3.provider.ethereum_tester.backend.chain  # type: ignore[attr-defined]
    evm.gas_estimator = binary_gas_search_intrinsic_tolerance
    try:
        return int(call.estimate_gas({"from": sender}))  # type: ignore[attr-defined]
    finally:
        evm.gas_estimator = estimate_gas


def test_a_deposit_through_the_token_gets_enough_gas_and_about_what_bisection_gives(tester_chain: Chain) -> None:
    chain = tester_chain  # the in-process EVM only: its estimator is the one tested
    renter = chain.renters[0]
    chain.send(chain.token.functions.mint(renter.address, 5 * ONE_TOKEN), renter)
    chain.send(chain.token.functions.approve(chain.escrow.address, 5 * ONE_TOKEN), renter)
    deposit = chain.escrow.functions.deposit(5 * ONE_TOKEN)  # the escrow calls the token: a nested call

    estimate = int(deposit.estimate_gas({"from": renter.address}))
    bisected = _bisected(chain, deposit, renter.address)
    tx_hash = deposit.transact({"from": renter.address, "gas": estimate})
    receipt = chain.w3.eth.wait_for_transaction_receipt(tx_hash)

    assert receipt["status"] == 1
    assert receipt["gasUsed"] <= estimate <= bisected + receipt["gasUsed"] // 63 + 21_000
    assert int(chain.escrow.functions.availableBalance(renter.address).call()) == 5 * ONE_TOKEN


def test_a_plain_transfer_is_estimated_exactly_and_a_reverting_call_raises_its_error(tester_chain: Chain) -> None:
    chain = tester_chain  # the in-process EVM only: its estimator is the one tested
    renter = chain.renters[1]
    assert chain.w3.eth.estimate_gas({"from": renter.address, "to": chain.outsider.address, "value": 1}) == 21_000
    with pytest.raises((ContractLogicError, TransactionFailed)) as caught:
        chain.escrow.functions.deposit(0).estimate_gas({"from": renter.address})
    decoded = revert_decode(caught.value)
    assert decoded is not None and decoded.name == "GpgpuEscrow_ZeroAmount"
