"""`gpgpu`'s answers that need no server: bad input is one line on stderr and exit 2."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpgpu_client.cli import follow, job_exit_code, job_logs_print, main, status_line, why_text
from gpgpu_client.models import Job, JobLogs

GPGPU = Path(sys.executable).parent / "gpgpu"


@pytest.fixture(autouse=True)
def _no_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPGPU_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("GPGPU_API_URL", raising=False)
    monkeypatch.delenv("GPGPU_TOKEN", raising=False)


def test_a_bad_search_term_is_one_line_on_stderr_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["search", "model=RTX-4090 vram>>20"])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err == "gpgpu: bad search term 'vram>>20': the value '>20' has an operator in it\n"


def test_a_bad_job_file_is_one_line_on_stderr_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.toml"
    job.write_text('image = "x"\ngpus = 99\nmax_price = "1"\nduration = "1h"\n')

    code = main(["run", str(job)])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err == f"gpgpu: bad job file '{job}': gpus: must be a whole number from 1 to 16\n"


def test_the_installed_script_answers_a_bad_job_file_the_same_way(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("gpus: [1,\n")

    done = subprocess.run(  # noqa: S603 - argv, no shell
        [str(GPGPU), "run", str(job)], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"gpgpu: bad job file '{job}': not valid YAML")


# A command that signs nothing; it fails for want of a login, after loading all it would use.
_LOADS_AFTER_LS = """
import sys
from gpgpu_client.cli import main
code = main(["ls"])
print(code, "eth_account" in sys.modules, "gpgpu_client.wallet" in sys.modules)
"""


def test_a_command_that_signs_nothing_starts_without_the_wallets_eth_account(tmp_path: Path) -> None:
    # eth-account takes about half a second to import, three quarters of such a command's start.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}

    done = subprocess.run(  # noqa: S603 - argv, no shell
        [sys.executable, "-c", _LOADS_AFTER_LS], capture_output=True, text=True, timeout=60, check=False, env=env
    )

    assert done.stdout.split() == ["1", "False", "False"], done.stderr
    assert "gpgpu login --url URL --token TOKEN" in done.stderr


def test_a_command_that_signs_opens_the_key_with_eth_account_before_anything_is_sent(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("0x" + "11" * 32)
    key.chmod(0o600)
    job = tmp_path / "job.toml"
    job.write_text('image = "x"\ngpus = 1\nmax_price = "1"\nduration = "1h"\n')
    program = _LOADS_AFTER_LS.replace('["ls"]', repr(["run", str(job), "--authorize", "--key-file", str(key)]))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}

    done = subprocess.run(  # noqa: S603 - argv, no shell
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False, env=env
    )

    # The key was read (a bad one would exit 2 here); then the missing login stops it.
    assert done.stdout.split() == ["1", "True", "True"], done.stderr
    assert "gpgpu login --url URL --token TOKEN" in done.stderr


def test_a_flag_overrides_the_job_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.toml"
    job.write_text('image = "x"\ngpus = 1\nmax_price = "1"\nduration = "1h"\n')

    code = main(["run", str(job), "--gpus", "0"])

    assert code == 2
    assert "gpus: must be a whole number from 1 to 16" in capsys.readouterr().err


def test_without_a_login_a_command_says_how_to_log_in(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["ls"])

    assert code == 1
    assert "gpgpu login --url URL --token TOKEN" in capsys.readouterr().err


def test_a_usage_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["status", "twelve"])

    assert caught.value.code == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_name_every_command(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", shell]) == 0

    script = capsys.readouterr().out
    for command in ("login", "search", "run", "ls", "status", "cancel", "leases", "why", "balance", "statement"):
        assert command in script


def test_the_bash_completion_script_is_valid_bash(capsys: pytest.CaptureFixture[str]) -> None:
    main(["completion", "bash"])
    script = capsys.readouterr().out

    bash = shutil.which("bash") or "/bin/bash"
    done = subprocess.run(  # noqa: S603 - argv, no shell
        [bash, "-n"], input=script, capture_output=True, text=True, timeout=30, check=False
    )

    assert done.returncode == 0, done.stderr


def _job(**fields: object) -> Job:
    return Job.from_json({"id": 7, "status": "running", **fields})


def test_the_exit_code_follows_the_jobs_end() -> None:
    assert job_exit_code(_job(status="succeeded", exit_code=0)) == 0
    assert job_exit_code(_job(status="failed", exit_code=3)) == 3
    assert job_exit_code(_job(status="failed", exit_code=None)) == 1
    assert job_exit_code(_job(status="cancelled")) == 1


def test_the_status_line_shows_machine_elapsed_and_charge() -> None:
    job = _job(
        current_lease={"id": 1, "job": 7, "status": "running", "machine": 3, "started_at": "2026-01-01T00:00:00Z"},
        budget={"reserved": "2", "charged": "0.0123", "released": "0", "remaining": "1.9877"},
    )

    line = status_line(job, now=job.current_lease.started_at.replace(minute=1, second=20))  # type: ignore[union-attr]

    assert line == "job 7  running  machine 3  1m20s  charged 0.0123"


def test_why_says_the_unplaced_reason_in_words() -> None:
    job = _job(status="pending", unplaced_reason={"code": "no_gpu_matches", "detail": "No GPU has 80 GB."})

    assert why_text(job) == "Job 7 is waiting: No GPU has 80 GB. (no_gpu_matches)"


def test_why_names_the_machines_a_waiting_job_fits_now() -> None:
    offer = {"machine": 3, "region": "eu", "gpus": [{"model": "L4"}], "price_per_gpu_hour": "0.40", "p_finish": 0.92}
    job = _job(status="pending", offers=[offer])

    assert why_text(job) == (
        "Job 7 is waiting; the matcher has not looked at it yet.\n"
        "  it fits machine 3 now (eu, 0.40/GPU-hour, P(finish) 92%)"
    )


@pytest.mark.parametrize("month", ["2026-1", "2026-13", "26-01"])
def test_a_month_not_as_yyyy_mm_is_a_usage_error(month: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["statement", "--month", month])

    assert caught.value.code == 2
    assert "YYYY-MM" in capsys.readouterr().err


class _Logs:
    """A client whose job_logs answers from a script, then is interrupted (Ctrl-C)."""

    def __init__(self, answers: list[dict[str, object]]) -> None:
        self.answers = answers
        self.cursors: list[int] = []

    def job_logs(self, job_id: int, *, cursor: int = 0, limit: int | None = None) -> JobLogs:
        self.cursors.append(cursor)
        if not self.answers:
            raise KeyboardInterrupt
        return JobLogs.from_json(self.answers.pop(0))


def _chunk(n: int, text: str) -> dict[str, object]:
    return {"id": n, "lease": 1, "seq": n - 1, "text": text, "truncated": False, "at": "2026-01-14T12:00:00Z"}


def test_logs_follow_reads_on_from_each_cursor_and_waits_only_when_nothing_came(
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = _Logs(
        [
            {"chunks": [_chunk(1, "a\n"), _chunk(2, "b")], "next_cursor": 2, "finished": False},
            {"chunks": [], "next_cursor": 2, "finished": False},
            {"chunks": [_chunk(3, "c\n")], "next_cursor": 3, "finished": True},
        ]
    )
    waits: list[float] = []

    code = job_logs_print(client, 7, out=sys.stdout, follow=True, interval_s=0.5, sleep=waits.append)  # type: ignore[arg-type]

    assert (code, capsys.readouterr().out) == (0, "a\nbc\n")
    assert client.cursors == [0, 2, 2] and waits == [0.5]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


HOSTILE = "epoch 1\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07\x1b[2J\x1b]0;owned\x07\x9b31m\tok\r\n"


def test_a_jobs_output_cannot_drive_the_renters_terminal_but_reaches_a_file_as_it_came() -> None:
    """The output comes from the provider's machine: written raw to a terminal it set the
    renter's clipboard (OSC 52), cleared the screen, retitled the window."""
    terminal, file = _Terminal(), io.StringIO()
    for out in (terminal, file):
        job_logs_print(
            _Logs([{"chunks": [_chunk(1, HOSTILE)], "next_cursor": 1, "finished": True}]),  # type: ignore[arg-type]
            7,
            out=out,
        )

    shown = terminal.getvalue()
    assert not any(c in shown for c in "\x1b\x07\x9b")
    assert shown == "epoch 1\\x1b]52;c;Y3VybCBldmlsIHwgc2g=\\x07\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\tok\r\n"
    assert file.getvalue() == HOSTILE


