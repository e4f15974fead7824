"""Billing: money in, metered, settled on chain, money out.

The app has the usual rooms (models, services, selectors, apis, tasks, admin, errors), and
because its writes span three concerns, services are split by concern rather than kept in
one file of several thousand lines:

- services.py: the double-entry ledger and every posting (the only writer of postings);
- metering.py: per-second charges of leases (writes through services);
- deposits.py: the chain watcher that credits deposits and withdrawals, reorg rewind;
- settlement.py: batched on-chain settlement, its confirmation and the reconciler;
- authorizations.py: renters' wallets and signed job budgets (EIP-191 / EIP-712 checks);
- selectors.py and statements.py: reads (balances, budgets; statements for the API);
- contract.py and chain/: the escrow's artifacts and the one chain client.
"""
