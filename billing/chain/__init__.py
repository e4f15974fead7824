"""The chain client and its helpers (see billing/chain/client.py for the API).

    from billing.chain import chain_client_from_settings, ContractReverted, NodeUnavailable

Importing this package touches no Django setting; only the `*_from_settings` factories read them.
"""

from billing.chain.client import (
    ChainClient,
    ChainEvent,
    Receipt,
    SentTx,
    chain_client_eth_tester,
    chain_client_from_settings,
    key_file_read,
    operator_account_from_settings,
)
from billing.chain.errors import (
    ChainConfigurationError,
    ChainError,
    ContractReverted,
    InsufficientGasFunds,
    NodeBehind,
    NodeUnavailable,
    NonceConflict,
    TransactionTimeout,
)

__all__ = [
    "ChainClient",
    "ChainConfigurationError",
    "ChainError",
    "ChainEvent",
    "ContractReverted",
    "InsufficientGasFunds",
    "NodeBehind",
    "NodeUnavailable",
    "NonceConflict",
    "Receipt",
    "SentTx",
    "TransactionTimeout",
    "chain_client_eth_tester",
    "chain_client_from_settings",
    "key_file_read",
    "operator_account_from_settings",
]
