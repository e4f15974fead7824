"""The simulated machine behind `gpgpu-agent run --simulate`, read through the real collector."""

from __future__ import annotations

import itertools
import random

import pynvml
import pytest

from gpgpu_agent.idle import IdleDetector, foreign_processes, no_parent
from gpgpu_agent_testing.owner_usage import BUSY_RUNS, IDLE_RUNS, idle_fraction, owner_runs
from gpgpu_agent_testing.sim import OWNER_PID_BASE, SimulatedHost

RTX_4090 = ("NVIDIA GeForce RTX 4090", 24564)
A100 = ("NVIDIA A100-SXM4-80GB", 81920)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def owner_pattern(seed: int, *, steps: int = 600, step_s: float = 5.0) -> list[tuple[bool, ...]]:
    clock = Clock()
    host = SimulatedHost([RTX_4090, RTX_4090, A100], seed=seed, time_scale=10, clock=clock)
    pattern = []
    for step in range(steps):
        clock.t = step * step_s
        host.tick()
        pattern.append(tuple(host.owner_busy(uuid) for uuid in host.uuids))
    return pattern


def test_the_same_seed_gives_the_same_owners_and_another_seed_others() -> None:
    assert owner_pattern(7) == owner_pattern(7)
    assert owner_pattern(7) != owner_pattern(8)


def test_owners_alternate_busy_and_idle_with_an_owner_process_while_busy() -> None:
    clock = Clock()
    host = SimulatedHost([RTX_4090], seed=11, time_scale=10, clock=clock)
    collector = host.collector()
    uuid = host.uuids[0]
    busy_seen, idle_seen, transitions, previous = 0, 0, 0, None
    try:
        for step in range(720):  # an hour of the owner's time, compressed tenfold
            clock.t = step * 0.5
            gpu = collector.sample().gpus[0]
            busy = host.owner_busy(uuid)
            owner_pids = [p.pid for p in gpu.processes if p.pid >= OWNER_PID_BASE]
            if busy:
                busy_seen += 1
                assert owner_pids == [host.owner_pid(uuid)]
                assert gpu.utilization_pct is not None and gpu.utilization_pct >= 30
                assert gpu.vram_used_mb is not None and gpu.vram_used_mb > 300
            else:
                idle_seen += 1
                assert owner_pids == [] and host.owner_pid(uuid) is None
                assert gpu.utilization_pct is not None and gpu.utilization_pct < 2
            transitions += previous is not None and previous != busy
            previous = busy
    finally:
        collector.close()
    assert busy_seen > 50 and idle_seen > 50
    assert transitions >= 4


def test_each_busy_run_has_a_new_owner_process() -> None:
    clock = Clock()
    host = SimulatedHost([RTX_4090], seed=5, time_scale=10, clock=clock)
    pids = set()
    for step in range(2000):
        clock.t = step * 1.0
        host.tick()
        pid = host.owner_pid(host.uuids[0])
        if pid is not None:
            pids.add(pid)
    assert len(pids) >= 3 and all(OWNER_PID_BASE <= pid < OWNER_PID_BASE + 1000 for pid in pids)


def test_a_rental_shows_its_pids_and_its_load_and_is_not_foreign() -> None:
    clock = Clock()
    host = SimulatedHost([RTX_4090, RTX_4090], seed=1, owners_never_busy=True, clock=clock)
    collector = host.collector()
    rented, other = host.uuids
    try:
        host.set_rental(rented, True, [4321])
        sample = collector.sample()
        by_uuid = {gpu.uuid: gpu for gpu in sample.gpus}
        assert [p.pid for p in by_uuid[rented].processes] == [4321]
        assert by_uuid[rented].utilization_pct is not None and by_uuid[rented].utilization_pct >= 88
        assert by_uuid[other].utilization_pct is not None and by_uuid[other].utilization_pct < 2
        assert foreign_processes(sample, {rented: {4321}}, parent_of=no_parent) == {}
        verdicts = IdleDetector(grace_s=0, parent_of=no_parent).update(
            sample, rental_pids={rented: {4321}}, schedule_open=True
        )
        assert not verdicts[rented].owner_busy and verdicts[rented].reason == "rented"

        host.set_rental(rented, False)
        clock.t = 1.0
        after = {gpu.uuid: gpu for gpu in collector.sample().gpus}[rented]
        assert after.processes == () and after.utilization_pct is not None and after.utilization_pct < 2
    finally:
        collector.close()


