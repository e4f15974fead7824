"""The Docker runner.

CI has no container engine, so these tests check the runner at the Docker client's boundary:
`agent/tests/fake_docker`, a small Python script put first on PATH as `docker`, records every
argv it is given and answers `run`, `inspect`, `top`, `logs`, `stop`, `ps` and `rm` from a JSON
state file that each test edits to play a scenario (a container exits, the image does not exist,
the daemon is down). The tests assert the safety-relevant arguments of `docker run` exactly: only
the leased GPU uuids, no --privileged, no host namespaces or mounts, the limits and the labels.

test_real_docker_* run the same runner against a real Docker daemon and only where one answers
(`docker info`), a GPU is visible, and the test image is present; otherwise they are skipped and
say why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from gpgpu_agent.protocols import RunnerError
from gpgpu_agent.runners import DockerRunner, UnknownLeaseError
from gpgpu_agent.types import LeaseSpec

FAKE_DOCKER = Path(__file__).with_name("fake_docker")
GPUS = {"GPU-aaa": 0, "GPU-bbb": 1, "GPU-ccc": 2}
IMAGE = "ghcr.io/acme/train:1.2"


class FakeDocker:
    def __init__(self, tmp_path: Path):
        self.state_path = tmp_path / "docker-state.json"
        self.log_path = tmp_path / "docker-calls.log"
        self.state_path.write_text("{}")

    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def edit(self, change) -> None:
        state = self.state()
        change(state)
        self.state_path.write_text(json.dumps(state))

    def container(self, lease_id: int) -> dict:
        return self.state()["containers"][f"gpgpu-lease-{lease_id}"]

    def set_container(self, lease_id: int, **fields) -> None:
        self.edit(lambda s: s["containers"][f"gpgpu-lease-{lease_id}"].update(fields))

    def calls(self, command: str | None = None) -> list[list[str]]:
        if not self.log_path.exists():
            return []
        calls = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        return [c for c in calls if command is None or c[0] == command]


@pytest.fixture
def docker(tmp_path, monkeypatch) -> FakeDocker:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").symlink_to(FAKE_DOCKER)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    fake = FakeDocker(tmp_path)
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(fake.state_path))
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(fake.log_path))
    return fake


@pytest.fixture
def runner(docker) -> DockerRunner:
    return DockerRunner(cpu_limit=2, memory_limit="4g", pids_limit=512)


def lease(lease_id: int, **changes) -> LeaseSpec:
    fields = {
        "lease_id": lease_id,
        "job_id": lease_id + 100,
        "kind": "container",
        "image": IMAGE,
        "command": ("python", "train.py", "--epochs", "3"),
        "env": {"MODEL": "tiny"},
        "gpu_uuids": ("GPU-ccc", "GPU-aaa"),
        "max_duration_s": 3600,
        "price_per_gpu_hour": "0.400000",
    }
    fields.update(changes)
    return LeaseSpec(**fields)


def option_values(argv: list[str], option: str) -> list[str]:
    """The values given to ``option`` before the image (argv after the "run" subcommand)."""
    return [argv[i + 1] for i, arg in enumerate(argv[: argv.index(IMAGE)]) if arg == option]


# --- docker run -------------------------------------------------------------------------------


def test_container_gets_only_the_leased_gpus_limits_and_no_privileges(runner, docker):
    spec = lease(21, env={"MODEL": "tiny", "NVIDIA_VISIBLE_DEVICES": "all", "GPGPU_LEASE_ID": "1"})

    state = runner.start(spec, gpu_indexes=GPUS)

    (argv,) = docker.calls("run")
    assert option_values(argv, "--gpus") == ['"device=GPU-ccc,GPU-aaa"']
    assert option_values(argv, "--cpus") == ["2"]
    assert option_values(argv, "--memory") == ["4g"]
    assert option_values(argv, "--memory-swap") == ["4g"]  # no swap beyond the memory limit
    assert option_values(argv, "--pids-limit") == ["512"]
    assert option_values(argv, "--cap-drop") == ["ALL"]
    assert option_values(argv, "--security-opt") == ["no-new-privileges"]
    assert option_values(argv, "--name") == ["gpgpu-lease-21"]
    assert option_values(argv, "--label") == ["gpgpu.lease_id=21", "gpgpu.job_id=121"]
    assert sorted(option_values(argv, "--env")) == [
        "GPGPU_JOB_ID=121",
        "GPGPU_LEASE_ID=21",
        "MODEL=tiny",
        "NVIDIA_VISIBLE_DEVICES=GPU-ccc,GPU-aaa",  # the job's "all" cannot widen the GPUs
    ]
    options = argv[: argv.index(IMAGE)]
    for forbidden in (
        "--privileged",
        "--cap-add",
        "--device",
        "-v",
        "--volume",
        "--mount",
        "--network",
        "--net",
        "--pid",
        "--ipc",
        "--userns",
        "--uts",
        "--cgroupns",
    ):
        assert not any(arg == forbidden or arg.startswith(forbidden + "=") for arg in options), forbidden
    assert argv[argv.index(IMAGE) :] == [IMAGE, "python", "train.py", "--epochs", "3"]
    # The container Docker made matches: the command's own options were not read as docker's.
    made = docker.container(21)
    assert made["command"] == ["python", "train.py", "--epochs", "3"]
    assert made["labels"] == {"gpgpu.lease_id": "21", "gpgpu.job_id": "121"}
    assert state.running and state.exit_code is None


def test_start_is_idempotent_by_lease(runner, docker):
    first = runner.start(lease(22), gpu_indexes=GPUS)
    second = runner.start(lease(22), gpu_indexes=GPUS)
    after_restart = DockerRunner(cpu_limit=1, memory_limit="1g").start(lease(22), gpu_indexes=GPUS)

    assert len(docker.calls("run")) == 1
    assert first.pids == second.pids == after_restart.pids


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image": "--privileged"}, "not a Docker image reference"),
        ({"image": ""}, "not a Docker image reference"),
        ({"gpu_uuids": ("GPU-aaa,GPU-bbb",)}, "not a GPU uuid"),
        ({"gpu_uuids": ('GPU-aaa"',)}, "not a GPU uuid"),
        ({"gpu_uuids": ("GPU-zzz",)}, "GPU GPU-zzz is not on this machine"),
        ({"gpu_uuids": ()}, "names no GPU"),
        ({"env": {"NVIDIA_MIG_CONFIG_DEVICES": "all"}}, "may not set NVIDIA_MIG_CONFIG_DEVICES"),
        ({"env": {"A B": "x"}}, "not a valid environment variable name"),
        ({"kind": "process"}, "runs container jobs only"),
    ],
)
def test_unsafe_or_impossible_leases_are_refused_before_docker_is_called(runner, docker, changes, message):
    with pytest.raises(RunnerError, match=message):
        runner.start(lease(23, **changes), gpu_indexes=GPUS)

    assert docker.calls() == []


def test_an_image_that_cannot_be_pulled_fails_to_start_with_dockers_message(runner, docker):
    docker.edit(lambda s: s.update(missing_images=["ghcr.io/acme/nope:1"]))

    with pytest.raises(
        RunnerError, match=r"could not start the container: .*pull access denied for ghcr\.io/acme/nope"
    ):
        runner.start(lease(24, image="ghcr.io/acme/nope:1"), gpu_indexes=GPUS)

    with pytest.raises(UnknownLeaseError):
        runner.poll(24)


def test_a_machine_without_the_nvidia_toolkit_is_explained_and_keeps_no_container(runner, docker):
    docker.edit(lambda s: s.update(no_gpu_runtime=True))

    with pytest.raises(RunnerError, match="install the NVIDIA Container Toolkit"):
        runner.start(lease(25), gpu_indexes=GPUS)

    assert docker.state()["containers"] == {}  # the created-but-not-started container was removed


def test_docker_not_installed_is_a_clear_sentence(tmp_path):
    runner = DockerRunner(docker_bin=str(tmp_path / "no-docker-here"), cpu_limit=1, memory_limit="1g")

    with pytest.raises(RunnerError, match="Docker is not installed here"):
        runner.start(lease(26), gpu_indexes=GPUS)
    with pytest.raises(RunnerError, match="Docker is not installed here"):
        runner.adopt()


def test_a_stopped_docker_daemon_is_a_clear_sentence(runner, docker):
    runner.start(lease(27), gpu_indexes=GPUS)
    docker.edit(lambda s: s.update(daemon_down=True))

    for call in (lambda: runner.start(lease(28), gpu_indexes=GPUS), lambda: runner.poll(27), runner.adopt):
        with pytest.raises(RunnerError, match="the Docker daemon is not running"):
            call()


def test_a_docker_call_that_hangs_is_cut_off(docker):
    runner = DockerRunner(cpu_limit=1, memory_limit="1g", call_timeout_s=0.5)
    docker.edit(lambda s: s.update(hang=["inspect"]))

    began = time.monotonic()
    with pytest.raises(RunnerError, match=r"did not answer within 0\.5 s"):
        runner.poll(29)
    assert time.monotonic() - began < 5


# --- poll, stop, forget -----------------------------------------------------------------------


def test_a_running_container_reports_its_host_pids_and_an_ended_one_its_exit_code_and_logs(runner, docker):
    runner.start(lease(30), gpu_indexes=GPUS)
    docker.set_container(30, pid=4242, pids=[4242, 4243, 4250], logs="epoch 1\nloss nan\n")

    running = runner.poll(30)
    docker.set_container(30, status="exited", exit_code=3)
    ended = runner.poll(30)

    assert running.running and running.pids == (4242, 4243, 4250)
    assert running.started_at is not None and running.started_at.year == 2026
    assert not ended.running and ended.exit_code == 3 and ended.pids == ()
    assert ended.log_tail == "epoch 1\nloss nan\n"


def test_a_container_killed_for_memory_reports_137(runner, docker):
    runner.start(lease(31), gpu_indexes=GPUS)
    docker.set_container(31, status="exited", exit_code=0, oom_killed=True)

    assert runner.poll(31).exit_code == 137


def test_stop_gives_docker_the_grace_period_and_returns_the_final_state(runner, docker):
    runner.start(lease(32), gpu_indexes=GPUS)

    state = runner.stop(32, grace_s=2.5)
    again = runner.stop(32, grace_s=2.5)

    assert docker.calls("stop") == [["stop", "-t", "3", "gpgpu-lease-32"]]  # once: the second found it ended
    assert not state.running and state.exit_code == 143
    assert again.exit_code == 143


def test_stopping_or_polling_an_unknown_lease_says_so(runner, docker):
    with pytest.raises(UnknownLeaseError):
        runner.stop(33, grace_s=1)
    with pytest.raises(UnknownLeaseError):
        runner.poll(33)


def test_forget_removes_an_ended_container_and_refuses_a_running_one(runner, docker):
    runner.start(lease(34), gpu_indexes=GPUS)

    with pytest.raises(RunnerError, match="still running"):
        runner.forget(34)
    runner.stop(34, grace_s=1)
    runner.forget(34)
    runner.forget(34)  # forgetting twice is harmless

    assert docker.state()["containers"] == {}
    with pytest.raises(UnknownLeaseError):
        runner.poll(34)


# --- agent restarts ---------------------------------------------------------------------------


def test_a_restarted_agent_adopts_lease_containers_by_label_without_touching_them(runner, docker):
    runner.start(lease(35), gpu_indexes=GPUS)
    runner.start(lease(36), gpu_indexes=GPUS)
    docker.set_container(36, status="exited", exit_code=0)
    docker.edit(
        lambda s: s["containers"].update(
            {"someone-else": {**s["containers"]["gpgpu-lease-35"], "labels": {"gpgpu.lease_id": "99"}}}
        )
    )
    calls_before = len(docker.calls())

    adopted = DockerRunner(cpu_limit=1, memory_limit="1g").adopt()

    assert [(s.lease_id, s.running, s.exit_code) for s in adopted] == [(35, True, None), (36, False, 0)]
    made_since = {call[0] for call in docker.calls()[calls_before:]}
    assert made_since <= {"ps", "inspect", "top", "logs"}  # nothing stopped, removed or started


# --- a real Docker daemon ---------------------------------------------------------------------

REAL_IMAGE = os.environ.get("GPGPU_TEST_DOCKER_IMAGE", "busybox:latest")


def _host(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command of this machine (docker, nvidia-smi) for the real-daemon tests."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)  # noqa: S603


def _real_docker_skip_reason() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command on this machine"
    try:
        if _host("docker", "info").returncode != 0:
            return "`docker info` fails: no Docker daemon answers here"
        if _host("docker", "image", "inspect", REAL_IMAGE).returncode != 0:
            return f"test image {REAL_IMAGE} is not present (docker pull it, or set GPGPU_TEST_DOCKER_IMAGE)"
        gpus = _host("nvidia-smi", "--query-gpu=uuid,index", "--format=csv,noheader")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no usable Docker with a GPU here: {exc}"
    if gpus.returncode != 0 or not gpus.stdout.strip():
        return "no NVIDIA GPU visible (nvidia-smi lists none)"
    return None


def _real_gpu() -> dict[str, int]:
    out = _host("nvidia-smi", "--query-gpu=uuid,index", "--format=csv,noheader").stdout
    uuid, index = out.splitlines()[0].split(", ")
    return {uuid.strip(): int(index)}


@pytest.fixture
def real_docker():
    reason = _real_docker_skip_reason()
    if reason:
        pytest.skip(reason)
    gpu = _real_gpu()
    runner = DockerRunner(cpu_limit=1, memory_limit="256m", pids_limit=64)
    yield runner, gpu
    for lease_id in (9_000_001, 9_000_002):
        _host("docker", "rm", "-f", f"gpgpu-lease-{lease_id}")


def test_real_docker_runs_a_container_reports_its_exit_and_adopts_it(real_docker):
    runner, gpu = real_docker
    spec = lease(
        9_000_001, image=REAL_IMAGE, command=("sh", "-c", "echo lease $GPGPU_LEASE_ID; exit 3"), gpu_uuids=tuple(gpu)
    )

    runner.start(spec, gpu_indexes=gpu)
    deadline = time.monotonic() + 30
    while (state := runner.poll(spec.lease_id)).running and time.monotonic() < deadline:
        time.sleep(0.2)

    assert state.exit_code == 3
    assert "lease 9000001" in state.log_tail
    adopted = DockerRunner(cpu_limit=1, memory_limit="256m").adopt()
    assert (9_000_001, False, 3) in [(s.lease_id, s.running, s.exit_code) for s in adopted]
    runner.forget(spec.lease_id)
    with pytest.raises(UnknownLeaseError):
        runner.poll(spec.lease_id)


def test_real_docker_stop_is_bounded(real_docker):
    runner, gpu = real_docker
    spec = lease(
        9_000_002,
        image=REAL_IMAGE,
        command=("sh", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"),
        gpu_uuids=tuple(gpu),
    )
    runner.start(spec, gpu_indexes=gpu)

    began = time.monotonic()
    state = runner.stop(spec.lease_id, grace_s=1)

    assert time.monotonic() - began < 1 + 5  # the grace period, plus Docker's own bookkeeping
    assert not state.running
    assert state.exit_code in (137, 143)
