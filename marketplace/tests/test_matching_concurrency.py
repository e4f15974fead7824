"""No GPU is ever in two active leases, even with several matching workers at once."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from django.db import IntegrityError, connection, connections, transaction

from jobs.models import Job, Lease, LeaseGPU
from jobs.services import Placement, leases_assign
from marketplace import matching, tasks
from providers.models import GPU
from tests.factories import GPUFactory, JobFactory, MachineFactory
from tests.row_locks import held_elsewhere

WORKERS = 4
ROUNDS = 3


@pytest.fixture(autouse=True, params=["v1", "v2"])
def policy(request: pytest.FixtureRequest, settings: Any) -> str:
    """Both placement policies: v1 matches chunk by chunk under its locks, v2 plans the whole
    cycle and writes it under locks as it plans (marketplace.matching._PlanWriter)."""
    settings.MATCH_POLICY = request.param
    return str(request.param)


def test_a_gpu_cannot_be_in_two_active_leases(db):
    m = MachineFactory()
    gpu = GPUFactory(machine=m, index=0)
    first, second = JobFactory(), JobFactory()
    leases_assign(
        placements=[Placement(job_id=first.pk, machine_id=m.pk, gpu_ids=(gpu.pk,), price_per_gpu_hour=Decimal("1"))]
    )
    lease = Lease.objects.create(job=second, machine=m, gpu_count=1, price_per_gpu_hour=Decimal("1"))

    with pytest.raises(IntegrityError), transaction.atomic():
        LeaseGPU.objects.create(lease=lease, gpu=gpu, active=True)

    assert LeaseGPU.objects.filter(gpu=gpu, active=True).count() == 1


def _fleet_and_jobs(*, machines: int, gpus_per_machine: int, jobs: int) -> None:
    for _ in range(machines):
        m = MachineFactory()
        for i in range(gpus_per_machine):
            # Equal floors everywhere, so every worker wants the same GPUs first.
            GPUFactory(machine=m, index=i, price_floor=Decimal("0.30"))
    for _ in range(jobs):
        JobFactory(budget_reserved=True)


def _run_workers_at_once(count: int) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def worker() -> None:
        try:
            start.wait()
            matching.match_cycle()
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_matching_workers_never_double_book_a_gpu(monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: row locks (SELECT … FOR UPDATE SKIP LOCKED) only exist there")
    # Small chunks make the workers interleave many transactions.
    monkeypatch.setattr(matching, "CHUNK_SIZE", 7)
    _fleet_and_jobs(machines=10, gpus_per_machine=4, jobs=60)

    for _ in range(ROUNDS):
        errors = _run_workers_at_once(WORKERS)
        assert errors == []

    active = list(LeaseGPU.objects.filter(active=True).values_list("gpu_id", "gpu__machine_id", "lease__machine_id"))
    per_gpu = Counter(gpu_id for gpu_id, _, _ in active)
    assert per_gpu and max(per_gpu.values()) == 1, "a GPU is in two active leases"
    assert all(gpu_machine == lease_machine for _, gpu_machine, lease_machine in active)
    assert Lease.objects.filter(status__in=Lease.ACTIVE).count() == min(40, 60)
    assert Job.objects.filter(status=Job.Status.SCHEDULED).count() == 40
    assert Lease.objects.values("job_id").distinct().count() == Lease.objects.count()
    assert GPU.objects.filter(state=GPU.State.LEASED).count() == 40
    waiting = Job.objects.filter(status=Job.Status.PENDING)
    assert waiting.count() == 20
    assert set(waiting.values_list("unplaced_code", flat=True)) == {"no_idle_gpu"}


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_workers_place_multi_gpu_jobs_on_one_machine_each(monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: row locks (SELECT … FOR UPDATE SKIP LOCKED) only exist there")
    monkeypatch.setattr(matching, "CHUNK_SIZE", 5)
    _fleet_and_jobs(machines=10, gpus_per_machine=4, jobs=0)
    for i in range(30):
        JobFactory(gpu_count=(2 if i % 3 else 4), budget_reserved=True)

    for _ in range(ROUNDS):
        assert _run_workers_at_once(WORKERS) == []

    active = list(LeaseGPU.objects.filter(active=True).values_list("gpu_id", "gpu__machine_id", "lease__machine_id"))
    assert len(active) == len({gpu_id for gpu_id, _, _ in active}), "a GPU is in two active leases"
    assert all(gpu_machine == lease_machine for _, gpu_machine, lease_machine in active)
    for lease in Lease.objects.filter(status__in=Lease.ACTIVE):
        assert lease.lease_gpus.filter(active=True).count() == lease.gpu_count
    # 40 GPUs on 4-GPU machines: every GPU ends up leased, whatever the mix of 2s and 4s.
    assert len(active) == 40


def test_chunk_is_rolled_back_whole_when_the_unique_index_refuses_a_gpu(db, monkeypatch):
    """A worker whose view is stale (here: another lease slips in on one of its GPUs after
    the lock) writes nothing for that chunk; the next cycle places the jobs."""
    m = MachineFactory()
    gpus = [GPUFactory(machine=m, index=i) for i in range(2)]
    jobs = [JobFactory(budget_reserved=True), JobFactory(budget_reserved=True)]
    intruder_job = JobFactory(status=Job.Status.RUNNING)
    real_lock = matching._gpus_lock

    def lock_then_intrude(gpu_ids):  # type: ignore[no-untyped-def]
        locked = real_lock(gpu_ids)
        intruder = Lease.objects.create(job=intruder_job, machine=m, gpu_count=1, price_per_gpu_hour=Decimal("1"))
        LeaseGPU.objects.create(lease=intruder, gpu=gpus[1], active=True)
        return locked

    monkeypatch.setattr(matching, "_gpus_lock", lock_then_intrude)
    result = matching.match_cycle()

    assert result.conflicts == 1
    assert result.placed == 0
    assert not Lease.objects.exists()
    assert not LeaseGPU.objects.exists()
    assert set(Job.objects.filter(pk__in=[j.pk for j in jobs]).values_list("status", flat=True)) == {"pending"}
    assert set(GPU.objects.filter(machine=m).values_list("state", flat=True)) == {GPU.State.IDLE}

    monkeypatch.setattr(matching, "_gpus_lock", real_lock)
    assert matching.match_cycle().placed == 2


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_recording_why_jobs_wait_never_waits_on_a_job_another_transaction_holds(policy: str) -> None:
    """v2's cycle records reasons for every job it read, unlocked, while other workers hold some
    of those jobs to place them: the reasons' UPDATE locked rows as it met them, and two such
    workers deadlocked on jobs_job (seen in a full run). Now it skips a held job instead."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: row locks only exist there")
    from jobs.services import job_set_unplaced

    held, free = JobFactory(), JobFactory()
    with held_elsewhere(Job.objects.filter(pk=held.pk)):
        done = threading.Event()

        def record() -> None:
            try:
                job_set_unplaced(reasons={held.pk: ("no_idle_gpu", "busy"), free.pk: ("no_idle_gpu", "busy")})
                done.set()
            finally:
                connections.close_all()

        recorder = threading.Thread(target=record)
        recorder.start()
        # Before: the UPDATE waited here for the holder, however long it held the job.
        assert done.wait(timeout=5), "recording reasons waited on a job another transaction holds"
        recorder.join(timeout=5)

    assert Job.objects.get(pk=free.pk).unplaced_code == "no_idle_gpu"
    assert Job.objects.get(pk=held.pk).unplaced_code == ""  # skipped: its holder decides


