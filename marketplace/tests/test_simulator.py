"""The trace-replay simulator (marketplace.simulator) on small traces the tests write
themselves: what a user of its figures would notice."""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from marketplace.placement import Placement
from marketplace.simulator.engine import Config, Simulation
from marketplace.simulator.metrics import Metrics, max_flow_bound
from marketplace.simulator.owners import Learner, Readings
from marketplace.simulator.traces import DutySeries, Node, TraceError, TraceJob, read_duty, read_fleet, read_jobs

STEP = 60


def write_traces(folder: Path, *, seed: int = 5, nodes: int = 12, jobs: int = 400) -> dict[str, Path]:
    """A fleet of 2-GPU nodes; owners of two kinds, each a repeating daily pattern: *steady* ones
    away for hours at a time, *flaky* ones away for a few minutes between bursts of work; a job
    mix of short and long one- and two-GPU jobs."""
    rng = random.Random(seed)
    fleet = folder / "fleet.csv"
    fleet.write_text("sn,gpu,model\n" + "".join(f"n{i},2,{'t4' if i % 3 else 'a10'}\n" for i in range(nodes)))
    duty = folder / "duty.csv"
    lines = ["value,timestamp_anon,container_ip"]
    samples = 86400 // STEP
    for pod in range(8):
        steady = pod % 2 == 0
        t = 0
        values: list[float] = []
        while len(values) < samples:
            away = rng.randint(60, 240) if steady else rng.randint(3, 9)  # minutes
            busy = rng.randint(5, 30) if steady else rng.randint(1, 4)
            values += [0.0] * away + [rng.uniform(30, 90)] * busy
        for i, value in enumerate(values[:samples]):
            t = 1_000_000 + i * STEP
            lines.append(f"{value:.1f},{t},pod{pod}")
    duty.write_text("\n".join(lines) + "\n")
    jobs_csv = folder / "jobs.csv"
    rows = ["name,num_gpu,gpu_milli,gpu_spec,creation_time,scheduled_time,deletion_time"]
    t = 0.0
    for i in range(jobs):
        t += rng.expovariate(1 / 300)
        length = rng.choice((120, 300, 900, 3600, 4 * 3600))
        gpus = rng.choice((1, 1, 1, 2))
        spec = rng.choice(("", "", "T4", "A10|T4"))
        rows.append(f"j{i},{gpus},{rng.choice((1000, 500))},{spec},{t:.0f},{t:.0f},{t + length:.0f}")
    rows.append(f"zero,0,0,,{t:.0f},{t:.0f},{t + 60:.0f}")
    jobs_csv.write_text("\n".join(rows) + "\n")
    return {"fleet": fleet, "duty": duty, "jobs": jobs_csv}


def simulate(paths: dict[str, Path], **config: object) -> dict[str, object]:
    defaults: dict[str, object] = {"horizon_s": 2 * 86400.0, "warmup_s": 6 * 3600.0, "load": 0.6}
    defaults.update(config)
    sim = Simulation(
        nodes=read_fleet(paths["fleet"]),
        jobs=read_jobs(paths["jobs"]),
        duty=read_duty(paths["duty"]),
        config=Config(**defaults),  # type: ignore[arg-type]
    )
    return sim.run().summary()


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_traces(tmp_path_factory.mktemp("traces"))


def test_v2_preempts_less_than_first_fit_where_owners_have_predictable_patterns(traces: dict[str, Path]) -> None:
    first_fit = simulate(traces, policy="first-fit")
    v2 = simulate(traces, policy="v2")
    assert v2["preemptions_per_job"] < first_fit["preemptions_per_job"]
    assert v2["lost_gpu_s"] < first_fit["lost_gpu_s"]
    assert v2["useful_gpu_s"] >= 0.95 * first_fit["useful_gpu_s"]