def test_an_owner_coming_back_during_a_rental_is_a_foreign_process() -> None:
    clock = Clock()
    host = SimulatedHost([RTX_4090], seed=2, time_scale=10, clock=clock)
    uuid = host.uuids[0]
    collector = host.collector()
    try:
        while host.owner_busy(uuid):  # wait for a quiet GPU, as the marketplace would
            clock.t += 1.0
            collector.sample()
        host.set_rental(uuid, True, [4321])
        while not host.owner_busy(uuid):
            clock.t += 1.0
            sample = collector.sample()
        found = foreign_processes(sample, {uuid: {4321}}, parent_of=no_parent)
        assert found == {uuid: [host.owner_pid(uuid)]}
    finally:
        collector.close()


def test_simulated_machines_with_other_seeds_have_other_gpu_uuids() -> None:
    first = SimulatedHost([RTX_4090, RTX_4090], seed=1)
    second = SimulatedHost([RTX_4090, RTX_4090], seed=2)
    named = SimulatedHost([RTX_4090, RTX_4090], seed=1, uuid_namespace="rig-7")
    assert len(set(first.uuids + second.uuids + named.uuids)) == 6
    assert SimulatedHost([RTX_4090], seed=1).uuids[0] == first.uuids[0]  # stable across restarts


def test_temperature_and_power_follow_the_load() -> None:
    clock = Clock()
    host = SimulatedHost([A100], seed=1, owners_never_busy=True, clock=clock)
    collector = host.collector()
    try:
        cool = collector.sample().gpus[0]
        host.set_rental(host.uuids[0], True, [4321])
        for step in range(1, 10):
            clock.t = step
            hot = collector.sample().gpus[0]
    finally:
        collector.close()
    assert cool.power_w is not None and hot.power_w is not None and hot.power_w > cool.power_w + 200
    assert cool.temperature_c is not None and hot.temperature_c is not None
    assert hot.temperature_c > cool.temperature_c + 30
    assert hot.power_limit_w == 400.0


def test_closing_the_simulated_collector_removes_the_fake() -> None:
    original = pynvml.nvmlInit
    host = SimulatedHost([RTX_4090], seed=1)
    collector = host.collector()
    assert pynvml.nvmlInit is not original
    collector.close()
    assert pynvml.nvmlInit is original


def test_a_host_held_as_a_context_manager_stays_installed_after_its_collector_closes() -> None:
    with SimulatedHost([RTX_4090], seed=1) as host:
        host.collector().close()
        assert host.fake.installed
    assert not host.fake.installed


def test_simulated_host_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        SimulatedHost([], seed=1)
    with pytest.raises(ValueError):
        SimulatedHost([RTX_4090], seed=1, time_scale=0)
    with pytest.raises(KeyError):
        SimulatedHost([RTX_4090], seed=1).set_rental("GPU-nope", True, [1])


def test_fitted_owner_runs_leave_the_gpu_idle_as_often_as_the_traces() -> None:
    # The traces' owners left their GPUs idle 67 % of samples; the fitted run lengths give 63 %
    # in the long run (lognormal means), and the generator must reproduce that share.
    runs = list(itertools.islice(owner_runs(random.Random(1)), 20_000))
    idle_s = sum(length for busy, length in runs if not busy)
    total_s = sum(length for _, length in runs)
    assert idle_fraction() == pytest.approx(0.633, abs=0.001)
    assert idle_s / total_s == pytest.approx(idle_fraction(), abs=0.02)
    busy = [length for is_busy, length in runs if is_busy]
    assert all(BUSY_RUNS.min_s <= length <= BUSY_RUNS.max_s for length in busy)
    assert sorted(busy)[len(busy) // 2] == pytest.approx(BUSY_RUNS.median_s(), rel=0.05)
    assert IDLE_RUNS.median_s() == pytest.approx(185.8, abs=0.5)
