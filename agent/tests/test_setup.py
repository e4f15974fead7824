"""`gpgpu-agent setup`: each step on this machine's real files, in temporary places."""

from __future__ import annotations

import io
import os
import pwd
from pathlib import Path

import pytest

from gpgpu_agent import setup
from gpgpu_agent.config import load_config
from gpgpu_agent.protocols import AgentError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setup runs as root")


def _config(tmp_path: Path, **extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        {"state_dir": str(tmp_path / "state"), "rentals_dir": str(tmp_path / "rentals"), **extra}, environ={}
    )


def test_directories_are_made_private_and_passable_and_fixed_when_loosened(tmp_path: Path) -> None:
    config = _config(tmp_path)

    assert setup.step_directories(config)[0] == "done"
    os.chmod(tmp_path / "state", 0o755)  # noqa: S103 - someone loosened it
    state, words = setup.step_directories(config)

    assert state == "done" and "mode 700" in words
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "rentals").stat().st_mode & 0o777 == 0o711
    assert setup.step_directories(config)[0] == "ok"  # idempotent


def test_a_rentals_dir_inside_the_state_dir_is_refused(tmp_path: Path) -> None:
    config = load_config(
        {"state_dir": str(tmp_path / "state"), "rentals_dir": str(tmp_path / "state" / "rentals")}, environ={}
    )

    with pytest.raises(AgentError, match="inside the state directory"):
        setup.step_directories(config)


def test_podman_is_set_to_netavark_once_and_a_missing_dns_helper_is_named(tmp_path: Path) -> None:
    helpers, conf_d = tmp_path / "libexec", tmp_path / "containers.conf.d"
    helpers.mkdir()
    (helpers / "netavark").write_text("")
    config = _config(tmp_path, container_engine="podman")

    with pytest.raises(AgentError, match=r"Podman needs aardvark-dns .*apt install netavark aardvark-dns"):
        setup.step_network_backend(config, conf_d=conf_d, helper_dirs=(str(helpers),))
    assert not conf_d.exists()

    (helpers / "aardvark-dns").write_text("")
    assert setup.step_network_backend(config, conf_d=conf_d, helper_dirs=(str(helpers),))[0] == "done"
    assert setup.step_network_backend(config, conf_d=conf_d, helper_dirs=(str(helpers),))[0] == "ok"
    assert (conf_d / "gpgpu-network.conf").read_text() == '[network]\nnetwork_backend = "netavark"\n'
    docker = _config(tmp_path, container_engine="docker")
    assert setup.step_network_backend(docker, conf_d=conf_d, helper_dirs=())[0] == "ok"


def test_subordinate_ids_for_podman_are_added_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536")  # no trailing newline
    monkeypatch.setattr(setup, "SUBID_FILES", (subuid, subgid))
    config = _config(tmp_path, container_engine="podman")

    assert setup.step_subids(config)[0] == "done"
    assert setup.step_subids(config)[0] == "ok"

    assert subuid.read_text() == f"alice:100000:65536\n{setup.SUBID_LINE}\n"
    assert subgid.read_text() == f"{setup.SUBID_LINE}\n"
    assert setup.step_subids(_config(tmp_path, container_engine="docker"))[0] == "ok"


def test_the_rental_user_exists_in_no_group_and_is_not_root(tmp_path: Path) -> None:
    state, words = setup.step_rental_user(_config(tmp_path))

    entry = pwd.getpwnam("gpgpu-rental")
    assert state in ("ok", "done") and str(entry.pw_uid) in words
    assert entry.pw_uid != 0 and entry.pw_shell.endswith("nologin")


def test_a_rental_user_in_roots_group_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pwd.getpwnam("gpgpu-rental")
    in_roots_group = pwd.struct_passwd((real.pw_name, "x", real.pw_uid, 0, "", "/nonexistent", "/usr/sbin/nologin"))
    monkeypatch.setattr(setup.pwd, "getpwnam", lambda name: in_roots_group)

    with pytest.raises(AgentError, match="root or in root's group"):
        setup.step_rental_user(_config(tmp_path))


def test_setup_reports_each_step_and_fails_when_one_does(tmp_path: Path) -> None:
    def broken(_config):  # type: ignore[no-untyped-def]
        raise AgentError("nft is not installed")

    out = io.StringIO()
    code = setup.run_setup(
        _config(tmp_path),
        out=out,
        steps=(("directories", setup.step_directories), ("rentals network", broken)),
    )

    lines = out.getvalue().splitlines()
    assert code == 1
    assert lines[0].startswith("done  directories: state")
    assert lines[1] == "FAIL  rentals network: nft is not installed"
    assert "run `gpgpu-agent setup` again" in lines[2]


UNIT = Path(__file__).resolve().parents[1] / "systemd" / "gpgpu-agent.service"


def _directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith("["):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_systemd_unit_keeps_home_directories_and_engine_groups_away() -> None:
    unit = _directives()

    assert "User" not in unit and "SupplementaryGroups" not in unit  # root, in no docker group
    assert unit["ProtectHome"] == ["yes"]
    assert unit["StateDirectoryMode"] == ["0700"] and unit["UMask"] == ["0077"]
    assert unit["KillMode"] == ["process"] and unit["Delegate"] == ["yes"]
    assert "3" in unit["RestartPreventExitStatus"][0].split()
    assert unit["NoNewPrivileges"] == ["yes"]


def test_the_systemd_unit_is_valid_for_systemd(tmp_path: Path) -> None:
    import shutil
    import subprocess

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "gpgpu-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/gpgpu-agent/bin/gpgpu-agent run", "/bin/true"))

    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)  # noqa: S603

    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""