@pytest.fixture
def two_writers(policy: str, settings: Any) -> None:
    """A planned cycle's chunks written by two connections (MATCH_WRITERS) on PostgreSQL."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: other connections see the test's rows only once committed")
    if policy == "v1":
        pytest.skip("v1 writes each chunk as it places it, one connection")
    settings.GPGPU = {**settings.GPGPU, "MATCH_WRITERS": 2}


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_planned_cycle_writes_its_chunks_on_two_connections_at_once(two_writers: None, monkeypatch: Any) -> None:
    """A planned cycle's chunks are written by MATCH_WRITERS connections at the same time
    (marketplace.matching._PlanWriter), each chunk once, and every job placed once: run as beat
    runs it, the Celery task under its lock (which holds no transaction that would keep the
    writers to one connection)."""
    monkeypatch.setattr(matching, "CHUNK_SIZE", 3)
    _fleet_and_jobs(machines=11, gpus_per_machine=1, jobs=11)  # 4 chunks: 3, 3, 3, 2
    write = matching._chunk_write
    both_writing = threading.Barrier(2, timeout=20)
    seen: list[tuple[int, tuple[int, ...]]] = []
    waited: set[int] = set()
    switch_intervals: set[float] = set()
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # CPython's default, whatever this process had

    def chunk_write(chunk: Any) -> Any:
        if threading.get_ident() not in waited:  # each writer's first chunk: the other must be at its own
            waited.add(threading.get_ident())
            both_writing.wait()
        connection.ensure_connection()  # a writer thread's connection opens at its first query
        seen.append((connection.connection.info.backend_pid, tuple(sorted(p.job_id for p in chunk))))
        switch_intervals.add(sys.getswitchinterval())
        return write(chunk)

    monkeypatch.setattr(matching, "_chunk_write", chunk_write)
    try:
        result = tasks.match_pending_jobs()
        after = sys.getswitchinterval()
    finally:
        sys.setswitchinterval(before)

    # While the writers ran beside the policy a writer back from the database got the GIL
    # within the short interval; after the cycle the process's own setting is back.
    assert list(switch_intervals) == [pytest.approx(matching.WRITER_SWITCH_INTERVAL_S)]
    assert after == pytest.approx(0.005)

    assert (result["placed"], result["chunks"], result["conflicts"]) == (11, 4, 0)
    assert len({pid for pid, _ in seen}) == 2
    chunked = [job_id for _, job_ids in seen for job_id in job_ids]
    assert sorted(chunked) == sorted(Job.objects.values_list("pk", flat=True))  # each job in one chunk, once
    assert Job.objects.filter(status=Job.Status.SCHEDULED).count() == 11
    assert Lease.objects.values("job_id").distinct().count() == Lease.objects.count() == 11
    assert LeaseGPU.objects.filter(active=True).values("gpu_id").distinct().count() == 11


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_chunk_writer_that_fails_fails_the_cycle(two_writers: None, monkeypatch: Any) -> None:
    """An error in a chunk written on another thread reaches the cycle (and the task's failure
    count), as it would with one writer, instead of dying with its thread."""
    monkeypatch.setattr(matching, "CHUNK_SIZE", 2)
    _fleet_and_jobs(machines=6, gpus_per_machine=1, jobs=6)
    write = matching._chunk_write
    caller = threading.get_ident()

    def chunk_write(chunk: Any) -> Any:
        if threading.get_ident() != caller:
            raise RuntimeError("the database went away under this writer")
        return write(chunk)

    monkeypatch.setattr(matching, "_chunk_write", chunk_write)
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError, match="went away under this writer"):
        matching.match_cycle()
    assert sys.getswitchinterval() == before  # the writers' short interval ends with them
    # What the calling thread's writer committed stays, as chunks committed before a failure do.
    assert Job.objects.filter(status=Job.Status.SCHEDULED).count() == Lease.objects.count() <= 4


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_planned_cycle_writes_its_first_chunks_while_the_policy_is_still_placing(
    two_writers: None, monkeypatch: Any
) -> None:
    """A full chunk goes to a writer as soon as the policy has made it: the writes run on the
    database's core while the policy runs on this one, instead of after it."""
    monkeypatch.setattr(matching, "CHUNK_SIZE", 3)
    _fleet_and_jobs(machines=8, gpus_per_machine=1, jobs=8)
    write = matching._chunk_write
    writing = threading.Event()
    seen_while_placing: list[bool] = []

    def chunk_write(chunk: Any) -> Any:
        writing.set()
        return write(chunk)

    add = matching._PlanWriter.add

    def add_and_look(writer: Any, placement: Any) -> None:
        add(writer, placement)
        if writer.chunks == 1 and not seen_while_placing:  # the first chunk was handed over: is it written now?
            seen_while_placing.append(writing.wait(timeout=20))

    monkeypatch.setattr(matching, "_chunk_write", chunk_write)
    monkeypatch.setattr(matching._PlanWriter, "add", add_and_look)
    result = matching.match_cycle()

    assert seen_while_placing == [True]
    assert (result.placed, result.chunks, result.conflicts) == (8, 3, 0)
    assert Lease.objects.values("job_id").distinct().count() == Lease.objects.count() == 8


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_policy_that_fails_mid_plan_leaves_whole_chunks_and_no_writer_behind(
    two_writers: None, monkeypatch: Any
) -> None:
    """The policy fails after its first full chunk: the error reaches the cycle, the writer
    threads end with it, and what was written is that chunk, complete."""
    monkeypatch.setattr(matching, "CHUNK_SIZE", 3)
    _fleet_and_jobs(machines=8, gpus_per_machine=1, jobs=8)
    place = matching.policy.pool_place

    def place_then_fail(*args: Any, on_placement: Any, **kwargs: Any) -> Any:
        made = place(*args, **kwargs)
        for placement in made[:4]:
            on_placement(placement)
        raise ZeroDivisionError("the policy broke")

    threads_before = set(threading.enumerate())
    monkeypatch.setattr(matching.policy, "pool_place", place_then_fail)
    with pytest.raises(ZeroDivisionError, match="the policy broke"):
        matching.match_cycle()
    # The kept pool lost GPUs to placements that were not all written: the next cycle builds it again.
    assert matching._kept is not None and matching._kept.pool is None

    assert set(threading.enumerate()) <= threads_before  # no writer left running
    written = Lease.objects.count()
    assert written in (0, 3)  # the first chunk, if its writer had taken it, whole; never the fourth placement
    assert Job.objects.filter(status=Job.Status.SCHEDULED).count() == written


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_plan_smaller_than_a_chunk_is_written_by_the_cycle_itself(two_writers: None, monkeypatch: Any) -> None:
    """Most cycles place a few jobs: one partial chunk, written in the calling thread, with no
    writer thread started (nor its database connection opened)."""
    _fleet_and_jobs(machines=3, gpus_per_machine=1, jobs=3)
    write = matching._chunk_write
    writers: list[int] = []

    def chunk_write(chunk: Any) -> Any:
        writers.append(threading.get_ident())
        return write(chunk)

    started = threading.Thread.start
    threads: list[threading.Thread] = []

    def start(thread: threading.Thread) -> None:
        threads.append(thread)
        started(thread)

    monkeypatch.setattr(matching, "_chunk_write", chunk_write)
    monkeypatch.setattr(threading.Thread, "start", start)
    result = matching.match_cycle()

    assert (result.placed, result.chunks) == (3, 1)
    assert writers == [threading.get_ident()]
    assert threads == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_jobs_left_out_of_the_plan_are_explained_while_its_last_chunks_are_written(
    two_writers: None, monkeypatch: Any
) -> None:
    """The reasons of the jobs the plan left out are worked out (this process's CPU) while the
    writer thread writes (the database's), before this thread writes beside it: not after the
    last chunk is written, when one of the two cores would have nothing to do."""
    monkeypatch.setattr(matching, "CHUNK_SIZE", 3)
    _fleet_and_jobs(machines=6, gpus_per_machine=1, jobs=9)  # 6 placed in 2 chunks, 3 wait
    write, explain = matching._chunk_write, matching._Fleet.explain
    caller = threading.get_ident()
    explained = threading.Event()
    main_wrote_after_explaining: list[bool] = []
    writer_saw_explaining: list[bool] = []

    def chunk_write(chunk: Any) -> Any:
        if threading.get_ident() == caller:
            main_wrote_after_explaining.append(explained.is_set())
        else:  # the writer thread holds its chunk until the reasons are under way
            writer_saw_explaining.append(explained.wait(timeout=20))
        return write(chunk)

    def explaining(self: Any, job: Any) -> Any:
        explained.set()
        return explain(self, job)

    monkeypatch.setattr(matching, "_chunk_write", chunk_write)
    monkeypatch.setattr(matching._Fleet, "explain", explaining)
    result = matching.match_cycle()

    assert (result.placed, result.unplaced) == (6, 3)
    assert writer_saw_explaining and all(writer_saw_explaining)
    # Before, this thread took the second chunk and wrote it, and explained after.
    assert all(main_wrote_after_explaining)
    waiting = Job.objects.filter(status=Job.Status.PENDING)
    assert sorted(waiting.values_list("unplaced_code", flat=True)) == ["no_idle_gpu"] * 3


