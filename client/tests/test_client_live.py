"""`gpgpu` against a live marketplace (pytest-django's live_server) and a real agent in
simulation mode (the fake NVIDIA driver, real processes in the process sandbox): a renter logs
in, runs a job from a TOML file with `--follow` until it succeeds, and reads it back as JSON.

The CLI runs in-process (gpgpu_client.cli.main) in a thread, while this thread does what the
marketplace's workers would: it marks each new job's budget reserved (the billing gate: the chain
half is billing's tests' business) and runs match cycles. On SQLite the live server shares one
connection with this thread, so every HTTP call (the CLI's and the agent's) and this thread's
work take turns (a lock), as the end-to-end tests do (tests/agent_market.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.db import connection

from gpgpu_agent import cli as agent_cli
from gpgpu_client.cli import main
from jobs.models import Job
from marketplace.matching import match_cycle
from tests.agent_market import SANDBOX_PYTHON, simulated_agent
from tests.factories import ProviderFactory, RenterFactory, budget_reserved, token_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]

DEADLINE_S = 60.0
# What the renter deposited (micro): enough for the job's budget, reserved at submission.
FUNDS_MICRO = 50 * 10**6


class TurnSession(requests.Session):
    """The CLI's session, its calls taking turns with the test thread."""

    def __init__(self, turn: Any) -> None:
        super().__init__()
        self.turn = turn

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        with self.turn:
            return super().request(*args, **kwargs)


class Rig:
    """One simulated machine with one RTX 4090, registered and running its agent."""

    def __init__(self, url: str, tmp_path: Path, turn: Any) -> None:
        self.state_dir = tmp_path / "agent"
        self.rentals_dir = Path(tempfile.mkdtemp(prefix="gpgpu-client-rentals-", dir="/tmp"))
        os.chmod(self.rentals_dir, 0o711)  # noqa: S103 - pass-through only
        provider_token = token_for(ProviderFactory().user)
        code = agent_cli.main(
            [
                *("register", "--url", url, "--provider-token", provider_token),
                *("--state-dir", str(self.state_dir), "--hostname", "client-rig"),
            ]
        )
        assert code == 0
        try:
            self.agent, _ = simulated_agent(state_dir=self.state_dir, rentals_dir=self.rentals_dir, url=url, turn=turn)
        except BaseException:  # skipped (no sandbox here) or failed: nothing of it is left
            shutil.rmtree(self.rentals_dir, ignore_errors=True)
            raise
        self.thread = threading.Thread(target=self.agent.run, name="agent", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.agent.request_stop()
        self.thread.join(30)
        shutil.rmtree(self.rentals_dir, ignore_errors=True)


@pytest.fixture
def live(live_server: Any, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    settings.GPGPU = {**settings.GPGPU, "HEARTBEAT_INTERVAL_S": 1}
    monkeypatch.setenv("GPGPU_CONFIG_DIR", str(tmp_path / "gpgpu-config"))
    monkeypatch.delenv("GPGPU_API_URL", raising=False)
    monkeypatch.delenv("GPGPU_TOKEN", raising=False)
    turn: Any = threading.Lock() if connection.vendor == "sqlite" else contextlib.nullcontext()
    renter = RenterFactory(funds=FUNDS_MICRO)
    rig = Rig(live_server.url, tmp_path, turn)
    session = TurnSession(turn)
    try:
        yield {
            "url": live_server.url,
            "token": token_for(renter.user),
            "renter": renter,
            "turn": turn,
            "session": session,
        }
    finally:
        rig.stop()
        session.close()


def _run_in_thread(argv: list[str], session: requests.Session) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(argv, session=session)), name="gpgpu", daemon=True)
    thread.start()
    return thread, codes


def _work_the_market(live: dict[str, Any], until: threading.Thread) -> None:
    """Until `until` ends: reserve each new job's budget (the billing gate) and run match cycles."""
    reserved: set[int] = set()
    deadline = time.monotonic() + DEADLINE_S
    while until.is_alive():
        if time.monotonic() > deadline:
            pytest.fail(f"`gpgpu run --follow` did not end within {DEADLINE_S} s")
        with live["turn"]:
            for job in Job.objects.filter(renter=live["renter"]).exclude(pk__in=reserved):
                budget_reserved(job)
                reserved.add(job.pk)
            match_cycle()
        time.sleep(0.2)
    until.join()