def write_mixed_owners(folder: Path, *, seed: int = 8) -> dict[str, Path]:
    """Owners who step away for a few minutes many times a day and for hours twice a day, each at
    the same times every day: by the hour alone their stretches look alike (mostly short); read
    from the days before, each is known. Jobs of 2 minutes and of 2 hours."""
    rng = random.Random(seed)
    paths = write_traces(folder, seed=seed, nodes=30, jobs=0)
    lines = ["value,timestamp_anon,container_ip"]
    samples = 86400 // STEP
    for pod in range(8):
        values: list[float] = []
        long_at = sorted(rng.sample(range(2, samples - 400), 2))
        while len(values) < samples:
            if long_at and len(values) >= long_at[0]:
                long_at.pop(0)
                values += [0.0] * rng.randint(180, 300)  # away 3 to 5 hours
            else:
                values += [0.0] * rng.randint(6, 10)  # a few minutes
            values += [rng.uniform(30, 90)] * rng.randint(2, 5)
        lines += [f"{value:.1f},{1_000_000 + i * STEP},pod{pod}" for i, value in enumerate(values[:samples])]
    paths["duty"].write_text("\n".join(lines) + "\n")
    rows = ["name,num_gpu,gpu_milli,gpu_spec,creation_time,scheduled_time,deletion_time"]
    t = 0.0
    for i in range(300):
        t += rng.expovariate(1 / 300)
        length = 120 if i % 8 else 7200
        rows.append(f"j{i},1,1000,,{t:.0f},{t:.0f},{t + length:.0f}")
    paths["jobs"].write_text("\n".join(rows) + "\n")
    return paths


@pytest.mark.parametrize("drift_s", [0.0, 1800.0])
def test_reading_the_owners_days_before_loses_less_work(tmp_path: Path, drift_s: float) -> None:
    """Also when each day of an owner's runs up to half an hour early or late: the absence that
    began nearest the same time a day before is then often one of the short ones."""
    paths = write_mixed_owners(tmp_path)
    # Three days: from the second on, v2 reads the owners' days before.
    with_days = simulate(paths, policy="v2", horizon_s=3 * 86400.0, load=0.4, owner_drift_s=drift_s)
    statistics_alone = simulate(
        paths, policy="v2", horizon_s=3 * 86400.0, load=0.4, analogs=False, owner_drift_s=drift_s
    )
    # (A tenth less lost and an eighth fewer preemptions when written; v2 holds no job back, so
    # a 2-hour job still goes on a GPU due back in minutes when no other is free.)
    assert with_days["lost_gpu_s"] < 0.95 * statistics_alone["lost_gpu_s"]
    assert with_days["preemptions_per_job"] < 0.92 * statistics_alone["preemptions_per_job"]
    assert with_days["useful_gpu_s"] >= statistics_alone["useful_gpu_s"]


def test_owners_drifting_from_day_to_day_keep_their_supply_and_their_seed(traces: dict[str, Path]) -> None:
    steady = simulate(traces, policy="first-fit", horizon_s=3 * 86400.0)
    drifting = simulate(traces, policy="first-fit", horizon_s=3 * 86400.0, owner_drift_s=3600.0)
    assert drifting != steady
    assert drifting["idle_gpu_s"] == pytest.approx(steady["idle_gpu_s"], rel=0.05)
    assert simulate(traces, policy="first-fit", horizon_s=3 * 86400.0, owner_drift_s=3600.0) == drifting


@pytest.mark.parametrize("policy", ["first-fit", "v1", "v2"])
def test_work_is_conserved_and_no_more_is_rented_than_was_idle(traces: dict[str, Path], policy: str) -> None:
    summary = simulate(traces, policy=policy)
    assert summary["leased_gpu_s"] > 0
    assert summary["useful_gpu_s"] + summary["lost_gpu_s"] == pytest.approx(summary["leased_gpu_s"], abs=2)
    assert summary["leased_gpu_s"] <= summary["idle_gpu_s"]
    assert summary["useful_gpu_s"] <= summary["upper_bound_gpu_s"] + 1


