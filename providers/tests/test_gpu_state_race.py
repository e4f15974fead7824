"""Heartbeats racing the matcher on PostgreSQL: a heartbeat never writes a GPU that an
assignment has just leased back to `idle`, and the two never deadlock (see the module
docstring of providers.services, "GPU state")."""

from __future__ import annotations

import secrets
import threading
from typing import Any

import pytest
from django.db import connection, connections, transaction
from rest_framework.test import APIClient

from jobs.models import Job, Lease, LeaseGPU
from jobs.services import job_cancel, lease_end
from marketplace import matching
from providers import services
from providers.models import GPU, Machine
from tests.factories import JobFactory, machine_with_gpus
from tests.row_locks import held_elsewhere

API = "/api/agent/v1/"
MACHINES = 4
GPUS_PER_MACHINE = 4
ROUNDS = 12
# Heartbeats per machine per round, sent back to back while the matcher places that round's jobs.
BEATS_PER_ROUND = 4


def _agent_client(machine: Machine) -> APIClient:
    """A client holding a fresh credential of `machine`; a 500 comes back as a response."""
    raw = f"gpm_test_{secrets.token_urlsafe(16)}"
    Machine.objects.filter(pk=machine.pk).update(credential_digest=services.secret_digest(raw))
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Machine {raw}")
    return client


def _body(machine: Machine) -> dict[str, Any]:
    """What the agent reports: every GPU idle (it has not started any lease yet)."""
    gpus = [
        {
            "uuid": gpu.uuid,
            "index": gpu.index,
            "model": gpu.model,
            "vram_mb": gpu.vram_mb,
            "memory_used_mb": 300,
            "utilization_pct": 0.0,
            "idle": True,
            "owner_busy": False,
        }
        for gpu in machine.gpus.order_by("index")
    ]
    return {"gpus": gpus, "leases": []}


def _run_at_once(targets: list[Any]) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def run(target: Any) -> None:
        try:
            start.wait()
            target()
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(target,)) for target in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_heartbeats_racing_assignments_never_undo_a_lease_nor_deadlock(monkeypatch, settings) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: concurrent transactions and row locks only exist there")
    settings.THROTTLE_ENABLED = False  # many heartbeats per machine in a few seconds
    # One job per transaction: many short matcher commits for the heartbeats to land between.
    monkeypatch.setattr(matching, "CHUNK_SIZE", 1)
    machines = [machine_with_gpus(count=GPUS_PER_MACHINE) for _ in range(MACHINES)]
    clients = {m.pk: _agent_client(m) for m in machines}
    bodies = {m.pk: _body(m) for m in machines}
    statuses: list[int] = []
    beating = threading.Semaphore(0)  # released once per machine whose heartbeats are done
    placed = 0

    def heartbeats(machine_id: int) -> None:
        try:
            for _ in range(BEATS_PER_ROUND):
                response = clients[machine_id].post(API + "heartbeat", bodies[machine_id], format="json")
                statuses.append(response.status_code)
        finally:
            beating.release()

    def match() -> None:
        # Cycles back to back for as long as the heartbeats last.
        nonlocal placed
        done = 0
        while True:
            placed += matching.match_cycle().placed
            while done < MACHINES and beating.acquire(blocking=False):
                done += 1
            if done == MACHINES:
                return

    for round_no in range(ROUNDS):
        # Given: every GPU idle and a pending, funded job for each.
        for _ in range(MACHINES * GPUS_PER_MACHINE):
            JobFactory(budget_reserved=True)

        # When: the matcher places them while every machine heartbeats.
        errors = _run_at_once([match, *(lambda m=m: heartbeats(m.pk) for m in machines)])

        # Then: nothing failed, and the GPUs' states agree with the leases.
        assert errors == [], f"round {round_no}: {errors!r}"
        assert set(statuses) == {200}, f"round {round_no}: heartbeat answers {sorted(set(statuses))}"
        in_lease = set(LeaseGPU.objects.filter(active=True).values_list("gpu_id", flat=True))
        state = dict(GPU.objects.values_list("pk", "state"))
        written_back = sorted(g for g in in_lease if state[g] != GPU.State.LEASED)
        assert written_back == [], f"round {round_no}: GPUs in an active lease shown {[state[g] for g in written_back]}"
        idle_in_lease = sorted(g for g, s in state.items() if s == GPU.State.IDLE and g in in_lease)
        assert idle_in_lease == []
        assert {g for g, s in state.items() if s == GPU.State.LEASED} == in_lease

        # The round's leases and jobs end, so the next round starts from an idle fleet.
        for lease_id in Lease.objects.filter(status__in=Lease.ACTIVE).values_list("pk", flat=True):
            lease_end(lease_id=lease_id, reason=Lease.EndReason.CANCELLED, actor="test")
        for job in Job.objects.filter(status=Job.Status.PENDING):
            job_cancel(job=job, actor="test")
        statuses.clear()

    # The race was real: the matcher placed jobs while the heartbeats ran.
    assert placed > 0


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_gpus_lock_gives_each_gpu_as_it_is_and_skips_the_rows_another_transaction_holds() -> None:
    """The matcher's lock of a chunk's GPUs (one statement on PostgreSQL): each GPU that exists,
    in primary-key order, with its state and machine; with skip_locked, a GPU another
    transaction holds is left out, not waited for."""
    machine = machine_with_gpus(count=3)
    first, held, last = GPU.objects.filter(machine=machine).order_by("pk")
    GPU.objects.filter(pk=last.pk).update(state=GPU.State.OWNER_BUSY)
    with held_elsewhere(GPU.objects.filter(pk=held.pk)), transaction.atomic():
        rows = services.gpus_lock(gpu_ids=[last.pk, first.pk, held.pk, 10**9], skip_locked=True)

    assert rows == [(first.pk, GPU.State.IDLE, machine.pk), (last.pk, GPU.State.OWNER_BUSY, machine.pk)]
    with transaction.atomic():  # released: locked again, every one
        assert [row[0] for row in services.gpus_lock(gpu_ids=[held.pk, first.pk])] == [first.pk, held.pk]
