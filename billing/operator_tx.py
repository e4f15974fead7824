"""The operator's batched transactions (settlements, budget reservations): finding one that was
sent but not recorded, one waiting in the node's pool, and one whose nonce went to another
transaction. Each batch records its nonce, calldata keccak and the head block before it is sent
(billing.models.OperatorTransaction), which is what these read."""

from __future__ import annotations

from eth_utils import keccak
from hexbytes import HexBytes

from billing.chain import ChainClient
from billing.models import OperatorTransaction

# How many blocks past `sent_from_block` (and before it) the reconciler searches for an unrecorded
# transaction.
NONCE_SEARCH_BLOCKS = 5000


def operator_tx_find(*, client: ChainClient, nonce: int, calldata_hash: str, from_block: int) -> str | None:
    """The hash of the operator's mined transaction with this nonce and calldata keccak, searched
    from `from_block` (at most NONCE_SEARCH_BLOCKS blocks), then back from it as far again; None
    when the nonce is unused on chain or went to another transaction. Shared by settlements and
    budget reservations.

    Back as well as forward: after the chain went back (a reorg, a node restored from older
    state) blocks are numbered again from below the head a batch recorded, so a transaction sent
    again, or mined again, can sit below `from_block`; searching only forward missed it, and the
    batch was sent a second time."""
    mined = client.transaction_count("latest")
    if mined <= nonce:
        return None  # that nonce was never used on chain: the transaction did not get through
    head = client.block_number()
    start = min(from_block, head)
    forward = range(start, min(head, start + NONCE_SEARCH_BLOCKS) + 1)
    backward = range(start - 1, max(-1, start - 1 - NONCE_SEARCH_BLOCKS), -1)
    operator = client.address.lower()
    for numbers in (forward, backward):
        for number in numbers:
            for tx in client.block_transactions(number):
                if str(tx["from"]).lower() != operator or int(tx["nonce"]) != nonce:
                    continue
                data = HexBytes(tx.get("input", tx.get("data", b"")))
                if "0x" + keccak(data).hex() == calldata_hash:
                    return HexBytes(tx["hash"]).to_0x_hex()
                return None  # the nonce went to another transaction: ours was never mined
    return None


def operator_tx_in_mempool(*, client: ChainClient, nonce: int) -> bool:
    """Whether the node holds an unmined transaction of the operator with this nonce (its pending
    count is past it while its mined count is not): sending again would only duplicate it."""
    latest = client.transaction_count("latest")
    pending = client.transaction_count("pending")
    return latest <= nonce < pending


def operator_tx_replaced(*, record: OperatorTransaction, client: ChainClient) -> bool:
    """Whether the nonce a sent batch (settlement or reservation) recorded was taken on chain by
    another transaction while its own has no receipt: it will never be mined. Shared by both."""
    if record.nonce is None:
        return False
    mined = client.transaction_count("latest")
    return mined > record.nonce and client.receipt(record.tx_hash) is None