def test_the_same_seed_gives_the_same_figures_and_another_seed_others(traces: dict[str, Path]) -> None:
    one = simulate(traces, seed=3, horizon_s=86400.0)
    assert simulate(traces, seed=3, horizon_s=86400.0) == one
    assert simulate(traces, seed=4, horizon_s=86400.0) != one


@pytest.mark.parametrize("policy", ["first-fit", "v2"])
def test_leaving_out_the_finishes_of_leases_an_owner_ends_first_changes_no_figure(
    traces: dict[str, Path], policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A finish left out of a lease that was not preempted after all would leave its job running
    # for ever; the figures must be those of the event loop that queues every finish.
    fast = simulate(traces, policy=policy, load=1.0)
    monkeypatch.setattr(Simulation, "queue_every_finish", True)
    assert simulate(traces, policy=policy, load=1.0) == fast
    assert fast["preemptions_per_job"] > 0.5  # many leases an owner ended first
    assert fast["jobs_completed"] > 100


@pytest.mark.parametrize("drift_s", [0.0, 1800.0])
def test_forecasts_read_ahead_in_a_process_of_their_own_judge_as_forecasts_read_at_the_time(
    tmp_path: Path, drift_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # v2 learns from the owners alone, so the learner runs ahead of the jobs on the other core
    # and hands over what it read of each idle stretch's forecast; the figures must be those of
    # a pool that judges each GPU from its forecast itself when it needs to, as the matcher does.
    paths = write_mixed_owners(tmp_path)
    run = {"policy": "v2", "horizon_s": 3 * 86400.0, "load": 0.6, "owner_drift_s": drift_s}
    forked: list[int] = []
    taking = Readings.__init__

    def noting(self: Readings, *args: Any, **kwargs: Any) -> None:
        taking(self, *args, **kwargs)
        forked.append(self.process.pid if self.process is not None else os.getpid())

    monkeypatch.setattr(Readings, "__init__", noting)
    apart = simulate(paths, **run)
    assert forked and forked[0] != os.getpid()  # the learner ran in a process of its own
    here = simulate(paths, learn_apart=False, **run)
    monkeypatch.setattr(Simulation, "judge_live", True)
    live = simulate(paths, **run)
    assert apart == here == live
    assert apart["preemptions_per_job"] > 0.2 and apart["jobs_completed"] > 100
    assert multiprocessing.active_children() == []  # none left behind


def test_a_learner_that_fails_fails_the_run_with_its_error(
    traces: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Learner, gpu_id: int, gpu: object, now: float) -> None:
        raise ValueError("a forecast that cannot be built")

    monkeypatch.setattr(Learner, "_rentable", broken)
    with pytest.raises(RuntimeError, match=r"(?s)the learning process failed.*a forecast that cannot be built"):
        simulate(traces, policy="v2")
    with pytest.raises(ValueError, match="a forecast that cannot be built"):
        simulate(traces, policy="v2", learn_apart=False)
    assert multiprocessing.active_children() == []


def test_a_learning_process_that_dies_fails_the_run(traces: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def dying(self: Learner, step_s: float = 3600.0) -> Iterator[object]:
        os._exit(3)
        yield  # a generator, as batches() is

    monkeypatch.setattr(Learner, "batches", dying)
    with pytest.raises(RuntimeError, match=r"the learning process ended \(exit code 3\)"):
        simulate(traces, policy="v2")


# A long run that says its learner's process id, for the test below.
_RUN_SAYING_ITS_LEARNER = """
import sys
from pathlib import Path

from marketplace.simulator.engine import Config, Simulation
from marketplace.simulator.owners import Readings
from marketplace.simulator.traces import read_duty, read_fleet, read_jobs

taking = Readings.__init__


def saying(self, *args, **kwargs):
    taking(self, *args, **kwargs)
    print(self.process.pid, flush=True)


Readings.__init__ = saying
folder = Path(sys.argv[1])
Simulation(
    nodes=read_fleet(folder / "fleet.csv"),
    jobs=read_jobs(folder / "jobs.csv"),
    duty=read_duty(folder / "duty.csv"),
    config=Config(horizon_s=400 * 86400.0),
).run()
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has stopped; it waits to be reaped


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_learner_stops_when_its_run_is_killed_outright(tmp_path: Path) -> None:
    # SIGKILL (or the OOM killer) gives the run no chance to stop its learner, which would
    # otherwise learn on for the rest of the horizon and then wait for ever on a full pipe.
    write_mixed_owners(tmp_path)
    repository = Path(__file__).resolve().parents[2]
    run = subprocess.Popen(  # noqa: S603 - this interpreter, our script
        [sys.executable, "-c", _RUN_SAYING_ITS_LEARNER, str(tmp_path)],
        cwd=repository,
        env={**os.environ, "PYTHONPATH": str(repository)},
        stdout=subprocess.PIPE,
    )
    learner = 0
    try:
        assert run.stdout is not None
        learner = int(run.stdout.readline())
        time.sleep(0.5)
        assert _running(learner)
        run.kill()
        run.wait()
        deadline = time.monotonic() + 10.0
        while _running(learner) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(learner)
    finally:
        run.kill()
        run.wait()
        if learner and _running(learner):
            os.kill(learner, signal.SIGKILL)


def test_a_run_leaves_the_garbage_collector_as_it_found_it(traces: dict[str, Path]) -> None:
    # The run switches the cyclic collector off for its own sake; the process it runs in (a
    # worker, a test session) gets it back as it was, even when the run fails.
    assert gc.isenabled()
    simulate(traces, horizon_s=7200.0, warmup_s=0.0)
    assert gc.isenabled()
    gc.disable()
    try:
        simulate(traces, horizon_s=7200.0, warmup_s=0.0)
        assert not gc.isenabled()
    finally:
        gc.enable()
    failing = Simulation(
        nodes=read_fleet(traces["fleet"]),
        jobs=read_jobs(traces["jobs"]),
        duty=read_duty(traces["duty"]),
        config=Config(horizon_s=7200.0, warmup_s=0.0),
    )

    def cycle_fails(now: float) -> None:
        raise RuntimeError("a cycle failed")

    failing._cycle = cycle_fails  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a cycle failed"):
        failing.run()
    assert gc.isenabled()


def test_without_checkpoints_a_preemption_loses_more(traces: dict[str, Path]) -> None:
    saved = simulate(traces, policy="first-fit", checkpoint_interval_s=120)
    none = simulate(traces, policy="first-fit", checkpoint_interval_s=0)
    on_reclaim = simulate(traces, policy="first-fit", checkpoint_on_reclaim_s=10.0)
    assert none["lost_gpu_s"] > saved["lost_gpu_s"] > on_reclaim["lost_gpu_s"] == 0


def test_a_job_is_never_on_two_machines_and_a_gpu_never_in_two_leases(traces: dict[str, Path]) -> None:
    sim = Simulation(
        nodes=read_fleet(traces["fleet"]),
        jobs=read_jobs(traces["jobs"]),
        duty=read_duty(traces["duty"]),
        config=Config(horizon_s=86400.0, warmup_s=0.0, load=1.5, policy="v2"),
    )
    seen: list[tuple[int, tuple[int, ...]]] = []
    original = sim._cycle

    def watched(now: float) -> None:
        original(now)
        leases = {job.id: job.gpus for job in sim.jobs.values() if job.started is not None}
        gpus = [g for ids in leases.values() for g in ids]
        assert len(gpus) == len(set(gpus)), "a GPU in two leases"
        for ids in leases.values():
            assert len({sim.gpus[g].machine for g in ids}) == 1, "a job across machines"
            assert all(sim.gpus[g].rentable for g in ids), "a lease on a GPU its owner uses"
        seen.append((len(leases), ()))

    sim._cycle = watched  # type: ignore[method-assign]
    sim.run()
    assert any(n for n, _ in seen)


def test_jobs_longer_than_the_limit_are_skipped_and_counted(traces: dict[str, Path]) -> None:
    summary = simulate(traces, max_duration_s=1000.0, horizon_s=86400.0)
    assert summary["never_placed"]["over_max_duration"] > 0


def test_the_bound_is_a_max_flow_over_allowed_models() -> None:
    demand = {frozenset({"a"}): 10.0, frozenset({"a", "b"}): 10.0}
    assert max_flow_bound(demand, {"a": 10.0, "b": 5.0}) == pytest.approx(15.0)
    assert max_flow_bound(demand, {"a": 30.0, "b": 0.0}) == pytest.approx(20.0)
    # the flexible demand moves to b so the restricted demand gets a
    assert max_flow_bound({frozenset({"a", "b"}): 10.0, frozenset({"a"}): 10.0}, {"a": 10.0, "b": 10.0}) == 20.0


def test_the_bound_counts_only_the_work_a_job_offers_inside_the_measured_period() -> None:
    metrics = Metrics(warmup_s=1000.0, horizon_s=5000.0)
    t4 = frozenset({"t4"})
    metrics.offered(100.0, 1, 500.0, t4)  # came and went in the warm-up: nothing
    metrics.offered(800.0, 2, 400.0, t4)  # 200 s of it after the warm-up, on 2 GPUs
    metrics.offered(4500.0, 1, 2000.0, t4)  # 500 s of it before the horizon
    metrics.rentable_from(1, "t4", 0.0)
    metrics.rentable_until(1, 5000.0)
    metrics.rentable_from(2, "t4", 0.0)
    metrics.rentable_until(2, 5000.0)
    assert metrics.summary()["upper_bound_gpu_s"] == 2 * 200 + 500


def _starved_after(placed: list[tuple[int, int]], machines: int = 1) -> set[int]:
    """`machines` 2-GPU machines (GPUs 0 and 1 on the first, 2 and 3 on the second) whose owners
    never come back; jobs 0 (1 GPU), 1 (2 GPUs), 2 (1 GPU) in arrival order; at two days, job 1
    still waits, every GPU was free when the cycle began, and `placed` (job, GPU) were this
    cycle's placements, in that order: which jobs count as starved."""
    sim = Simulation(
        nodes=[Node(f"n{n}", "t4", 2) for n in range(machines)],
        jobs=[
            TraceJob(name, at, gpus, frozenset(), 600) for name, at, gpus in (("e", 0, 1), ("w", 10, 2), ("l", 20, 1))
        ],
        duty=[DutySeries("p", 0.0, 60.0, (0.0,) * 1440)],
        config=Config(policy="first-fit", horizon_s=3 * 86400.0, warmup_s=0.0),
    )
    sim.pending = {1: sim.jobs[1]}
    sim.unplaced = {(sim.jobs[1].models, sim.jobs[1].gpu_count): {1: sim.jobs[1]}}
    for gpu in sim.gpus:
        gpu.rentable = True
    placements = []
    for job_id, gpu_id in placed:
        sim.gpus[gpu_id].lease = job_id
        placements.append(Placement(job_id, sim.gpus[gpu_id].machine, (gpu_id,), 500_000, math.nan, math.nan))
    sim._starved(2 * 86400.0, placements)
    return sim.metrics.starved


def test_a_job_is_starved_only_where_gpus_fitting_it_at_its_turn_went_to_later_jobs() -> None:
    # A later job took a GPU while both were free at the waiting job's turn: starved.
    assert _starved_after([(2, 0)]) == {1}
    # An earlier job took one GPU first: one was left at the 2-GPU job's turn, it could not fit,
    # and the later job taking that one starved nobody.
    assert _starved_after([(0, 0), (2, 1)]) == set()
    # Only an earlier job got GPUs: nobody after the waiting job took what fitted it.
    assert _starved_after([(0, 0)]) == set()
    # The earlier job placed first on one machine, the later job on the other, whose two GPUs
    # were both left at the waiting job's turn: starved, whichever machine is looked at first.
    assert _starved_after([(0, 0), (2, 2)], machines=2) == {1}
    assert _starved_after([(2, 2), (0, 0)], machines=2) == {1}


@pytest.mark.parametrize(
    ("which", "text", "message"),
    [
        ("fleet", "sn,model\nn1,T4\n", "no GPU count column"),
        ("fleet", "sn,gpu,model\nn1,two,T4\n", "fleet.csv:2: column 'gpu' is not a number: 'two'"),
        ("fleet", "sn,gpu,model\nn1,2,\n", "column 'model' is empty"),
        ("jobs", "name,num_gpu,creation_time\nj,1,0\n", "no deletion_time column"),
        ("jobs", "name,num_gpu,creation_time,deletion_time\nj,1,50,10\n", "jobs.csv:2: deletion_time 10 is before"),
        ("duty", "value,timestamp_anon,container_ip\n150,0,p\n60,60,p\n", "duty.csv:2: value must be a percentage"),
        ("duty", "value,timestamp_anon\n1,0\n", "no container_ip column"),
        ("duty", "", "empty file"),
    ],
)
def test_a_malformed_trace_is_refused_with_its_file_and_line(
    tmp_path: Path, which: str, text: str, message: str
) -> None:
    path = tmp_path / f"{which}.csv"
    path.write_text(text)
    reader = {"fleet": read_fleet, "jobs": read_jobs, "duty": read_duty}[which]
    with pytest.raises(TraceError, match=message.replace("(", r"\(")):
        reader(path)


def test_any_fleet_csv_with_a_model_and_a_count_will_do(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text("host,gpu_type,num_gpu,rack\nh1,A100,4,r1\nh2,H100,0,r2\n")
    nodes = read_fleet(path)
    assert [(n.name, n.model, n.gpus) for n in nodes] == [("h1", "a100", 4)]


def test_the_command_prints_a_table_and_json_last(traces: dict[str, Path]) -> None:
    out = StringIO()
    call_command(
        "simulate",
        "--jobs", str(traces["jobs"]), "--fleet", str(traces["fleet"]), "--duty", str(traces["duty"]),
        "--horizon", "43200", "--warmup", "3600", "--load", "0.5", "--policy", "v1",
        stdout=out,
    )  # fmt: skip
    lines = out.getvalue().strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["policy"] == "v1"
    for key in ("idle_gpu_s", "useful_share", "useful_vs_bound", "preemptions_per_job", "wait_p95_s", "never_placed"):
        assert key in summary
    assert any(line.startswith("useful_share") for line in lines[:-1])


def test_the_command_names_a_malformed_file(tmp_path: Path, traces: dict[str, Path]) -> None:
    bad = tmp_path / "fleet.csv"
    bad.write_text("sn,gpu,model\nn1,x,T4\n")
    with pytest.raises(CommandError, match=r"fleet\.csv:2"):
        call_command("simulate", "--jobs", str(traces["jobs"]), "--fleet", str(bad), "--duty", str(traces["duty"]))


@pytest.mark.parametrize("drift", ["-1", "43200", "nan"])
def test_the_command_refuses_an_owner_drift_out_of_range(traces: dict[str, Path], drift: str) -> None:
    with pytest.raises(CommandError, match="--owner-drift"):
        call_command(
            "simulate",
            *("--jobs", str(traces["jobs"]), "--fleet", str(traces["fleet"]), "--duty", str(traces["duty"])),
            f"--owner-drift={drift}",
        )


def test_owners_who_never_come_back_rent_out_everything_and_lose_nothing(tmp_path: Path) -> None:
    paths = write_traces(tmp_path, nodes=3, jobs=60)
    paths["duty"].write_text("value,timestamp_anon,container_ip\n" + "".join(f"0,{i * STEP},p\n" for i in range(1440)))
    summary = simulate(paths, horizon_s=43200.0, warmup_s=3600.0, load=0.5, policy="v2")
    assert summary["idle_gpu_s"] == 6 * (43200 - 3600)
    assert summary["lost_gpu_s"] == 0
    assert summary["preemptions"] == 0
