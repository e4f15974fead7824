"""What the fleet needs from the leases on its machines: leases live a layer above providers
(jobs), so providers asks for them through this port, which jobs fills in when the app registry is
ready (jobs.apps.JobsConfig.ready, machine_leases_register). providers never imports jobs.

Every call runs inside the caller's transaction and at the point of the caller's lock order
(providers.services' module docstring): the port only says who does the work, not when.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from django.db.models import Exists

if TYPE_CHECKING:
    # For the types only: providers.services imports this module.
    from providers.services import LeaseStart, LeaseStop


class MachineLeases(Protocol):
    def end_for_machine(
        self, *, machine_id: int, reason: str, actor: str, detail: str = "", at: datetime | None = None
    ) -> int:
        """End every active lease of the machine; returns how many (jobs.services.leases_end_for_machine)."""

    def end_refused_kinds(self, *, machine_id: int, kinds: frozenset[str]) -> None:
        """End the machine's assigned leases whose job kind is not in `kinds` as `failed_to_start`."""

    def assigned_exists_sql(self, *, machine_id_sql: str) -> tuple[str, list[object]]:
        """An SQL `EXISTS (…)`, true while the machine whose id the SQL expression `machine_id_sql`
        gives holds an assigned lease, and its parameters: for a statement of providers' own."""

    def active_count(self, *, machine_ids: Sequence[int]) -> int:
        """How many active leases these machines hold."""

    def machines_with_active_leases(self, *, machine_ids: Sequence[int]) -> set[int]:
        """Which of these machines hold an active lease."""

    def active_gpu_ids(self, *, machine_id: int) -> set[int]:
        """The machine's GPUs that are in an active lease."""

    def gpu_in_active_lease(self) -> Exists:
        """An expression for a GPU queryset's annotation: True while the GPU is in an active lease."""

    def starting_reported(self, *, machine_id: int, lease_ids: set[int]) -> None:
        """The machine's agent listed these leases as `starting` (pulling their images): their
        start timeout waits longer (jobs.sweeps)."""

    def heartbeat_orders(
        self, *, machine_id: int, listed: set[int], kinds: frozenset[str], may_have_assigned: bool = True
    ) -> tuple[list[LeaseStart], list[LeaseStop]]:
        """The heartbeat reply's lease orders: (start, stop), lists of providers.services.LeaseStart
        and LeaseStop. may_have_assigned=False: the caller knows the machine has no assigned lease
        to start (the query for them is skipped)."""


_machine_leases: MachineLeases | None = None


def machine_leases_register(leases: MachineLeases) -> None:
    """Set the port's implementation (jobs does, once, when the app registry is ready)."""
    global _machine_leases
    _machine_leases = leases


def machine_leases() -> MachineLeases:
    """The port's implementation; an error if the app that holds leases (jobs) is not installed."""
    if _machine_leases is None:
        raise RuntimeError("No MachineLeases registered: the jobs app registers it when it is ready.")
    return _machine_leases
