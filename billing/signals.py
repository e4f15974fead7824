"""What billing tells the apps above it, which it may not import (.importlinter: layers).

- `budgets_reserved`: sent (sender: the BudgetReservation) inside the transaction that marked
  job budgets reserved in the escrow, with `job_ids`. Those jobs may be placed from then on; the
  marketplace asks for a matching run once that transaction commits."""

from __future__ import annotations

from django.dispatch import Signal

budgets_reserved = Signal()
