"""Billing: metering, the double-entry ledger and on-chain settlement (see issue 4)."""
