"""The command line: bad settings exit 2 with one line, status reads what the daemon left."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpgpu_agent import cli
from gpgpu_agent.credentials import MachineCredential, load_credential, save_credential


def test_unknown_setting_exits_2_with_one_line_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "agent.toml").write_text("idle_treshold_pct = 5\n")
    code = cli.main(["status", "--state-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown key 'idle_treshold_pct' (did you mean 'idle_threshold_pct'?)" in err
    assert "Traceback" not in err


def test_run_without_registering_says_to_register(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--simulate", "--state-dir", str(tmp_path)])
    assert code == 1
    assert "gpgpu-agent register" in capsys.readouterr().err


def test_credential_is_written_private_and_refused_when_public(tmp_path: Path) -> None:
    path = tmp_path / "credential.json"
    save_credential(path, MachineCredential(machine_id=7, credential="gpm_x", marketplace_url="http://m"))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_credential(path).machine_id == 7
    path.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        load_credential(path)


def test_status_shows_machine_leases_spool_and_last_heartbeat(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_credential(
        tmp_path / "credential.json", MachineCredential(machine_id=7, credential="gpm_x", marketplace_url="http://m")
    )
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "lease-12.json").write_text("{}")
    (tmp_path / "runs" / "lease-9.json").write_text("{}")
    (tmp_path / "runs" / "lease-9.exit.json").write_text("{}")  # ended
    (tmp_path / "status.json").write_text(
        json.dumps({"spool_depth": 3, "last_heartbeat": {"ok": False, "at": "T", "error": "connection refused"}})
    )
    assert cli.main(["status", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "machine:        7" in out
    assert "leases running: 12\n" in out
    assert "3 report(s) waiting" in out
    assert "FAILED at T: connection refused" in out


def test_doctor_reports_missing_files_as_failures_in_plain_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["doctor", "--simulate", "--state-dir", str(tmp_path), "--marketplace-url", "http://127.0.0.1:9"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL  credential:" in out and "run `gpgpu-agent register`" in out
    assert "FAIL  marketplace: cannot reach http://127.0.0.1:9" in out
    assert "problem(s) to fix" in out


def test_doctor_says_process_jobs_are_off_until_the_provider_opts_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.main(["doctor", "--simulate", "--state-dir", str(tmp_path), "--marketplace-url", "http://127.0.0.1:9"])

    assert "OK    process jobs: off (allow_process_jobs = false)" in capsys.readouterr().out


def test_doctor_says_how_opted_in_process_jobs_are_sandboxed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sandbox_kit: object, rentals_dir: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cli.main(
        [
            "doctor",
            "--simulate",
            "--allow-process-jobs",
            "--state-dir",
            str(state),
            "--rentals-dir",
            str(rentals_dir),
            "--marketplace-url",
            "http://127.0.0.1:9",
        ]
    )
    out = capsys.readouterr().out

    who = "as gpgpu-rental" if os.geteuid() == 0 else "as the agent's own user (simulation)"
    assert "OK    process jobs: sandboxed by bubblewrap" in out and who in out and "no network" in out
    assert "OK    state directory:" in out


def test_doctor_fails_a_state_directory_others_may_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path.chmod(0o755)
    cli.main(["doctor", "--simulate", "--state-dir", str(tmp_path), "--marketplace-url", "http://127.0.0.1:9"])

    assert f"FAIL  state directory: {tmp_path} has mode 0755" in capsys.readouterr().out
