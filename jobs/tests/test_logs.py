"""A running job's output: the chunks agents ship (POST /api/agent/v1/leases/{id}/logs), what the
renter reads (GET /api/v1/jobs/{id}/logs/), the per-job bound and the retention."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from jobs import services
from jobs.ingestion import MAX_LOG_CHUNK_BYTES
from jobs.models import Job, Lease, LogChunk
from jobs.services import lease_end
from jobs.tasks import prune_job_logs
from tests.factories import RenterFactory, agent_client, placed_lease, token_for

pytestmark = pytest.mark.django_db

API = "/api/agent/v1/"


def chunk(seq: int, text: str, **extra: Any) -> dict[str, Any]:
    return {"seq": seq, "at": timezone.now().isoformat(), "text": text, **extra}


def ship(client: APIClient, lease: Lease, body: dict[str, Any]):  # type: ignore[no-untyped-def]
    return client.post(f"{API}leases/{lease.pk}/logs", body, format="json")


@pytest.fixture
def running(renter_client) -> tuple[APIClient, APIClient, Lease]:  # type: ignore[no-untyped-def]
    """The renter's client, its running job's machine's client, and the lease."""
    client, renter = renter_client
    lease = placed_lease(renter=renter, started=True)
    return client, agent_client(lease.machine), lease


def read(client: APIClient, job_id: int, **params: Any) -> dict[str, Any]:
    response = client.get(f"/api/v1/jobs/{job_id}/logs/", params)
    assert response.status_code == 200, response.json()
    return response.json()


# --- the agent ships ---------------------------------------------------------------------------


def test_the_renter_reads_the_output_in_order_and_follows_it_with_the_cursor(running) -> None:  # type: ignore[no-untyped-def]
    renter, agent, lease = running
    assert ship(agent, lease, chunk(0, "epoch 1\n")).status_code == 201
    assert ship(agent, lease, chunk(1, "epoch 2\n")).status_code == 201

    first = read(renter, lease.job_id)
    assert [c["text"] for c in first["chunks"]] == ["epoch 1\n", "epoch 2\n"]
    assert [(c["lease"], c["seq"], c["truncated"]) for c in first["chunks"]] == [
        (lease.pk, 0, False),
        (lease.pk, 1, False),
    ]
    assert first["finished"] is False
    assert read(renter, lease.job_id, cursor=first["next_cursor"]) == {
        "chunks": [],
        "next_cursor": first["next_cursor"],
        "finished": False,
    }

    ship(agent, lease, chunk(2, "done\n"))
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.SUCCEEDED, actor="test", exit_code=0)
    last = read(renter, lease.job_id, cursor=first["next_cursor"])

    assert [c["text"] for c in last["chunks"]] == ["done\n"]
    assert last["finished"] is True


def test_a_page_that_is_full_is_not_the_end_even_of_a_finished_job(running) -> None:  # type: ignore[no-untyped-def]
    renter, agent, lease = running
    for seq in range(3):
        ship(agent, lease, chunk(seq, f"{seq}\n"))
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.SUCCEEDED, actor="test", exit_code=0)

    page = read(renter, lease.job_id, limit=2)
    rest = read(renter, lease.job_id, cursor=page["next_cursor"], limit=2)

    assert (len(page["chunks"]), page["finished"]) == (2, False)
    assert ([c["text"] for c in rest["chunks"]], rest["finished"]) == (["2\n"], True)


def test_a_repeated_chunk_is_stored_once(running) -> None:  # type: ignore[no-untyped-def]
    renter, agent, lease = running
    body = chunk(0, "once\n")

    first, again = ship(agent, lease, body), ship(agent, lease, {**body, "text": "changed\n"})

    assert (first.status_code, first.json()["duplicate"]) == (201, False)
    assert (again.status_code, again.json()["duplicate"], again.json()["stored"]) == (200, True, True)
    assert [c["text"] for c in read(renter, lease.job_id)["chunks"]] == ["once\n"]


def test_a_machine_cannot_ship_output_for_another_machines_lease(running) -> None:  # type: ignore[no-untyped-def]
    renter, _, lease = running
    intruder = agent_client(placed_lease(started=True).machine)

    response = ship(intruder, lease, chunk(0, "not mine\n"))

    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert read(renter, lease.job_id)["chunks"] == []
    assert ship(intruder, lease, chunk(0, "x")).status_code == 404
    assert ship(APIClient(), lease, chunk(0, "x")).status_code == 401


