"""Job files (TOML, YAML) checked against what POST /api/v1/jobs/ takes, before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpgpu_client.jobfile import JobFileError, job_file_read, job_spec

TOML_JOB = """
name = "train"
image = "pytorch/pytorch:2.4"
command = "python train.py --epochs 3"
env = { SEED = "7" }
gpus = 2
vram = 20
models = ["RTX-4090", "RTX-3090"]
region = "eu"
max_price = 0.5
duration = "2h"
max_duration = "3h"
checkpoint_interval = "10m"
"""

YAML_JOB = """
kind: process
command: [python3, -c, "print('hi')"]
gpus: 1
max_price: "0.25"
duration: 600
interruptible: false
"""


def test_a_toml_job_file_becomes_the_submit_body(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(TOML_JOB)

    body = job_spec(job_file_read(path))

    assert body == {
        "name": "train",
        "kind": "container",
        "image": "pytorch/pytorch:2.4",
        "command": ["python", "train.py", "--epochs", "3"],
        "env": {"SEED": "7"},
        "gpu_count": 2,
        "min_vram_mb": 20480,
        "allowed_models": ["RTX-4090", "RTX-3090"],
        "region": "eu",
        "max_price_per_gpu_hour": "0.5",
        "expected_duration_s": 7200,
        "max_duration_s": 10800,
        "interruptible": True,
        "checkpoint_interval_s": 600,
    }


def test_a_yaml_job_file_becomes_the_submit_body(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(YAML_JOB)

    body = job_spec(job_file_read(path))

    assert body["kind"] == "process"
    assert body["command"] == ["python3", "-c", "print('hi')"]
    assert body["max_price_per_gpu_hour"] == "0.25"
    assert body["expected_duration_s"] == 600
    assert body["interruptible"] is False
    assert "max_duration_s" not in body


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"gpus": None}, "gpus: required"),
        ({"gpus": 17}, "gpus: must be a whole number from 1 to 16"),
        ({"gpus": "two"}, "gpus:"),
        ({"max_price": 0}, "max_price: must be above 0"),
        ({"max_price": "0.1234567"}, "max_price: at most 6 decimal places"),
        ({"duration": "forever"}, "duration: 'forever' is not a duration"),
        ({"duration": "31d"}, "duration: must be between 1 second and 30 days"),
        ({"max_duration": "1m"}, "max_duration: must be at least duration"),
        ({"checkpoint_interval": "10s"}, "checkpoint_interval: must be between 60"),
        ({"checkpoint_dir": "/work/../etc"}, "checkpoint_dir: must be a directory under /work"),
        ({"checkpoint_dir": "/etc/cron.d"}, "checkpoint_dir: must be a directory under /work"),
        ({"checkpoint_dir": "/work"}, "checkpoint_dir: must be a directory under /work"),
        ({"env": {"1BAD": "x"}}, "env: '1BAD' is not a valid variable name"),
        ({"kind": "vm"}, "kind: must be one of container, process"),
        ({"image": None}, "image: a container job needs an image"),
        ({"gpu_count": 1}, "gpu_count: unknown key"),
    ],
)
def test_a_value_the_api_would_refuse_is_named(change: dict[str, object], says: str) -> None:
    values: dict[str, object] = {"image": "x", "gpus": 1, "max_price": "0.5", "duration": "1h"}
    values.update(change)
    values = {k: v for k, v in values.items() if v is not None}

    with pytest.raises(JobFileError) as caught:
        job_spec(values)

    assert says in str(caught.value)


def test_the_kind_follows_from_an_image_or_a_command_alone_unless_said() -> None:
    base = {"gpus": 1, "max_price": "1", "duration": 60}
    assert job_spec({**base, "command": "python3 run.py"})["kind"] == "process"
    assert job_spec({**base, "image": "python:3.11", "command": "python3 run.py"})["kind"] == "container"
    with pytest.raises(JobFileError, match="image: a container job needs an image"):
        job_spec({**base, "kind": "container", "command": "python3 run.py"})
    with pytest.raises(JobFileError, match="image: a container job needs an image"):
        job_spec(base)


def test_a_process_job_needs_a_command() -> None:
    with pytest.raises(JobFileError, match="command: a process job needs a command"):
        job_spec({"kind": "process", "gpus": 1, "max_price": "1", "duration": 60})


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("job.toml", "gpus = [", "not valid TOML"),
        ("job.yaml", "gpus: [1,", "not valid YAML"),
        ("job.yaml", "- a list", "must hold a table"),
        ("job.json", "{}", "ends in .toml, .yaml or .yml"),
    ],
)
def test_a_file_that_cannot_be_read_says_why_on_one_line(tmp_path: Path, name: str, text: str, says: str) -> None:
    path = tmp_path / name
    path.write_text(text)

    with pytest.raises(JobFileError) as caught:
        job_file_read(path)

    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_file_is_a_job_file_error(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match="cannot read it"):
        job_file_read(tmp_path / "absent.toml")


def test_a_checkpoint_dir_is_sent_only_when_given() -> None:
    values: dict[str, object] = {"image": "x", "gpus": 1, "max_price": "0.5", "duration": "1h"}
    assert "checkpoint_dir" not in job_spec(values)
    assert job_spec({**values, "checkpoint_dir": "/work/ckpt"})["checkpoint_dir"] == "/work/ckpt"