def _backends() -> int:
    """This test database's connections, as PostgreSQL counts them (a closed one's backend may
    take a moment to go)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        return int(cursor.fetchone()[0])


def _settled_backends(expected: int) -> int:
    for _ in range(100):
        if (count := _backends()) == expected:
            break
        time.sleep(0.05)
    return count


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_cycle_of_a_chunk_of_jobs_or_more_reads_them_while_it_reads_the_fleet(
    two_writers: None, monkeypatch: Any
) -> None:
    """With a chunk's worth of jobs waiting, their read runs in a thread with a connection of
    its own while this thread reads the fleet (each one's Python runs while the other waits for
    PostgreSQL); the thread's connection is closed when the cycle returns."""
    monkeypatch.setattr(matching, "CHUNK_SIZE", 3)
    _fleet_and_jobs(machines=4, gpus_per_machine=1, jobs=4)
    before = _backends()
    jobs_read, fleet_read = matching._jobs_read, matching._fleet_read
    caller = threading.get_ident()
    reading_jobs = threading.Event()
    readers: list[int] = []
    fleet_saw_jobs_read: list[bool] = []

    def read_jobs(limit: int, now: Any) -> Any:
        readers.append(threading.get_ident())
        reading_jobs.set()
        return jobs_read(limit, now)

    def read_fleet(*, now: Any) -> Any:
        fleet_saw_jobs_read.append(reading_jobs.wait(timeout=20))  # one after the other: 20 s, then False
        return fleet_read(now=now)

    monkeypatch.setattr(matching, "_jobs_read", read_jobs)
    monkeypatch.setattr(matching, "_fleet_read", read_fleet)
    result = matching.match_cycle()

    assert result.placed == 4
    assert fleet_saw_jobs_read == [True]
    assert len(readers) == 1 and readers[0] != caller
    assert _settled_backends(before) == before


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_jobs_read_that_fails_beside_the_fleet_read_fails_the_cycle_and_writes_nothing(
    two_writers: None, monkeypatch: Any
) -> None:
    monkeypatch.setattr(matching, "CHUNK_SIZE", 3)
    _fleet_and_jobs(machines=4, gpus_per_machine=1, jobs=4)
    before = _backends()

    def broken(limit: int) -> Any:
        raise RuntimeError("the jobs' read failed")

    monkeypatch.setattr(matching, "_pending_requests", broken)
    with pytest.raises(RuntimeError, match="the jobs' read failed"):
        matching.match_cycle()

    assert Job.objects.filter(status=Job.Status.PENDING).count() == 4
    assert not Lease.objects.exists()
    assert _settled_backends(before) == before


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_fleet_read_that_fails_waits_for_the_jobs_read_beside_it(two_writers: None, monkeypatch: Any) -> None:
    """The cycle's error goes on only once the jobs' thread has ended and closed its connection."""
    monkeypatch.setattr(matching, "CHUNK_SIZE", 3)
    _fleet_and_jobs(machines=4, gpus_per_machine=1, jobs=4)
    before = _backends()
    jobs_read = matching._jobs_read
    finished: list[bool] = []

    def slow_jobs_read(limit: int, now: Any) -> Any:
        time.sleep(0.3)
        value = jobs_read(limit, now)
        finished.append(True)
        return value

    def broken(*, now: Any) -> Any:
        raise RuntimeError("the fleet's read failed")

    monkeypatch.setattr(matching, "_jobs_read", slow_jobs_read)
    monkeypatch.setattr(matching, "_fleet_read", broken)
    with pytest.raises(RuntimeError, match="the fleet's read failed"):
        matching.match_cycle()

    assert finished == [True]
    assert not Lease.objects.exists()
    assert _settled_backends(before) == before


