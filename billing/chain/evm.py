"""The in-process EVM (eth-tester on py-evm) that the tests and `chain_client_eth_tester` run on.

One change from eth-tester's defaults: how py-evm estimates gas. Its estimator searches for the
smallest gas limit that does not run out, by bisection between the transaction's intrinsic gas
and the block's gas limit: about ten executions of the transaction for each estimate, and every
transaction sent without a gas limit is estimated first (half of the contract tests' time went
there). `estimate_gas` executes it once with the block's gas limit and proposes its intrinsic gas,
what the execution used plus the 1/64 every call keeps back (EIP-150), and py-evm's own tolerance
(21,000); it checks that proposal once: three executions at most (the first tries the intrinsic
gas alone, as the default does, so a plain transfer is estimated exactly). It falls back to the
bisection when the proposal runs out (a transaction whose gas use depends on its limit). Like the
default it never proposes less than the transaction needs, and it raises the transaction's own
error when it fails with the block's whole gas limit; it may propose more than the least that
suffices (by 1/63 of the use, plus 21,000), which only raises the limit, never the gas paid.
"""

from __future__ import annotations

from typing import Any

INTRINSIC_TOLERANCE = 21_000


def estimate_gas(state: Any, transaction: Any) -> int:  # py-evm's StateAPI and SignedTransactionAPI
    """A py-evm gas estimator (`Chain.gas_estimator`): see the module docstring."""
    from eth.estimators.gas import binary_gas_search_intrinsic_tolerance
    from eth.vm.spoof import SpoofTransaction

    def run(gas: int) -> Any:  # the computation, the state left as it was
        snapshot = state.snapshot()
        try:
            return state.apply_transaction(SpoofTransaction(transaction, gas=gas, gas_price=0))
        finally:
            state.revert(snapshot)

    intrinsic = int(transaction.intrinsic_gas)
    if not run(intrinsic).is_error:
        return intrinsic
    full = run(int(state.gas_limit))
    if full.is_error:
        raise full.error
    # The computation's gas excludes the intrinsic gas (the 21,000 and the calldata) paid before it.
    proposal = min(int(state.gas_limit), intrinsic + full.get_gas_used() * 64 // 63 + INTRINSIC_TOLERANCE)
    if not run(proposal).is_error:
        return proposal
    return int(binary_gas_search_intrinsic_tolerance(state, transaction))


def eth_tester_backend() -> Any:  # eth_tester.PyEVMBackend
    """A fresh py-evm backend for eth-tester whose chain estimates gas with `estimate_gas` (set on
    its chain class too, so a chain rebuilt by a snapshot's revert keeps it)."""
    from eth_tester import PyEVMBackend

    backend = PyEVMBackend()
    type(backend.chain).gas_estimator = staticmethod(estimate_gas)
    backend.chain.gas_estimator = estimate_gas  # the chain built already took the default
    return backend