def test_a_chunk_over_the_size_limit_is_refused_and_says_why(running) -> None:  # type: ignore[no-untyped-def]
    _, agent, lease = running

    response = ship(agent, lease, chunk(0, "é" * (MAX_LOG_CHUNK_BYTES // 2 + 1)))

    assert response.status_code == 400
    assert f"at most {MAX_LOG_CHUNK_BYTES} bytes" in str(response.json())
    assert not LogChunk.objects.exists()


def test_a_body_over_the_request_limit_is_refused_with_413(running, settings) -> None:  # type: ignore[no-untyped-def]
    _, agent, lease = running

    response = ship(agent, lease, chunk(0, "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)))

    assert response.status_code == 413


def test_bad_chunks_are_refused(running) -> None:  # type: ignore[no-untyped-def]
    _, agent, lease = running

    for body in (chunk(-1, "x"), chunk(0, "a\x00b"), {"seq": 0, "text": "x"}, chunk(0, "x", truncated="maybe")):
        assert ship(agent, lease, body).status_code == 400, body
    assert not LogChunk.objects.exists()


# --- the bounds -------------------------------------------------------------------------------


def test_a_job_keeps_its_output_up_to_its_bound_then_a_notice_and_nothing_more(running, settings) -> None:  # type: ignore[no-untyped-def]
    renter, agent, lease = running
    settings.GPGPU = {**settings.GPGPU, "JOB_LOG_MAX_BYTES": 1000}
    answers = [ship(agent, lease, chunk(seq, "x" * 400)).json() for seq in range(4)]

    texts = [c["text"] for c in read(renter, lease.job_id)["chunks"]]
    assert texts[:2] == ["x" * 400, "x" * 400]
    assert texts[2] == "\n[gpgpu: this job's output passed 1000 bytes; the rest is not kept]\n"
    assert len(texts) == 3
    assert [a["stored"] for a in answers] == [True, True, False, False]
    assert sum(c.size for c in LogChunk.objects.exclude(truncated=True)) <= 1000
    assert ship(agent, lease, chunk(2, "x")).json() == {
        "lease_id": lease.pk,
        "seq": 2,
        "duplicate": True,
        "stored": False,
    }


def test_small_chunks_count_at_least_256_bytes_so_the_bound_caps_the_rows_too(running, settings) -> None:  # type: ignore[no-untyped-def]
    _, agent, lease = running
    settings.GPGPU = {**settings.GPGPU, "JOB_LOG_MAX_BYTES": 1024}

    answers = [ship(agent, lease, chunk(seq, "x\n")).json()["stored"] for seq in range(6)]

    assert answers == [True, True, True, True, False, False]
    assert LogChunk.objects.filter(job_id=lease.job_id).count() == 5  # four, and the notice


def test_prune_deletes_only_the_output_of_jobs_finished_longer_ago_than_the_retention(settings) -> None:
    hours = settings.GPGPU["JOB_LOG_RETENTION_H"]
    leases = [placed_lease(started=True) for _ in range(3)]
    for lease in leases:
        LogChunk.objects.create(job_id=lease.job_id, lease=lease, seq=0, text="x", size=1, at=timezone.now())
    old, recent, running = leases
    for lease, ago in ((old, hours + 1), (recent, hours - 1)):
        lease_end(lease_id=lease.pk, reason=Lease.EndReason.SUCCEEDED, actor="test", exit_code=0)
        Job.objects.filter(pk=lease.job_id).update(finished_at=timezone.now() - timedelta(hours=ago))
    # A running job's output is kept however old it is.
    LogChunk.objects.filter(lease=running).update(received_at=timezone.now() - timedelta(hours=10 * hours))

    result = prune_job_logs.apply().get()

    assert result == {"pruned": 1}
    assert set(LogChunk.objects.values_list("lease_id", flat=True)) == {recent.pk, running.pk}
    assert services.log_chunks_prune() == 0


def test_a_machine_cannot_write_into_a_lease_that_never_started_or_ended_long_ago(running, settings) -> None:  # type: ignore[no-untyped-def]
    """A lease's last chunks may come after its end, not for ever: a machine wrote into finished
    jobs after their renters were told `finished`, and into pruned ones from an empty bound."""
    from jobs.ingestion import LOG_LATE_S

    renter, agent, lease = running
    assert ship(agent, lease, chunk(0, "epoch 1\n")).status_code == 201
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.SUCCEEDED, actor="test", exit_code=0)
    assert ship(agent, lease, chunk(1, "the last lines\n")).status_code == 201  # late, but in time

    ended = timezone.now() - timedelta(seconds=LOG_LATE_S + 60)
    Lease.objects.filter(pk=lease.pk).update(ended_at=ended)
    Job.objects.filter(pk=lease.job_id).update(finished_at=ended)
    late = ship(agent, lease, chunk(2, "forged\n"))
    assert ship(agent, lease, chunk(1, "the last lines\n")).json()["duplicate"] is True  # a repeat still answers

    assert late.status_code == 409 and late.json()["code"] == "lease_log_closed"
    assert [c["text"] for c in read(renter, lease.job_id)["chunks"]] == ["epoch 1\n", "the last lines\n"]

    never = placed_lease(renter=Job.objects.get(pk=lease.job_id).renter)
    lease_end(lease_id=never.pk, reason=Lease.EndReason.FAILED_TO_START, actor="test")
    refused = ship(agent_client(never.machine), never, chunk(0, "forged\n"))
    assert refused.status_code == 409 and refused.json()["code"] == "lease_log_closed"


def test_a_chunk_dressed_as_the_cut_notice_does_not_silence_the_jobs_later_leases(running, settings) -> None:  # type: ignore[no-untyped-def]
    """The cut is the marketplace's to make: a machine that once held a job sent the notice's
    text with `truncated` and every later lease of the job, on honest machines, was dropped."""
    from jobs.ingestion import log_truncation_notice

    renter, agent, lease = running
    notice = log_truncation_notice(max_bytes=settings.GPGPU["JOB_LOG_MAX_BYTES"])
    assert ship(agent, lease, chunk(0, notice, truncated=True)).status_code == 201
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    Job.objects.filter(pk=lease.job_id).update(status=Job.Status.PENDING, finished_at=None)
    honest = placed_lease(job=Job.objects.get(pk=lease.job_id), started=True)

    answer = ship(agent_client(honest.machine), honest, chunk(0, "epoch 1\n"))

    assert answer.json()["stored"] is True
    assert read(renter, lease.job_id)["chunks"][-1]["text"] == "epoch 1\n"


# --- who reads ---------------------------------------------------------------------------------


def test_another_renter_reading_a_jobs_output_gets_404(running) -> None:  # type: ignore[no-untyped-def]
    _, agent, lease = running
    ship(agent, lease, chunk(0, "secret plans\n"))
    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Token {token_for(RenterFactory().user)}")

    response = other.get(f"/api/v1/jobs/{lease.job_id}/logs/")

    assert response.status_code == 404
    assert "secret plans" not in response.content.decode()
    assert APIClient().get(f"/api/v1/jobs/{lease.job_id}/logs/").status_code == 401


def test_a_bad_cursor_is_a_400(running) -> None:  # type: ignore[no-untyped-def]
    renter, _, lease = running

    for params in ({"cursor": "-1"}, {"cursor": "x"}, {"limit": "0"}, {"limit": "1000"}, {"after": "1"}):
        assert renter.get(f"/api/v1/jobs/{lease.job_id}/logs/", params).status_code == 400, params


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_follower_misses_no_chunk_when_two_leases_of_the_job_ship_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost lease's late chunk and its successor's, stored at the same moment: the later id
    committed first, the renter's cursor passed it, and the earlier chunk was never shown."""
    import threading

    from django.db import connection

    from jobs.ingestion import lease_log_ingest
    from jobs.selectors import log_chunks_after

    lost = placed_lease(renter=RenterFactory(), started=True)
    lease_end(lease_id=lost.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    successor = placed_lease(job=Job.objects.get(pk=lost.job_id), started=True)
    inserted, release = threading.Event(), threading.Event()
    create = LogChunk.objects.create

    def held_after_insert(**fields: Any) -> LogChunk:
        row = create(**fields)
        if fields["lease"].pk == lost.pk:  # the late chunk: inserted, its commit held back
            inserted.set()
            release.wait(10)
        return row

    monkeypatch.setattr(LogChunk.objects, "create", held_after_insert)

    def ship_as(lease: Lease, text: str) -> None:
        try:
            lease_log_ingest(machine=lease.machine, lease_id=lease.pk, seq=0, text=text, at=timezone.now())
        finally:
            connection.close()

    late = threading.Thread(target=ship_as, args=(lost, "last words of the lost lease\n"))
    late.start()
    assert inserted.wait(10)
    newer = threading.Thread(target=ship_as, args=(successor, "first words of the successor\n"))
    newer.start()
    newer.join(1.0)
    job = Job.objects.get(pk=lost.job_id)
    seen = log_chunks_after(job=job, cursor=0, limit=100)  # the renter follows meanwhile
    cursor = seen[-1].pk if seen else 0
    release.set()
    late.join(10)
    newer.join(10)
    seen += log_chunks_after(job=job, cursor=cursor, limit=100)

    assert sorted(c.text for c in seen) == ["first words of the successor\n", "last words of the lost lease\n"]


def test_the_bound_counts_the_chunks_of_every_lease_of_the_job(running, settings) -> None:  # type: ignore[no-untyped-def]
    """What a job used is carried from its newest chunk: a successor lease does not start from an
    empty bound, and the chunk that passes it becomes the notice."""
    renter, agent, lease = running
    settings.GPGPU = {**settings.GPGPU, "JOB_LOG_MAX_BYTES": 1000}
    assert ship(agent, lease, chunk(0, "x" * 300)).json()["stored"] is True
    assert ship(agent, lease, chunk(1, "x" * 300)).json()["stored"] is True
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    successor = placed_lease(job=Job.objects.get(pk=lease.job_id), started=True)
    machine = agent_client(successor.machine)

    answers = [ship(machine, successor, chunk(seq, "y" * 300)).json()["stored"] for seq in range(3)]

    assert answers == [True, False, False]
    texts = [c["text"] for c in read(renter, lease.job_id)["chunks"]]
    assert texts[-1].startswith("\n[gpgpu: this job's output passed 1000 bytes")
    assert len(texts) == 4