def _json(argv: list[str], live: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> Any:
    code = main([*argv, "--json"], session=live["session"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_a_renter_runs_a_job_from_a_toml_file_and_follows_it_to_success(
    live: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a renter who logs in with the CLI
    assert main(["login", "--url", live["url"], "--token", live["token"]], session=live["session"]) == 0
    assert "Logged in to" in capsys.readouterr().out
    assert (tmp_path / "gpgpu-config" / "config.toml").stat().st_mode & 0o777 == 0o600
    job_file = tmp_path / "job.toml"
    job_file.write_text(
        'name = "hello"\n'
        'kind = "process"\n'
        # It runs long enough (1.5 s) for the status line, polled every 0.2 s, to see it running.
        f'command = [{json.dumps(SANDBOX_PYTHON)}, "-c", "import time; print(\'hello\'); time.sleep(1.5)"]\n'
        "gpus = 1\n"
        'models = ["NVIDIA GeForce RTX 4090"]\n'
        'max_price = "2.00"\n'
        "duration = 60\n"
        'max_duration = "10m"\n'
    )

    # When the job is run from its file, followed until it ends
    thread, codes = _run_in_thread(["run", str(job_file), "--follow", "--poll-interval", "0.2"], live["session"])
    _work_the_market(live, thread)

    # Then it succeeded on the simulated machine and the CLI exits 0
    out, err = capsys.readouterr()
    assert codes == [0], err
    job_id = int(out.splitlines()[0].removeprefix("Submitted job "))
    assert out.splitlines()[-1].startswith(f"Job {job_id} succeeded")
    assert "hello" in out.splitlines()[1:-1]  # its output, between the id and the end
    assert "running  machine" in err  # the live status line saw it run
    with live["turn"]:
        assert Job.objects.get(pk=job_id).status == Job.Status.SUCCEEDED

    # And every read command answers in JSON
    assert [j["id"] for j in _json(["ls"], live, capsys)] == [job_id]
    status = _json(["status", str(job_id)], live, capsys)
    assert status["status"] == "succeeded" and status["exit_code"] == 0
    leases = _json(["leases", str(job_id)], live, capsys)
    assert [lease["end_reason"] for lease in leases] == ["succeeded"]
    why = _json(["why", str(job_id)], live, capsys)
    assert why["unplaced_reason"] is None and "ended: succeeded" in why["text"]
    balance = _json(["balance"], live, capsys)
    assert balance["deposited"]["micro"] == FUNDS_MICRO
    assert "month" in _json(["statement"], live, capsys)
    offers = _json(["search", 'model="NVIDIA GeForce RTX 4090" vram>=20 available'], live, capsys)
    assert [o["model"] for o in offers] == ["NVIDIA GeForce RTX 4090"]

    # And in tables for a person
    assert main(["leases", str(job_id)], session=live["session"]) == 0
    assert "1× NVIDIA GeForce RTX 4090" in capsys.readouterr().out
    assert main(["balance"], session=live["session"]) == 0
    assert "deposited   50" in capsys.readouterr().out
    assert main(["search", "vram>=20"], session=live["session"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:3] == ["MODEL", "VRAM", "PRICE/H"]
    assert "NVIDIA GeForce RTX 4090  24 GB" in rows[1]


def test_follow_exits_with_the_exit_code_of_a_job_that_failed(
    live: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["login", "--url", live["url"], "--token", live["token"]], session=live["session"]) == 0
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "kind: process\n"
        f"command: [{json.dumps(SANDBOX_PYTHON)}, -c, 'import sys; sys.exit(3)']\n"
        "gpus: 1\nmax_price: '2.00'\nduration: 60\n"
    )

    thread, codes = _run_in_thread(["run", str(job_file), "--follow", "--poll-interval", "0.2"], live["session"])
    _work_the_market(live, thread)

    out, err = capsys.readouterr()
    assert codes == [3], err
    assert " failed (exit code 3" in out.splitlines()[-1]


def test_why_says_what_keeps_a_job_waiting_and_cancel_ends_it(
    live: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a job, submitted with flags alone, for a model no machine on the market has
    assert main(["login", "--url", live["url"], "--token", live["token"]], session=live["session"]) == 0
    capsys.readouterr()
    argv = ["run", "--kind", "process", "--command", "true", "--gpus", "1", "--model", "NVIDIA H100"]
    assert main([*argv, "--max-price", "1", "--duration", "5m"], session=live["session"]) == 0
    job_id = int(capsys.readouterr().out)
    with live["turn"]:
        budget_reserved(Job.objects.get(pk=job_id))
        match_cycle()

    # When the renter asks why it waits
    assert main(["why", str(job_id)], session=live["session"]) == 0
    why = capsys.readouterr().out

    # Then the matcher's reason is there, in words and with its code
    with live["turn"]:
        job = Job.objects.get(pk=job_id)
    assert job.unplaced_code
    assert why == f"Job {job_id} is waiting: {job.unplaced_detail} ({job.unplaced_code})\n"
    assert main(["ls"], session=live["session"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:3] == ["ID", "NAME", "STATUS"]
    assert listing[1].split()[:3] == [str(job_id), "-", "pending"]

    # And cancelling it ends it; a second cancel is harmless
    assert main(["cancel", str(job_id)], session=live["session"]) == 0
    assert capsys.readouterr().out == f"Job {job_id} cancelled\n"
    assert main(["cancel", str(job_id)], session=live["session"]) == 0
    assert main(["status", str(job_id)], session=live["session"]) == 0
    assert "status       cancelled" in capsys.readouterr().out


def test_a_job_the_server_refuses_is_one_line_and_exit_1(
    live: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["login", "--url", live["url"], "--token", live["token"]], session=live["session"]) == 0
    capsys.readouterr()

    code = main(["status", "999999"], session=live["session"])

    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("gpgpu: ") and err.endswith(" (not_found)\n")
    assert len(err.splitlines()) == 1


def test_a_renter_follows_a_running_jobs_output_then_reads_it_back(
    live: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a job that writes a line every 0.3 s for 3 s
    assert main(["login", "--url", live["url"], "--token", live["token"]], session=live["session"]) == 0
    script = "import time\nfor n in range(10):\n    print(f'step {n}', flush=True); time.sleep(0.3)\n"
    argv = ["run", "--kind", "process", "--command", shlex.join([SANDBOX_PYTHON, "-c", script])]
    capsys.readouterr()
    assert main([*argv, "--gpus", "1", "--max-price", "2", "--duration", "60"], session=live["session"]) == 0
    job_id = int(capsys.readouterr().out)
    expected = "".join(f"step {n}\n" for n in range(10))

    # When the renter follows its output, from before it is placed until it ends
    thread, codes = _run_in_thread(["logs", str(job_id), "--follow", "--poll-interval", "0.2"], live["session"])
    _work_the_market(live, thread)

    # Then every line came, once, in order, and the command ended with the job
    out, err = capsys.readouterr()
    assert codes == [0], err
    assert out == expected
    with live["turn"]:
        job = Job.objects.get(pk=job_id)
        chunks = list(job.log_chunks.order_by("pk"))
    assert job.status == Job.Status.SUCCEEDED
    # ... shipped while it ran, not all at its end
    assert len(chunks) > 1 and job.finished_at is not None and chunks[0].received_at < job.finished_at

    # And it reads back whole, as text and as JSON lines
    assert main(["logs", str(job_id)], session=live["session"]) == 0
    assert capsys.readouterr().out == expected
    assert main(["logs", str(job_id), "--json"], session=live["session"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "".join(line["text"] for line in lines) == expected
    assert [line["seq"] for line in lines] == list(range(len(lines)))
    assert {line["lease"] for line in lines} == {chunks[0].lease_id}


def test_following_the_output_of_someone_elses_job_is_not_found(
    live: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    stranger = token_for(RenterFactory().user)
    assert main(["login", "--url", live["url"], "--token", stranger], session=live["session"]) == 0
    with live["turn"]:
        job = Job.objects.create(
            renter=live["renter"],
            kind="process",
            command=["true"],
            gpu_count=1,
            max_price_per_gpu_hour="1",
            expected_duration_s=60,
            max_duration_s=60,
        )
    capsys.readouterr()

    code = main(["logs", str(job.pk), "--follow"], session=live["session"])

    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err.endswith("(not_found)\n")
