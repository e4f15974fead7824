"""The fault suite: the whole marketplace on PostgreSQL, Redis and anvil, real agents, faults one
at a time (docs/faults.md). `harness` runs it, `probe` reads the marketplace's rows in a
subprocess, `invariants` judges what both saw."""