@pytest.mark.django_db(transaction=True)
def test_a_planned_job_its_chunk_could_not_write_gets_its_reason_too(monkeypatch: Any) -> None:
    """A job in the plan whose GPUs another worker held when its chunk was written stays
    pending with a reason, as the jobs left out of the plan do."""
    _fleet_and_jobs(machines=2, gpus_per_machine=1, jobs=3)
    monkeypatch.setattr(matching, "_gpus_lock", lambda gpu_ids: {})  # every GPU held elsewhere
    result = matching.match_cycle()

    assert (result.placed, result.unplaced) == (0, 3)
    waiting = Job.objects.filter(status=Job.Status.PENDING)
    assert sorted(waiting.values_list("unplaced_code", flat=True)) == ["no_idle_gpu"] * 3


def test_a_chunk_locks_only_pending_jobs_and_gpus_still_free_for_a_lease(db: Any) -> None:
    """What a chunk's writer holds before it writes: the jobs still pending, and the GPUs still
    idle, on an online machine and in no active lease. Both on PostgreSQL (one statement each,
    without the ORM) and elsewhere."""
    online, offline = MachineFactory(), MachineFactory(status="offline")
    free = GPUFactory(machine=online, index=0)
    busy = GPUFactory(machine=online, index=1, state=GPU.State.OWNER_BUSY)
    leased = GPUFactory(machine=online, index=2)
    away = GPUFactory(machine=offline, index=0)
    lease = Lease.objects.create(
        job=JobFactory(status=Job.Status.RUNNING), machine=online, gpu_count=1, price_per_gpu_hour=Decimal("1")
    )
    LeaseGPU.objects.create(lease=lease, gpu=leased, active=True)
    pending, cancelled = JobFactory(), JobFactory(status=Job.Status.CANCELLED)

    with transaction.atomic():
        assert matching._jobs_hold([pending.pk, cancelled.pk, 10**9]) == {pending.pk}
        assert matching._gpus_lock([free.pk, busy.pk, leased.pk, away.pk, 10**9]) == {free.pk: online.pk}


def test_a_gpu_that_moved_machines_after_the_plan_is_not_leased_under_the_old_one(db: Any, monkeypatch: Any) -> None:
    """Between a cycle's read and its write the GPU's rig registered again: the GPU row moved to
    the new machine (providers.services._gpus_claim). The placement on the old machine is not
    written (the old machine's agent would be told to run on a GPU it no longer has); the next
    cycle places the job on the new machine."""
    old, new = MachineFactory(), MachineFactory()
    gpu = GPUFactory(machine=old, index=0)
    job = JobFactory(budget_reserved=True)
    real_lock = matching._gpus_lock

    def move_then_lock(gpu_ids: Any) -> Any:
        GPU.objects.filter(pk=gpu.pk).update(machine=new)
        return real_lock(gpu_ids)

    monkeypatch.setattr(matching, "_gpus_lock", move_then_lock)
    assert matching.match_cycle().placed == 0
    assert not Lease.objects.exists()
    assert Job.objects.get(pk=job.pk).status == Job.Status.PENDING

    monkeypatch.setattr(matching, "_gpus_lock", real_lock)
    assert matching.match_cycle().placed == 1
    assert Lease.objects.get(job=job).machine_id == new.pk
