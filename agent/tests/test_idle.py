"""Idle detection over samples read by the real collector from FakeNvml scenarios."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pynvml
import pytest

from gpgpu_agent.idle import IdleDetector, foreign_processes, no_parent, proc_parent
from gpgpu_agent.nvml import MIG_DECLINED, NvmlCollector
from gpgpu_agent.types import GpuVerdict
from gpgpu_agent_testing.fake_nvml import FakeNvml

T0 = datetime(2026, 1, 14, 12, 0, tzinfo=UTC)


class Machine:
    """One fake GPU, the collector over it and a detector (threshold 10 %, grace 120 s); poll(t)
    samples at T0 + t seconds."""

    def __init__(self, fake: FakeNvml, *, offer_mig: bool = False, **gpu: object) -> None:
        self.fake = fake
        self.gpu = fake.add_gpu(**gpu)  # type: ignore[arg-type]
        self.now = T0
        self.collector = NvmlCollector(offer_mig=offer_mig, clock=lambda: self.now)
        self.detector = IdleDetector(threshold_pct=10.0, grace_s=120.0, parent_of=no_parent)
        self.uuid = fake.gpus[self.gpu].uuid

    def poll(
        self, at_s: float, *, rental_pids: dict[str, set[int]] | None = None, schedule_open: bool = True
    ) -> GpuVerdict:
        self.now = T0 + timedelta(seconds=at_s)
        sample = self.collector.sample()
        verdicts = self.detector.update(
            sample, rental_pids=rental_pids or {}, schedule_open=schedule_open, now=self.now
        )
        return verdicts[self.uuid]


@pytest.fixture
def fake() -> Iterator[FakeNvml]:
    with FakeNvml() as installed:
        yield installed


@pytest.fixture
def machine(fake: FakeNvml) -> Iterator[Machine]:
    made = Machine(fake)
    yield made
    made.collector.close()


def test_utilisation_series_goes_busy_then_quiet_then_idle_after_the_grace_period(machine: Machine) -> None:
    # One reading per poll, a poll every 30 s: busy for two polls, then quiet from t=60 s.
    machine.fake.set_utilization(machine.gpu, [80, 60, 5, 3, 2, 4, 1, 0, 0])

    busy = machine.poll(0)
    assert (busy.idle, busy.owner_busy, busy.idle_since) == (False, True, None)
    assert busy.reason == "utilisation 80% ≥ 10%"
    assert machine.poll(30).owner_busy

    waiting = [machine.poll(t) for t in (60, 90, 120, 150)]
    assert all(not v.idle and not v.owner_busy and v.idle_since is None for v in waiting)
    assert waiting[0].reason == "quiet for 0 s of the 120 s grace period"
    assert waiting[-1].reason == "quiet for 90 s of the 120 s grace period"

    idle = machine.poll(180)  # 120 s after the quiet stretch began
    assert (idle.idle, idle.owner_busy, idle.reason) == (True, False, "idle")
    assert idle.idle_since == T0 + timedelta(seconds=60)
    assert machine.poll(210).idle_since == T0 + timedelta(seconds=60)


def test_a_spike_over_the_threshold_restarts_the_grace_period(machine: Machine) -> None:
    machine.fake.set_utilization(machine.gpu, [0, 0, 0, 0, 0, 40, 0, 0, 0, 0, 0])
    verdicts = [machine.poll(30 * i) for i in range(11)]
    assert verdicts[4].idle and verdicts[4].idle_since == T0
    assert verdicts[5].owner_busy and not verdicts[5].idle
    assert not verdicts[9].idle  # 90 s after the spike
    assert verdicts[10].idle and verdicts[10].idle_since == T0 + timedelta(seconds=180)


def test_a_foreign_process_means_the_owner_is_busy_and_names_its_pid(machine: Machine) -> None:
    machine.poll(0)
    assert machine.poll(200).idle

    machine.fake.add_process(machine.gpu, 4242, 3000, kind="graphics")  # utilisation still 0
    verdict = machine.poll(230)

    assert (verdict.idle, verdict.owner_busy, verdict.idle_since) == (False, True, None)
    assert verdict.reason == "owner process 4242 is using it"

    machine.fake.remove_process(machine.gpu, 4242)
    after = machine.poll(260)
    assert not after.idle and not after.owner_busy  # the grace period starts again
    assert machine.poll(380).idle_since == T0 + timedelta(seconds=260)


def test_a_process_of_unknown_pid_counts_as_foreign(machine: Machine) -> None:
    machine.fake.add_process(machine.gpu, 0, None)
    verdict = machine.poll(0, rental_pids={machine.uuid: {5000}})
    assert verdict.owner_busy and verdict.reason == "1 process of unknown pid is using it"


def test_outside_the_schedule_a_quiet_gpu_is_not_idle(machine: Machine) -> None:
    closed = [machine.poll(t, schedule_open=False) for t in (0, 100, 200, 300)]
    assert all(not v.idle and not v.owner_busy for v in closed)
    assert closed[-1].reason == "outside the owner's availability schedule"

    opened = machine.poll(310, schedule_open=True)  # quiet all along: idle at once
    assert opened.idle and opened.idle_since == T0


def test_rental_processes_are_not_foreign_and_their_load_is_not_the_owners(machine: Machine) -> None:
    machine.poll(0)
    assert machine.poll(150).idle
    rental = {machine.uuid: {5000}}
    machine.fake.add_process(machine.gpu, 5000, 20000)
    machine.fake.set_utilization(machine.gpu, 97)

    rented = machine.poll(180, rental_pids=rental)
    assert (rented.idle, rented.owner_busy, rented.reason) == (True, False, "rented")
    assert rented.idle_since == T0
    assert foreign_processes(machine.collector.sample(), rental, parent_of=no_parent) == {}

    machine.fake.add_process(machine.gpu, 4242, 2000, kind="graphics")  # the owner is back
    sample = machine.collector.sample()
    assert foreign_processes(sample, rental, parent_of=no_parent) == {machine.uuid: [4242]}
    reclaimed = machine.detector.update(sample, rental_pids=rental, schedule_open=True, now=T0)[machine.uuid]
    assert reclaimed.owner_busy and reclaimed.reason == "owner process 4242 is using it"


def test_a_process_without_a_rental_on_its_gpu_is_foreign_even_with_a_rental_pid(machine: Machine) -> None:
    # Pid 5000 is a rental's on another GPU: on this one it is nobody's rental.
    machine.fake.add_process(machine.gpu, 5000, 100)
    verdict = machine.poll(0, rental_pids={"GPU-some-other": {5000}})
    assert verdict.owner_busy and verdict.reason == "owner process 5000 is using it"


def test_children_of_a_rental_process_belong_to_the_rental(fake: FakeNvml) -> None:
    gpu = fake.add_gpu()
    uuid = fake.gpus[gpu].uuid
    fake.add_process(gpu, 5001, 100)  # a data-loader worker the training script (5000) started
    fake.add_process(gpu, 7000, 100)  # the owner's
    parents = {5001: 5000, 5000: 1, 7000: 1}
    with NvmlCollector() as collector:
        sample = collector.sample()
    found = foreign_processes(sample, {uuid: {5000}}, parent_of=parents.get)
    assert found == {uuid: [7000]}


def test_proc_parent_reads_the_real_parent_pid() -> None:
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("no /proc on this system")
    assert proc_parent(os.getpid()) == os.getppid()
    assert proc_parent(2**22 + 12345) is None  # beyond any pid_max: no such process


def test_unknown_utilisation_is_not_idle_and_says_why(machine: Machine) -> None:
    machine.fake.fail_field(machine.gpu, "utilization", pynvml.NVML_ERROR_UNKNOWN)
    verdicts = [machine.poll(t) for t in (0, 200)]
    assert all(not v.idle and not v.owner_busy for v in verdicts)
    assert verdicts[-1].reason == "its utilisation is unknown (Unknown Error)"


def test_unlisted_processes_are_not_idle(machine: Machine) -> None:
    machine.fake.fail_field(machine.gpu, "graphics_processes", pynvml.NVML_ERROR_NO_PERMISSION)
    verdict = [machine.poll(t) for t in (0, 200)][-1]
    assert not verdict.idle
    assert verdict.reason == "its processes could not be listed (graphics_processes: Insufficient Permissions)"


def test_a_declined_gpu_is_never_idle(fake: FakeNvml) -> None:
    machine = Machine(fake, model="NVIDIA A100-SXM4-80GB", vram_mb=81920)
    fake.enable_mig(machine.gpu, 2)
    verdict = [machine.poll(t) for t in (0, 500)][-1]
    assert not verdict.idle and not verdict.owner_busy and verdict.reason == MIG_DECLINED
    machine.collector.close()


def test_a_gpu_offered_as_mig_instances_is_judged_by_its_processes(fake: FakeNvml) -> None:
    machine = Machine(fake, offer_mig=True, model="NVIDIA A100-SXM4-80GB", vram_mb=81920)
    fake.enable_mig(machine.gpu, 2)
    assert [machine.poll(t) for t in (0, 130)][-1].idle  # no utilisation under MIG, no process
    fake.add_process(machine.gpu, 4242, 100)
    assert machine.poll(160).owner_busy
    machine.collector.close()


def test_a_lost_gpu_is_not_idle_and_not_the_owners(machine: Machine) -> None:
    machine.poll(0)
    assert machine.poll(130).idle
    machine.fake.fall_off_bus(machine.gpu)
    lost = machine.poll(160)
    assert (lost.idle, lost.owner_busy) == (False, False)
    assert lost.reason == "the GPU cannot be read (GPU is lost)"
    machine.fake.recover(machine.gpu)
    assert not machine.poll(190).idle  # it must be quiet for the grace period again


def test_gpus_on_the_same_machine_are_judged_separately(fake: FakeNvml) -> None:
    quiet = fake.add_gpu(utilization=0)
    busy = fake.add_gpu(utilization=75)
    detector = IdleDetector(grace_s=0, parent_of=no_parent)
    with NvmlCollector() as collector:
        verdicts = detector.update(collector.sample(), rental_pids={}, schedule_open=True, now=T0)
    assert verdicts[fake.gpus[quiet].uuid].idle
    assert verdicts[fake.gpus[busy].uuid].owner_busy


def test_detector_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        IdleDetector(threshold_pct=0)
    with pytest.raises(ValueError):
        IdleDetector(grace_s=-1)
