"""Settings: flag > environment > file > defaults; unknown or invalid keys are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpgpu_agent.config import ConfigError, load_config


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    path = _file(tmp_path, "poll_interval_s = 0.5\nidle_grace_s = 30\nusage_interval_s = 20\n")
    config = load_config(
        {"poll_interval_s": "2"},
        environ={"GPGPU_AGENT_POLL_INTERVAL_S": "1.5", "GPGPU_AGENT_IDLE_GRACE_S": "45"},
        config_file=path,
    )
    assert config.poll_interval_s == 2.0  # flag
    assert config.idle_grace_s == 45.0  # environment over file
    assert config.usage_interval_s == 20.0  # file
    assert config.stop_grace_s == 5.0  # default


def test_misspelt_key_in_the_file_names_it_and_suggests_the_right_one(tmp_path: Path) -> None:
    _file(tmp_path, "idle_treshold_pct = 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config({"state_dir": str(tmp_path)}, environ={})
    assert str(caught.value) == "agent.toml: unknown key 'idle_treshold_pct' (did you mean 'idle_threshold_pct'?)"


@pytest.mark.parametrize(
    ("environ", "flags", "words"),
    [
        (
            {"GPGPU_AGENT_STOP_GRACE_S": "30"},
            {},
            "environment variable GPGPU_AGENT_STOP_GRACE_S: invalid value for 'stop_grace_s'",
        ),
        ({"GPGPU_AGENT_CONTAINER_ENGINE": "lxc"}, {}, "'lxc' is not one of auto, podman, docker, none"),
        ({"GPGPU_AGENT_PROCESS_USER": "root"}, {}, "process jobs never run as root"),
        ({}, {"allow_process_jobs": "maybe"}, "'maybe' is not true or false"),
        ({}, {"poll_interval_s": "nan"}, "command line option --poll-interval-s"),
        ({}, {"simulate_gpus": "RTX 4090"}, "is not MODEL:VRAM_MB"),
        ({"GPGPU_AGENT_POL_INTERVAL_S": "1"}, {}, "unknown key 'pol_interval_s'"),
    ],
)
def test_invalid_values_are_refused_naming_key_and_source(
    tmp_path: Path, environ: dict[str, str], flags: dict[str, str], words: str
) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        load_config({"state_dir": str(tmp_path), **flags}, environ=environ)
    assert words in str(caught.value)


def test_named_config_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config({}, environ={}, config_file=tmp_path / "nope.toml")


def test_process_jobs_are_off_unless_the_provider_opts_in(tmp_path: Path) -> None:
    assert load_config({"state_dir": str(tmp_path)}, environ={}).allow_process_jobs is False
    _file(tmp_path, "allow_process_jobs = true\n")
    assert load_config({"state_dir": str(tmp_path)}, environ={}).allow_process_jobs is True


def test_the_old_runner_key_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'runner'"):
        load_config({"state_dir": str(tmp_path)}, environ={"GPGPU_AGENT_RUNNER": "process"})


def test_credential_and_key_live_in_the_state_dir_by_default(tmp_path: Path) -> None:
    config = load_config({"state_dir": str(tmp_path)}, environ={})
    assert config.credential_path == tmp_path / "credential.json"
    assert config.key_path == tmp_path / "signing.key"
    assert config.simulated_gpus() == [("RTX 4090", 24564)]