def test_a_jobs_failure_reason_from_its_machine_cannot_drive_the_terminal() -> None:
    job = _job(status="failed", exit_code=3, failure_reason="oom\x1b]52;c;ZXZpbA==\x07")

    assert why_text(job) == "Job 7 has ended: failed (exit code 3; oom\\x1b]52;c;ZXZpbA==\\x07)."


def test_logs_without_follow_stops_when_nothing_more_came(capsys: pytest.CaptureFixture[str]) -> None:
    client = _Logs(
        [
            {"chunks": [_chunk(1, "a\n")], "next_cursor": 1, "finished": False},
            {"chunks": [], "next_cursor": 1, "finished": False},
        ]
    )

    assert job_logs_print(client, 7, out=sys.stdout, as_json=True) == 0  # type: ignore[arg-type]

    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["a\n"]


def test_logs_follow_interrupted_with_ctrl_c_exits_130_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = _Logs([{"chunks": [_chunk(1, "a\n")], "next_cursor": 1, "finished": False}])
    monkeypatch.setattr("gpgpu_client.cli._client", lambda session: client)

    code = main(["logs", "7", "--follow", "--poll-interval", "0"])

    out, err = capsys.readouterr()
    assert (code, out) == (130, "a\n")
    assert err.strip().startswith("gpgpu: interrupted") and len(err.strip().splitlines()) == 1


class _Jobs:
    """A client whose job() answers from a script (and has no output to show)."""

    def __init__(self, answers: list[Job]) -> None:
        self.answers = answers

    def job(self, job_id: int) -> Job:
        return self.answers.pop(0)


def test_follow_writes_a_status_line_when_the_words_change_not_each_time_the_matcher_looked() -> None:
    def waiting(checked_at: str, detail: str = "no online machine accepts process jobs") -> Job:
        reason = {"code": "no_machine", "detail": detail, "checked_at": checked_at}
        return _job(status="pending", unplaced_reason=reason)

    client = _Jobs(
        [
            waiting("2026-01-14T12:00:00Z"),
            waiting("2026-01-14T12:00:02Z"),
            waiting("2026-01-14T12:00:04Z"),
            waiting("2026-01-14T12:00:06Z", detail="no GPU is idle"),
            _job(status="succeeded", exit_code=0),
        ]
    )
    status = io.StringIO()

    job = follow(client, 7, status_out=status, sleep=lambda _: None)  # type: ignore[arg-type]

    assert job.status == "succeeded"
    assert status.getvalue().splitlines() == [
        "job 7  pending  waiting: no online machine accepts process jobs",
        "job 7  pending  waiting: no GPU is idle",
        "job 7  succeeded",
    ]
