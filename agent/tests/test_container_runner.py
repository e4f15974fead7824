"""The container runner at the engine's command line, with a fake engine.

These tests need no container engine: `agent/tests/fake_engine`, a small Python script put on
PATH as `podman` or `docker`, records every argv it is given and answers the subcommands the
runner uses from a JSON state file that each test edits to play a scenario (a container exits,
the image does not exist, the daemon is down). They assert the safety-relevant arguments exactly
(read-only root, user namespace, the one mount, no privileges, the leased GPUs only, the limits)
and the refusals, for both engines; a fake firewall plays the nftables rules. The same runner
against a real engine, attacked from inside, is test_container_engine.py.
"""

from __future__ import annotations

import io
import json
import marshal
import os
import resource
import signal
import sys
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gpgpu_agent.fencing import Fence, boottime
from gpgpu_agent.leases import LeaseTracker
from gpgpu_agent.protocols import RunnerError
from gpgpu_agent.runners import ContainerRunner, FirewallError, UnknownLeaseError
from gpgpu_agent.runners import container as container_module
from gpgpu_agent.runners.state import proc_stat
from gpgpu_agent.spool import Spool
from gpgpu_agent.transport import FakeTransport
from gpgpu_agent.types import CheckpointSpec, LeaseSpec

FAKE_ENGINE = Path(__file__).with_name("fake_engine")
GPUS = {"GPU-aaa": 0, "GPU-bbb": 1, "GPU-ccc": 2}
IMAGE = "ghcr.io/acme/train:1.2"


class FakeEngine:
    def __init__(self, tmp_path: Path, name: str):
        self.name = name
        self.bin = tmp_path / "bin" / name
        self.state_path = tmp_path / "engine-state.marshal"
        self.log_path = tmp_path / "engine-calls.log"
        self.state_path.write_bytes(marshal.dumps({}))

    def state(self) -> dict:
        return marshal.loads(self.state_path.read_bytes())  # noqa: S302 - the fake engine's own file

    def edit(self, change) -> None:
        state = self.state()
        change(state)
        tmp = self.state_path.with_suffix(".edit")
        tmp.write_bytes(marshal.dumps(state))
        tmp.replace(self.state_path)  # a fence watcher may be reading it

    def container(self, lease_id: int) -> dict:
        return self.state()["containers"][f"gpgpu-lease-{lease_id}"]

    def set_container(self, lease_id: int, **fields) -> None:
        self.edit(lambda s: s["containers"][f"gpgpu-lease-{lease_id}"].update(fields))

    def calls(self, command: str | None = None) -> list[list[str]]:
        if not self.log_path.exists():
            return []
        calls = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        return [c for c in calls if command is None or c[0] == command]


class FakeFirewall:
    """Plays runners.firewall.Firewall: rules present or not, installable or not."""

    table = "gpgpu_rentals"

    def __init__(self, *, installed: bool = True, installable: bool = True):
        self.installed = installed
        self.installable = installable
        self.installs = 0
        self.bridge: str | None = None
        self.dns_servers: list[str] | None = None

    def adopt_network(self, *, bridge, dns_servers=None) -> None:
        self.bridge, self.dns_servers = bridge, dns_servers

    def check(self) -> list[str]:
        return [] if self.installed else ["the nftables table inet gpgpu_rentals is missing"]

    def install(self) -> None:
        self.installs += 1
        if not self.installable:
            raise FirewallError("nftables is not installed (no `nft` command); install it (apt-get install nftables)")
        self.installed = True


def install_fake_engine(path: Path) -> None:
    """Put the fake engine at `path` (named podman or docker), run by this interpreter: its
    `#!/usr/bin/env python3` would find a `python3` on PATH, which may be a version manager's shim
    that costs more than the fake engine itself (pyenv's: about 50 ms a call, hundreds of calls)."""
    source = FAKE_ENGINE.read_text().split("\n", 1)[1]
    path.write_text(f"#!{sys.executable} -S\n{source}")
    path.chmod(0o755)


def fake_engine(name: str, tmp_path: Path, monkeypatch) -> FakeEngine:
    fake = FakeEngine(tmp_path, name)
    fake.bin.parent.mkdir()
    install_fake_engine(fake.bin)
    monkeypatch.setenv("FAKE_ENGINE_STATE", str(fake.state_path))
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(fake.log_path))
    monkeypatch.setattr(container_module, "installed_runtimes", lambda: set())
    subids = tmp_path / "subuid"
    subids.write_text("containers:2147483647:2147483648\n")
    monkeypatch.setattr(container_module, "SUBUID_FILES", (str(subids), str(subids)))
    # The NVIDIA Container Toolkit's pieces: a CDI spec for Podman, the hook for Docker.
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\n")
    hook = tmp_path / "nvidia-container-runtime-hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    monkeypatch.setattr(container_module, "CDI_DIRS", (str(cdi),))
    monkeypatch.setattr(container_module, "NVIDIA_HOOKS", (str(hook),))
    return fake


@pytest.fixture(params=["podman", "docker"])
def engine(request, tmp_path, monkeypatch) -> FakeEngine:
    return fake_engine(request.param, tmp_path, monkeypatch)


@pytest.fixture
def podman(tmp_path, monkeypatch) -> FakeEngine:
    return fake_engine("podman", tmp_path, monkeypatch)


@pytest.fixture
def docker(tmp_path, monkeypatch) -> FakeEngine:
    return fake_engine("docker", tmp_path, monkeypatch)


@pytest.fixture
def firewall() -> FakeFirewall:
    return FakeFirewall()


@pytest.fixture
def rentals(tmp_path) -> Path:
    return tmp_path / "rentals"


def make_runner(engine: FakeEngine, rentals: Path, firewall=None, **kwargs) -> ContainerRunner:
    options = {"cpu_limit": 2, "memory_limit": "4g", "pids_limit": 512}
    options.update(kwargs)
    return ContainerRunner(
        engine=engine.name,
        engine_bin=str(engine.bin),
        rentals_dir=rentals,
        firewall=firewall if firewall is not None else FakeFirewall(),
        **options,
    )


@pytest.fixture
def runner(request, rentals, firewall) -> ContainerRunner:
    """A runner over whichever fake engine the test asks for (engine, podman or docker)."""
    for name in ("engine", "podman", "docker"):
        if name in request.fixturenames:
            return make_runner(request.getfixturevalue(name), rentals, firewall)
    raise AssertionError("the runner fixture needs an engine fixture")


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


def options_of(argv: list[str]) -> list[str]:
    return argv[: argv.index(IMAGE)]


def values(argv: list[str], option: str) -> list[str]:
    """The values given to ``option`` before the image (argv after the "create" subcommand)."""
    options = options_of(argv)
    return [options[i + 1] for i, arg in enumerate(options) if arg == option]


# --- what a container gets ------------------------------------------------------------------


def test_container_gets_a_read_only_root_no_privileges_the_leased_gpus_and_limits(runner, engine, rentals):
    spec = lease(21, env={"MODEL": "tiny", "NVIDIA_VISIBLE_DEVICES": "all", "GPGPU_LEASE_ID": "1", "HOME": "/root"})

    state = runner.start(spec, gpu_indexes=GPUS)

    (argv,) = engine.calls("create")
    options = options_of(argv)
    assert "--read-only" in options
    assert "--init" in options
    assert "--no-healthcheck" in options
    assert values(argv, "--cap-drop") == ["ALL"]
    assert values(argv, "--security-opt") == ["no-new-privileges"]
    assert values(argv, "--cpus") == ["2"]
    assert values(argv, "--memory") == values(argv, "--memory-swap") == ["4g"]  # no swap
    assert values(argv, "--pids-limit") == ["512"]
    assert values(argv, "--restart") == ["no"]
    assert values(argv, "--workdir") == ["/work"]
    assert values(argv, "--tmpfs") == ["/tmp:rw,nosuid,nodev,size=1g"]  # noqa: S108 - the container's
    assert values(argv, "--network") == ["gpgpu-rentals"]
    assert values(argv, "--sysctl") == ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
    assert values(argv, "--name") == ["gpgpu-lease-21"]
    assert values(argv, "--label") == ["gpgpu.lease_id=21", "gpgpu.job_id=121"]
    assert sorted(values(argv, "--env")) == [
        "GPGPU_JOB_ID=121",
        "GPGPU_LEASE_ID=21",
        "HOME=/work",
        "MODEL=tiny",
        # The runtime's device-adding features off, whatever the image's own ENV says.
        "NVIDIA_GDRCOPY=disabled",
        "NVIDIA_GDS=disabled",
        "NVIDIA_MOFED=disabled",
        "NVIDIA_NVSWITCH=disabled",
        "NVIDIA_VISIBLE_DEVICES=GPU-ccc,GPU-aaa",  # the job's "all" cannot widen the GPUs
    ]
    if engine.name == "podman":
        assert values(argv, "--device") == ["nvidia.com/gpu=GPU-ccc", "nvidia.com/gpu=GPU-aaa"]
        assert "--gpus" not in options
    else:
        assert values(argv, "--gpus") == ['"device=GPU-ccc,GPU-aaa"']
        assert "--device" not in options
    for forbidden in ("--privileged", "--cap-add", "--pid", "--ipc", "--uts", "--cgroupns", "--add-host", "-p"):
        assert not any(arg == forbidden or arg.startswith(forbidden + "=") for arg in options), forbidden
    assert not any("unconfined" in arg or "host" == arg for arg in options)
    assert argv[argv.index(IMAGE) :] == [IMAGE, "python", "train.py", "--epochs", "3"]
    made = engine.container(21)  # the command's own options were not read as the engine's
    assert made["command"] == ["python", "train.py", "--epochs", "3"]
    assert state.running and state.exit_code is None


def test_ulimits_are_explicit_and_within_the_agents_own_hard_limits(runner, podman):
    runner.start(lease(22), gpu_indexes=GPUS)

    (argv,) = podman.calls("create")
    limits = dict(v.split("=", 1) for v in values(argv, "--ulimit"))
    nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc_hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile, nofile_max = (int(x) for x in limits["nofile"].split(":"))
    nproc, nproc_max = (int(x) for x in limits["nproc"].split(":"))
    assert nofile == nofile_max and nproc == nproc_max
    assert nofile_hard == resource.RLIM_INFINITY or nofile <= nofile_hard
    assert nproc_hard == resource.RLIM_INFINITY or nproc <= nproc_hard
    assert nproc <= 32768  # Podman clamps its own RLIMIT_NPROC there


def test_the_only_mount_is_the_leases_own_work_directory(runner, engine, rentals, tmp_path):
    state_dir = tmp_path / "state"
    runner.start(lease(23), gpu_indexes=GPUS)

    (argv,) = engine.calls("create")
    options = options_of(argv)
    work = rentals / "containers" / "lease-23"
    if engine.name == "podman":
        # U: Podman chowns the new directory to the host uid the container's user maps to.
        assert values(argv, "--volume") == [f"{work}:/work:rw,U,nosuid,nodev"]
        assert "--mount" not in options
    else:
        assert values(argv, "--mount") == [f"type=bind,source={work},target=/work"]
        assert "--volume" not in options
    assert not any(arg in ("-v", "--volumes-from") for arg in options)
    assert not any(str(state_dir) in arg or ".sock" in arg or "/var/lib/gpgpu-agent" in arg for arg in argv)
    assert work.is_dir() and (work.stat().st_mode & 0o777) == 0o700
    assert (work.parent.stat().st_mode & 0o777) == 0o700


def test_podman_gives_every_container_its_own_user_namespace(runner, podman):
    runner.start(lease(24), gpu_indexes=GPUS)

    (argv,) = podman.calls("create")
    assert values(argv, "--userns") == ["auto:size=65536"]
    assert "--http-proxy=false" in options_of(argv)  # the host's proxy settings stay the host's
    assert values(argv, "--image-volume") == ["tmpfs"]  # an image VOLUME is no way onto the disk
    assert values(argv, "--log-driver") == ["k8s-file"]
    assert runner.capabilities()["user_namespace"] is True


def test_podman_without_a_subuid_range_for_containers_refuses(runner, podman, tmp_path, monkeypatch):
    empty = tmp_path / "empty-subuid"
    empty.write_text("alice:100000:65536\n")
    monkeypatch.setattr(container_module, "SUBUID_FILES", (str(empty), str(empty)))

    with pytest.raises(RunnerError, match="/etc/subuid and /etc/subgid need a range for the user `containers`"):
        runner.start(lease(25), gpu_indexes=GPUS)
    assert podman.calls("create") == []


def test_docker_uses_the_daemons_user_namespace_only_when_remapped(docker, rentals):
    plain = make_runner(docker, rentals)
    assert plain.capabilities()["user_namespace"] is False
    docker.edit(lambda s: s.update(info={"userns": True, "remap": "165536.165536"}))
    remapped = make_runner(docker, rentals)

    remapped.start(lease(26), gpu_indexes=GPUS)

    assert remapped.capabilities()["user_namespace"] is True
    (argv,) = docker.calls("create")
    assert "--userns" not in options_of(argv)  # the daemon's remap applies; `host` would undo it


def test_docker_work_dir_is_given_to_the_uid_the_images_user_maps_to(docker, rentals, monkeypatch):
    owners: list[tuple[str, int, int]] = []
    monkeypatch.setattr(container_module.os, "lchown", lambda p, u, g: owners.append((str(p), u, g)))
    docker.edit(
        lambda s: s.update(
            info={"userns": True, "remap": "165536.165536"},
            image_users={IMAGE: "jovyan", "ghcr.io/acme/root:1": ""},
            image_files={IMAGE: {"/etc/passwd": "root:x:0:0::/root:/bin/sh\njovyan:x:1000:100::/home/jovyan:/bin/sh"}},
        )
    )
    runner = make_runner(docker, rentals)

    runner.start(lease(27), gpu_indexes=GPUS)
    runner.start(lease(28, image="ghcr.io/acme/root:1"), gpu_indexes=GPUS)

    work = rentals / "containers"
    assert owners == [(str(work / "lease-27"), 165536 + 1000, 165536 + 100), (str(work / "lease-28"), 165536, 165536)]
    # created, chowned, then started: the workload never sees a directory it cannot write
    assert [c[0] for c in docker.calls() if c[0] in ("create", "cp", "start")][:3] == ["create", "cp", "start"]


def test_docker_refuses_an_image_user_it_cannot_map(docker, rentals, monkeypatch):
    monkeypatch.setattr(container_module.os, "lchown", lambda *a: None)
    passwd = {IMAGE: {"/etc/passwd": "root:x:0:0::/:"}}
    docker.edit(lambda s: s.update(image_users={IMAGE: "ghost"}, image_files=passwd))
    runner = make_runner(docker, rentals)

    with pytest.raises(RunnerError, match="the image's user 'ghost' is not in its /etc/passwd"):
        runner.start(lease(29), gpu_indexes=GPUS)
    assert docker.state()["containers"] == {}
    assert not (rentals / "containers" / "lease-29").exists()


@pytest.mark.parametrize(
    "image",
    [
        "192.168.1.1:8080/probe:1",
        "127.0.0.1:5000/x",
        "localhost/x",
        "169.254.169.254/x",
        "nas:5000/x",
        "registry.internal/x",
        "LOCALHOST/x:1",
        "Router/x",
        "0x7f.1:5000/x",
        "10.1.2.3/team/x@sha256:" + "a" * 64,
    ],
)
def test_an_image_from_a_registry_on_the_owners_network_is_refused_before_the_engine_is_asked(runner, engine, image):
    """The engine pulls from the owner's machine, outside the rentals' firewall: a job naming a
    registry on the owner's network reached its router, a service on localhost or the cloud's
    metadata address, and the pull's error told the renter what answered there."""
    with pytest.raises(RunnerError):
        runner.start(lease(31, image=image), gpu_indexes=GPUS)
    assert engine.calls("create") == [] and engine.calls("pull") == []


def test_an_images_huge_passwd_is_not_read_into_the_agents_memory(docker, rentals, tmp_path):
    """`docker cp` of the image's /etc/passwd was read whole before 4 MiB of it were kept: an
    image shipping gigabytes there (zeros compress well in a layer) ran the agent, root, out of
    memory. The stream is read to 4 MiB and the copy killed."""
    import tracemalloc

    huge = tmp_path / "engine-cp"
    huge.write_text("#!/bin/sh\nexec head -c 268435456 /dev/zero\n")  # 256 MiB of "tar"
    huge.chmod(0o755)
    runner = make_runner(docker, rentals)
    runner.engine_bin = str(huge)

    tracemalloc.start()
    try:
        text = runner._image_file("gpgpu-lease-30", "/etc/passwd")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert text == ""  # not readable: the user is then refused, as one missing from it
    assert peak < 16 * 1024 * 1024


# --- runtime ---------------------------------------------------------------------------------


def test_gvisor_is_used_when_the_engine_has_it(engine, rentals, monkeypatch):
    if engine.name == "podman":
        monkeypatch.setattr(container_module, "installed_runtimes", lambda: {"runc", "runsc"})
    else:
        engine.edit(lambda s: s.update(info={"runtimes": ["runc", "runsc"]}))
    runner = make_runner(engine, rentals)

    runner.start(lease(30), gpu_indexes=GPUS)

    (argv,) = engine.calls("create")
    assert values(argv, "--runtime") == ["runsc"]
    assert runner.capabilities()["runtime"] == "runsc"


def test_without_gvisor_the_engines_default_runtime_is_used_and_reported(runner, engine):
    runner.start(lease(31), gpu_indexes=GPUS)

    (argv,) = engine.calls("create")
    assert "--runtime" not in options_of(argv)
    assert runner.capabilities()["runtime"] == "runc"


@pytest.mark.parametrize("hybrid", [True, False], ids=["hybrid-cgroups", "plain-cgroups"])
def test_on_hybrid_cgroups_podman_runs_runc_instead_of_its_default_crun(podman, rentals, monkeypatch, hybrid):
    # crun refuses to start any container on a host with cgroup v1 and a v2 mount beside it.
    podman.edit(lambda s: s.update(info={"default_runtime": "crun"}))
    monkeypatch.setattr(container_module, "installed_runtimes", lambda: {"runc", "crun"})
    monkeypatch.setattr(container_module, "cgroups_hybrid", lambda: hybrid)
    runner = make_runner(podman, rentals)

    runner.start(lease(33), gpu_indexes=GPUS)

    (argv,) = podman.calls("create")
    assert values(argv, "--runtime") == (["runc"] if hybrid else [])
    assert runner.capabilities()["runtime"] == ("runc" if hybrid else "crun")


def test_cgroups_hybrid_reads_the_mounts(tmp_path, monkeypatch):
    mounts = {
        "hybrid": "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n",
        "v2": "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n",
        "v1": "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n",
    }
    real_read_text = container_module.Path.read_text
    seen = {}
    for name, text in mounts.items():
        monkeypatch.setattr(
            container_module.Path,
            "read_text",
            lambda self, *a, _t=text, **k: _t if str(self) == "/proc/self/mounts" else real_read_text(self, *a, **k),
        )
        seen[name] = container_module.cgroups_hybrid()
    assert seen == {"hybrid": True, "v2": False, "v1": False}


def test_a_configured_runtime_the_engine_lacks_is_refused(engine, rentals):
    runner = make_runner(engine, rentals, runtime="runsc")

    with pytest.raises(RunnerError, match="the runsc runtime is not known to"):
        runner.check()
    with pytest.raises(RunnerError, match="the runsc runtime is not known to"):
        runner.start(lease(32), gpu_indexes=GPUS)
    assert engine.calls("create") == []


# --- network and firewall --------------------------------------------------------------------


def test_the_rentals_network_is_created_once_and_the_firewall_told_its_bridge(runner, engine, firewall):
    runner.start(lease(33), gpu_indexes=GPUS)
    runner.start(lease(34), gpu_indexes=GPUS)

    (create,) = [c for c in engine.calls("network") if c[1] == "create"]
    assert values_after(create, "--subnet") == ["10.213.0.0/24"]
    assert values_after(create, "--gateway") == ["10.213.0.1"]
    assert create[-1] == "gpgpu-rentals"
    net = engine.state()["networks"]["gpgpu-rentals"]
    assert firewall.bridge == net["bridge"]
    if engine.name == "docker":
        assert net["options"]["com.docker.network.bridge.enable_icc"] == "false"
        assert firewall.dns_servers is not None  # Docker's resolver asks the host's from inside
    else:
        assert firewall.dns_servers is None  # the gateway, where aardvark-dns answers


def values_after(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


def test_setup_makes_the_network_and_installs_the_rules_before_any_lease(engine, rentals):
    firewall = FakeFirewall(installed=False)
    runner = make_runner(engine, rentals, firewall)

    words = runner.setup()

    assert firewall.installed and "gpgpu-rentals" in engine.state()["networks"]
    assert words.startswith("network gpgpu-rentals (10.213.0.0/24, bridge ")
    assert engine.calls("create") == []


def test_a_rentals_network_removed_behind_the_agents_back_is_made_again(runner, engine, firewall):
    runner.start(lease(60), gpu_indexes=GPUS)
    engine.edit(lambda s: s.update(networks={}))

    state = runner.start(lease(61), gpu_indexes=GPUS)

    assert state.running
    assert len([c for c in engine.calls("network") if c[1] == "create"]) == 2
    assert firewall.bridge == engine.state()["networks"]["gpgpu-rentals"]["bridge"]


def test_a_rentals_network_with_another_subnet_is_refused(engine, rentals):
    engine.edit(
        lambda s: s.update(
            networks={"gpgpu-rentals": {"subnet": "192.168.1.0/24", "gateway": "192.168.1.1", "bridge": "br0"}}
        )
    )
    runner = make_runner(engine, rentals)

    with pytest.raises(RunnerError, match=r"exists with subnet 192\.168\.1\.0/24, not 10\.213\.0\.0/24"):
        runner.start(lease(35), gpu_indexes=GPUS)
    assert engine.calls("create") == []


def test_missing_firewall_rules_are_installed_before_the_first_container(podman, rentals):
    firewall = FakeFirewall(installed=False)
    runner = make_runner(podman, rentals, firewall)

    runner.start(lease(36), gpu_indexes=GPUS)

    assert firewall.installs == 1 and firewall.installed


def test_without_firewall_rules_no_container_runs_fail_closed(engine, rentals):
    firewall = FakeFirewall(installed=False, installable=False)
    runner = make_runner(engine, rentals, firewall)

    with pytest.raises(RunnerError, match="containers are not run without the rentals network firewall: nftables"):
        runner.start(lease(37), gpu_indexes=GPUS)
    with pytest.raises(RunnerError, match="run `gpgpu-agent setup`"):
        runner.check()
    caps = runner.capabilities()

    assert engine.calls("create") == []
    assert not (runner.work_dir(37)).exists()
    assert caps["ready"] is False and "firewall" in caps["problem"]


def test_a_running_rental_is_killed_when_its_firewall_vanishes_for_good(runner, podman, firewall, monkeypatch):
    runner.start(lease(38), gpu_indexes=GPUS)
    firewall.installed, firewall.installable = False, False
    monkeypatch.setattr(container_module, "FIREWALL_CHECK_INTERVAL_S", 0.0)

    state = runner.poll(38)

    assert podman.calls("kill") == [["kill", "gpgpu-lease-38"]]
    assert not state.running and state.exit_code == 137
    assert "the rentals firewall rules are gone and could not be restored" in state.log_tail


def test_vanished_firewall_rules_are_put_back_while_rentals_run(runner, podman, firewall, monkeypatch):
    runner.start(lease(39), gpu_indexes=GPUS)
    firewall.installed = False
    monkeypatch.setattr(container_module, "FIREWALL_CHECK_INTERVAL_S", 0.0)

    state = runner.poll(39)

    assert state.running and firewall.installed and podman.calls("kill") == []


def test_network_none_gives_no_network_and_needs_no_firewall(engine, rentals):
    firewall = FakeFirewall(installed=False, installable=False)
    runner = make_runner(engine, rentals, firewall, network="none")

    runner.start(lease(40), gpu_indexes=GPUS)

    (argv,) = engine.calls("create")
    assert values(argv, "--network") == ["none"]
    assert engine.calls("network") == [] and firewall.installs == 0
    assert runner.capabilities()["network"] == "none" and runner.capabilities()["ready"] is True


def test_capabilities_say_what_a_rental_gets(runner, engine):
    caps = runner.capabilities()

    assert caps == {
        "engine": engine.name,
        "engine_version": "4.3.1" if engine.name == "podman" else "20.10.24",
        "runtime": "runc",
        "user_namespace": engine.name == "podman",
        "network": "filtered",
        "read_only_root": True,
        "limits": {"cpus": 2.0, "memory_mb": 4096, "pids": 512},
        "ready": True,
        "problem": None,
    }


# --- refusals and failures -------------------------------------------------------------------


def test_start_is_idempotent_by_lease(runner, podman, rentals):
    first = runner.start(lease(41), gpu_indexes=GPUS)
    second = runner.start(lease(41), gpu_indexes=GPUS)
    after_restart = make_runner(podman, rentals, cpu_limit=1, memory_limit="1g").start(lease(41), gpu_indexes=GPUS)

    assert len(podman.calls("create")) == 1
    assert first.pids == second.pids == after_restart.pids


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image": "--privileged"}, "not a container image reference"),
        ({"image": ""}, "not a container image reference"),
        ({"gpu_uuids": ("GPU-aaa,GPU-bbb",)}, "not a GPU uuid"),
        ({"gpu_uuids": ('GPU-aaa"',)}, "not a GPU uuid"),
        ({"gpu_uuids": ("GPU-zzz",)}, "GPU GPU-zzz is not on this machine"),
        ({"gpu_uuids": ()}, "names no GPU"),
        ({"env": {"NVIDIA_MIG_CONFIG_DEVICES": "all"}}, "may not set NVIDIA_MIG_CONFIG_DEVICES"),
        ({"env": {"A B": "x"}}, "not a valid environment variable name"),
        ({"kind": "process"}, "runs container jobs only"),
    ],
)
def test_unsafe_or_impossible_leases_are_refused_before_the_engine_is_called(runner, engine, changes, message):
    with pytest.raises(RunnerError, match=message):
        runner.start(lease(42, **changes), gpu_indexes=GPUS)

    assert engine.calls() == []


def test_an_image_that_cannot_be_pulled_fails_to_start_and_leaves_nothing(runner, engine):
    engine.edit(lambda s: s.update(missing_images=["ghcr.io/acme/nope:1"]))

    with pytest.raises(RunnerError, match=r"could not start the container: .*ghcr\.io/acme/nope"):
        runner.start(lease(43, image="ghcr.io/acme/nope:1"), gpu_indexes=GPUS)

    with pytest.raises(UnknownLeaseError):
        runner.poll(43)
    assert not runner.work_dir(43).exists()


def test_a_command_the_engine_cannot_be_given_fails_to_start_and_leaves_nothing(runner, engine):
    """A NUL in an argument (or an argument list over the kernel's limit) raised ValueError
    (OSError) out of the start, past its cleanup: the work directory stayed behind."""
    with pytest.raises(RunnerError, match="could not be run"):
        runner.start(lease(45, command=("python", "-c", "x\x00y")), gpu_indexes=GPUS)

    with pytest.raises(UnknownLeaseError):
        runner.poll(45)
    assert not runner.work_dir(45).exists()


def test_docker_without_the_nvidia_toolkit_is_explained_and_keeps_no_container(runner, docker):
    docker.edit(lambda s: s.update(no_gpu_runtime=True))

    with pytest.raises(RunnerError, match="install the NVIDIA Container Toolkit"):
        runner.start(lease(44), gpu_indexes=GPUS)

    assert docker.state()["containers"] == {}  # the created-but-not-started container was removed


def test_podman_without_the_nvidia_cdi_spec_is_explained(runner, podman, tmp_path, monkeypatch):
    podman.edit(lambda s: s.update(no_cdi=True))

    with pytest.raises(RunnerError, match=r"generate the NVIDIA CDI spec \(nvidia-ctk cdi generate"):
        runner.start(lease(45), gpu_indexes=GPUS)
    monkeypatch.setattr(container_module, "CDI_DIRS", (str(tmp_path / "no-cdi"),))
    with pytest.raises(RunnerError, match=r"no NVIDIA CDI spec in .*nvidia-ctk cdi generate"):
        runner.check()
    assert podman.calls("create") == [podman.calls("create")[0]]  # only the first attempt reached it


def test_docker_without_the_nvidia_toolkit_is_not_ready(runner, docker, tmp_path, monkeypatch):
    monkeypatch.setattr(container_module, "NVIDIA_HOOKS", (str(tmp_path / "absent"),))

    assert "install the NVIDIA Container Toolkit" in runner.capabilities()["problem"]
    docker.edit(lambda s: s.update(info={"runtimes": ["runc", "nvidia"]}))
    assert runner.capabilities()["ready"] is True


def test_an_engine_that_is_not_installed_is_a_clear_sentence(tmp_path, rentals):
    for name in ("podman", "docker"):
        runner = ContainerRunner(engine=name, engine_bin=str(tmp_path / f"no-{name}-here"), rentals_dir=rentals)

        with pytest.raises(RunnerError, match=f"{name.capitalize()} is not installed here"):
            runner.start(lease(46), gpu_indexes=GPUS)
        with pytest.raises(RunnerError, match=f"{name.capitalize()} is not installed here"):
            runner.adopt()
        assert runner.capabilities()["ready"] is False


def test_a_stopped_docker_daemon_is_a_clear_sentence(runner, docker):
    runner.start(lease(47), gpu_indexes=GPUS)
    docker.edit(lambda s: s.update(daemon_down=True))

    for call in (lambda: runner.start(lease(48), gpu_indexes=GPUS), lambda: runner.poll(47), runner.adopt):
        with pytest.raises(RunnerError, match="the Docker daemon is not running"):
            call()


def test_an_engine_call_that_hangs_is_cut_off(podman, rentals):
    runner = make_runner(podman, rentals, call_timeout_s=0.5)
    podman.edit(lambda s: s.update(hang=["inspect"]))

    began = time.monotonic()
    with pytest.raises(RunnerError, match=r"did not answer within 0\.5 s"):
        runner.poll(49)
    assert time.monotonic() - began < 5


RACE = "Error: read /proc/24681/cgroup: no such process"  # Podman 4.3, inspect as the container exits


def test_a_container_that_exits_while_podman_inspects_it_is_asked_again_and_reports_its_end(runner, podman):
    runner.start(lease(53), gpu_indexes=GPUS)
    podman.set_container(53, status="exited", exit_code=0)
    podman.edit(lambda s: s.update(fail_next={"inspect": [RACE, RACE]}))

    state = runner.poll(53)

    assert not state.running and state.exit_code == 0
    assert len(podman.calls("inspect")) >= 3  # the two that raced, then the answer


def test_an_inspect_that_keeps_failing_the_same_way_is_an_error_not_a_loop(runner, podman):
    runner.start(lease(54), gpu_indexes=GPUS)
    before = len(podman.calls("inspect"))
    podman.edit(lambda s: s.update(fail_next={"inspect": [RACE] * 10}))

    with pytest.raises(RunnerError, match=r"could not inspect the container: .*no such process"):
        runner.poll(54)
    assert len(podman.calls("inspect")) - before == 1 + container_module.INSPECT_RACE_RETRIES


def test_other_inspect_failures_are_not_asked_again(runner, podman):
    runner.start(lease(55), gpu_indexes=GPUS)
    before = len(podman.calls("inspect"))
    podman.edit(lambda s: s.update(fail_next={"inspect": ["Error: permission denied"]}))

    with pytest.raises(RunnerError, match="could not inspect the container: Error: permission denied"):
        runner.poll(55)
    assert len(podman.calls("inspect")) - before == 1


def test_auto_prefers_podman_and_falls_back_to_docker(tmp_path, monkeypatch, rentals):
    bin_dir = tmp_path / "path"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    install_fake_engine(bin_dir / "docker")
    assert ContainerRunner(rentals_dir=rentals).engine == "docker"
    install_fake_engine(bin_dir / "podman")
    assert ContainerRunner(rentals_dir=rentals).engine == "podman"


# --- poll, stop, forget, adopt ---------------------------------------------------------------


def test_a_running_container_reports_its_host_pids_and_an_ended_one_its_exit_code_and_logs(runner, engine):
    runner.start(lease(50), gpu_indexes=GPUS)
    engine.set_container(50, pid=4242, pids=[4242, 4243, 4250], logs="epoch 1\nloss nan\n")

    running = runner.poll(50)
    engine.set_container(50, status="exited", exit_code=3)
    ended = runner.poll(50)

    assert running.running and running.pids == (4242, 4243, 4250)
    assert running.started_at is not None and running.started_at.year == 2026
    assert not ended.running and ended.exit_code == 3 and ended.pids == ()
    assert ended.log_tail == "epoch 1\nloss nan\n"


def test_podman_log_tail_is_read_from_its_log_file_with_split_lines_joined(runner, podman, tmp_path):
    runner.start(lease(62), gpu_indexes=GPUS)
    log_file = tmp_path / "ctr.log"
    log_file.write_text(
        "2026-12-01T19:27:41.1+00:00 stdout P /bin/sh: \n"
        "2026-12-01T19:27:41.2+00:00 stderr F Traceback (most recent call last)\n"
        "2026-12-01T19:27:41.3+00:00 stdout F can't create /etc/x: Read-only file system\n"
        "2026-12-01T19:27:41.4+00:00 stdout F epoch 1\n"
    )
    podman.set_container(62, log_path=str(log_file), logs="the CLI's answer\n")
    calls_before = len(podman.calls("logs"))

    state = runner.poll(62)

    assert state.log_tail == (
        "Traceback (most recent call last)\n/bin/sh: can't create /etc/x: Read-only file system\nepoch 1\n"
    )
    assert len(podman.calls("logs")) == calls_before  # `podman logs --tail` splits such lines apart


def test_podman_output_is_read_on_from_its_log_file_one_whole_record_at_a_time(runner, podman, tmp_path):
    runner.start(lease(63), gpu_indexes=GPUS)
    log_file = tmp_path / "ctr63.log"
    first = "2026-12-01T19:27:41.1+00:00 stdout P step \n2026-12-01T19:27:41.2+00:00 stdout F 1\n"
    log_file.write_text(first + "2026-12-01T19:27:41.3+00:00 stderr F warn")  # the last record is unfinished
    podman.set_container(63, log_path=str(log_file))
    inspects = len(podman.calls("inspect"))

    one = runner.read_output(63, offset=0, limit=65536)
    with log_file.open("a") as f:
        f.write("ing\n2026-12-01T19:27:41.4+00:00 stdout F step 2\n")
    two = runner.read_output(63, offset=one.next_offset, limit=65536)
    three = runner.read_output(63, offset=two.next_offset, limit=65536)

    assert one.data == b"step 1\n" and one.next_offset == len(first)
    assert two.data == b"warning\nstep 2\n" and three.data == b""
    assert len(podman.calls("inspect")) == inspects + 1  # the file is found once, then only read


def test_docker_output_is_read_on_from_its_json_file_log_one_whole_record_at_a_time(runner, docker, tmp_path):
    runner.start(lease(64), gpu_indexes=GPUS)
    (argv,) = docker.calls("create")
    assert values(argv, "--log-driver") == ["json-file"]
    assert values(argv, "--log-opt") == ["max-size=20m", "max-file=1"]
    log_file = tmp_path / "ctr64-json.log"
    first = (
        '{"log":"step ","stream":"stdout","time":"2026-12-01T19:27:41.1Z"}\n'
        '{"log":"1\\n","stream":"stdout","time":"2026-12-01T19:27:41.2Z"}\n'
        "not a record\n"
    )
    log_file.write_text(first + '{"log":"warn')  # the last record is unfinished
    docker.set_container(64, log_path=str(log_file))
    inspects = len(docker.calls("inspect"))

    one = runner.read_output(64, offset=0, limit=65536)
    with log_file.open("a") as f:
        f.write('ing \\u00e9\\n","stream":"stderr","time":"2026-12-01T19:27:41.3Z"}\n')
    two = runner.read_output(64, offset=one.next_offset, limit=65536)
    three = runner.read_output(64, offset=two.next_offset, limit=65536)

    assert one.data == b"step 1\n" and one.next_offset == len(first)
    assert two.data == "warning é\n".encode() and three.data == b""
    assert len(docker.calls("inspect")) == inspects + 1  # the file is found once, then only read


def test_a_log_file_the_agent_cannot_read_gives_no_live_output(runner, docker, tmp_path, monkeypatch):
    runner.start(lease(65), gpu_indexes=GPUS)
    docker.set_container(65, log_path=str(tmp_path / "ctr65-json.log"))

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(container_module, "read_from", refused)
    assert runner.read_output(65, offset=0, limit=65536) is None


def test_a_container_killed_for_memory_reports_137_and_one_never_started_125(runner, podman):
    runner.start(lease(51), gpu_indexes=GPUS)
    runner.start(lease(52), gpu_indexes=GPUS)
    podman.set_container(51, status="exited", exit_code=0, oom_killed=True)
    podman.set_container(52, status="created")

    assert runner.poll(51).exit_code == 137
    assert runner.poll(52).exit_code == 125


def test_stop_gives_the_engine_the_grace_period_and_returns_the_final_state(runner, podman):
    runner.start(lease(53), gpu_indexes=GPUS)

    state = runner.stop(53, grace_s=2.5)
    again = runner.stop(53, grace_s=2.5)

    assert podman.calls("stop") == [["stop", "-t", "3", "gpgpu-lease-53"]]  # once: the second found it ended
    assert not state.running and state.exit_code == 143
    assert again.exit_code == 143


def test_stopping_or_polling_an_unknown_lease_says_so(runner, podman):
    with pytest.raises(UnknownLeaseError):
        runner.stop(54, grace_s=1)
    with pytest.raises(UnknownLeaseError):
        runner.poll(54)


def test_forget_removes_an_ended_container_and_its_work_dir_and_refuses_a_running_one(runner, engine, rentals):
    runner.start(lease(55), gpu_indexes=GPUS)
    (runner.work_dir(55) / "checkpoint.pt").write_text("weights")
    process_lease_dir = rentals / "lease-55"  # the process runner's, in the same rentals_dir
    process_lease_dir.mkdir()

    with pytest.raises(RunnerError, match="still running"):
        runner.forget(55)
    runner.stop(55, grace_s=1)
    runner.forget(55)
    runner.forget(55)  # forgetting twice is harmless

    assert engine.state()["containers"] == {}
    # With their anonymous volumes (an image's VOLUME): the renter's data in them goes too.
    assert all("--volumes" in argv for argv in engine.calls("rm"))
    assert not runner.work_dir(55).exists()
    assert process_lease_dir.is_dir()
    with pytest.raises(UnknownLeaseError):
        runner.poll(55)


def test_a_restarted_agent_adopts_lease_containers_by_label_without_touching_them(runner, engine, rentals):
    runner.start(lease(56), gpu_indexes=GPUS)
    runner.start(lease(57), gpu_indexes=GPUS)
    engine.set_container(57, status="exited", exit_code=0)
    engine.edit(
        lambda s: s["containers"].update(
            {
                "someone-else": {**s["containers"]["gpgpu-lease-56"], "labels": {"gpgpu.lease_id": "99"}},
                "gpgpu-lease-98": {**s["containers"]["gpgpu-lease-56"], "labels": {"gpgpu.lease_id": "97"}},
            }
        )
    )
    calls_before = len(engine.calls())

    adopted = make_runner(engine, rentals, cpu_limit=1, memory_limit="1g").adopt()

    assert [(s.lease_id, s.running, s.exit_code) for s in adopted] == [(56, True, None), (57, False, 0)]
    made_since = {call[0] for call in engine.calls()[calls_before:]}
    assert made_since <= {"ps", "inspect", "top", "logs"}  # nothing stopped, removed or started


def test_an_ended_container_reports_when_the_engine_saw_it_start_and_end(runner, engine):
    runner.start(lease(63), gpu_indexes=GPUS)
    engine.set_container(
        63, status="exited", exit_code=0, started_at="2026-11-22T01:02:03.5Z", finished_at="2026-11-22T01:02:19.25Z"
    )

    state = runner.poll(63)

    assert state.started_at == datetime(2026, 11, 22, 1, 2, 3, 500000, tzinfo=UTC)
    assert state.ended_at == datetime(2026, 11, 22, 1, 2, 19, 250000, tzinfo=UTC)


def test_a_container_podman_is_still_stopping_is_running(runner, podman):
    runner.start(lease(64), gpu_indexes=GPUS)
    podman.set_container(64, status="stopping")  # Podman: Running false, no exit code yet

    state = runner.poll(64)

    assert state.running and state.exit_code is None and state.ended_at is None


def test_a_container_that_ended_while_the_agent_was_away_is_reported_at_its_finish(engine, rentals, tmp_path):
    make_runner(engine, rentals).start(lease(65), gpu_indexes=GPUS)
    engine.set_container(
        65, status="exited", exit_code=0, started_at="2026-11-22T01:02:03.5Z", finished_at="2026-11-22T01:02:19.75Z"
    )
    transport = FakeTransport()
    with Spool(tmp_path / "spool.sqlite3") as spool:
        tracker = LeaseTracker(
            runner=make_runner(engine, rentals), outbox=spool, sign=lambda struct: "", state_dir=tmp_path
        )

        tracker.adopt()  # the agent's next start
        spool.replay(transport)

    exited = transport._events[(65, "lease-65-exited")]
    assert exited["at"] == "2026-11-22T01:02:19.750000Z"
    ((_, usage),) = transport._usage.values()
    assert (usage["period_start"], usage["period_end"]) == ("2026-11-22T01:02:03Z", "2026-11-22T01:02:19Z")


# --- fencing: the watcher -------------------------------------------------------------------


def _watcher_pid(fence_dir: Path, lease_id: int) -> int:
    return json.loads((fence_dir / f"lease-{lease_id}.watcher.json").read_text())["pid"]


def _alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and not stat.zombie


def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)
    return value


def test_a_fenced_container_is_stopped_by_its_own_watcher_once_its_deadline_passes(engine, rentals, tmp_path):
    fence_dir = tmp_path / "fence"
    runner = make_runner(engine, rentals, fence_dir=fence_dir, fence_grace_s=1)
    fence = Fence(fence_dir, fence_s=60)
    fence.arm(66)
    runner.start(lease(66), gpu_indexes=GPUS)  # slow with the fake engine: the deadline starts after it
    fence.set_fence_s(1.5)
    fence.renew([66], contact=boottime())  # the last contact with the marketplace

    watcher = proc_stat(_watcher_pid(fence_dir, 66))

    # The watcher is nobody's child here and in a session of its own: the agent's end is not its.
    assert watcher is not None and watcher.ppid != os.getpid() and watcher.sid != os.getsid(0)
    _until(lambda: engine.container(66)["status"] == "exited", 10, "the watcher stopping the container")
    state = runner.poll(66)
    assert not state.running and state.exit_code == 143
    assert state.fenced_at is not None and state.ended_at is not None and state.fenced_at <= state.ended_at
    assert engine.calls("stop") == [["stop", "-t", "1", "gpgpu-lease-66"]]
    _until(lambda: not _alive(watcher.pid), 5, "the watcher leaving")


def test_a_renewed_container_runs_on_and_its_watcher_leaves_with_the_lease(engine, rentals, tmp_path):
    fence_dir = tmp_path / "fence"
    runner = make_runner(engine, rentals, fence_dir=fence_dir)
    fence = Fence(fence_dir, fence_s=60)
    fence.arm(67)
    runner.start(lease(67), gpu_indexes=GPUS)
    watcher = _watcher_pid(fence_dir, 67)
    fence.set_fence_s(2)

    until = time.monotonic() + 5  # longer than the fence: only the renewals keep it running
    while time.monotonic() < until:
        fence.renew([67], contact=boottime())
        time.sleep(0.2)
    assert runner.poll(67).running and engine.calls("stop") == []

    runner.stop(67, grace_s=1)
    runner.forget(67)
    fence.disarm(67)
    _until(lambda: not _alive(watcher), 5, "the watcher leaving with its lease")
    assert list(fence_dir.iterdir()) == []


def test_a_running_container_whose_watcher_is_gone_gets_a_new_one(podman, rentals, tmp_path):
    fence_dir = tmp_path / "fence"
    runner = make_runner(podman, rentals, fence_dir=fence_dir)
    fence = Fence(fence_dir, fence_s=60)
    fence.arm(68)
    runner.start(lease(68), gpu_indexes=GPUS)
    first = _watcher_pid(fence_dir, 68)
    os.kill(first, signal.SIGKILL)
    _until(lambda: not _alive(first), 5, "the watcher dying")

    assert runner.poll(68).running
    second = _watcher_pid(fence_dir, 68)
    assert second != first and _alive(second)
    fence.disarm(68)
    _until(lambda: not _alive(second), 5, "the watcher leaving")


def test_a_container_that_ended_before_its_fence_fired_is_not_reported_fenced(runner, podman, tmp_path, rentals):
    fence_dir = tmp_path / "fence"
    fence_dir.mkdir()
    runner = make_runner(podman, rentals, fence_dir=fence_dir)  # not armed: no watcher
    runner.start(lease(69), gpu_indexes=GPUS)
    podman.set_container(69, status="exited", exit_code=0, finished_at="2026-11-22T01:02:19Z")

    (fence_dir / "lease-69.fenced.json").write_text('{"fenced_at": "2026-11-22T01:02:20Z"}')
    ended_first = runner.poll(69)
    (fence_dir / "lease-69.fenced.json").write_text('{"fenced_at": "2026-11-22T01:02:18Z"}')
    fenced = runner.poll(69)

    assert ended_first.fenced_at is None
    assert fenced.fenced_at == datetime(2026, 11, 22, 1, 2, 18, tzinfo=UTC)
    assert not (fence_dir / "lease-69.watcher.json").exists()


def test_a_stale_work_dir_of_a_vanished_container_is_not_handed_to_a_new_one(runner, podman):
    stale = runner.work_dir(58)
    stale.mkdir(parents=True)
    (stale / "old.txt").write_text("someone else's")

    runner.start(lease(58), gpu_indexes=GPUS)

    assert list(stale.iterdir()) == []


def test_settings_that_would_break_the_mount_or_the_limits_are_refused(tmp_path):
    with pytest.raises(ValueError, match="rentals_dir must be an absolute path"):
        ContainerRunner(engine="podman", rentals_dir=Path("relative"))
    with pytest.raises(ValueError, match="rentals_dir must be an absolute path"):
        ContainerRunner(engine="podman", rentals_dir=tmp_path / "a,b")
    with pytest.raises(ValueError, match="memory_limit"):
        ContainerRunner(engine="podman", rentals_dir=tmp_path, memory_limit="lots")
    with pytest.raises(ValueError, match="network must be one of"):
        ContainerRunner(engine="podman", rentals_dir=tmp_path, network="host")
    with pytest.raises(ValueError, match="host bits set"):
        ContainerRunner(engine="podman", rentals_dir=tmp_path, subnet="10.213.0.1/24")
    assert os.path.exists(FAKE_ENGINE)


def test_the_fake_engines_json_reads_back_as_written(tmp_path, monkeypatch):
    """The fake engine writes its JSON without the json module: what the runner parses must be
    what the state held, escapes included."""
    import runpy

    monkeypatch.setenv("FAKE_ENGINE_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(tmp_path / "log"))
    dumps = runpy.run_path(str(FAKE_ENGINE), run_name="fake_engine")["dumps"]
    value = {
        "Id": "abc",
        "Args": ["sh", "-c", 'echo "quoted" \\ back\tslash\n\x01 é'],
        "State": {"Running": False, "ExitCode": 137, "OOMKilled": True, "Pid": 0, "Error": None},
        "Mounts": [],
        "Ratio": 0.5,
        "2": {},
    }
    assert json.loads(dumps(value)) == value
    with pytest.raises(TypeError):
        dumps({1, 2})


# --- gpgpu-agent doctor ---------------------------------------------------------------------------


def doctor_config(tmp_path: Path, **changes):
    from gpgpu_agent.config import AgentConfig

    return AgentConfig(state_dir=tmp_path / "state", rentals_dir=tmp_path / "rentals", **changes)


def test_doctor_reports_the_engine_its_user_namespaces_runtime_gpus_and_missing_rules(podman, tmp_path, monkeypatch):
    from gpgpu_agent.doctor import check_container

    monkeypatch.setenv("PATH", f"{podman.bin.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(container_module, "Firewall", lambda **kw: FakeFirewall(installed=False))

    findings = {f.check: (f.level, f.words) for f in check_container(doctor_config(tmp_path))}

    assert findings["container engine"] == ("OK", "Podman 4.3.1")
    assert findings["user namespaces"][0] == "OK"
    assert findings["runtime"][0] == "WARN" and "install gVisor" in findings["runtime"][1]
    assert findings["container GPUs"] == ("OK", "the NVIDIA CDI spec is present")
    assert findings["rentals firewall"][0] == "FAIL" and "run `gpgpu-agent setup`" in findings["rentals firewall"][1]


def test_doctor_warns_that_docker_without_userns_remap_makes_container_root_host_root(docker, tmp_path, monkeypatch):
    from gpgpu_agent.doctor import check_container

    monkeypatch.setenv("PATH", f"{docker.bin.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(container_module, "Firewall", lambda **kw: FakeFirewall())
    docker.edit(lambda s: s.update(info={"runtimes": ["runc", "runsc"]}))

    findings = {
        f.check: (f.level, f.words) for f in check_container(doctor_config(tmp_path, container_engine="docker"))
    }

    assert findings["user namespaces"][0] == "WARN" and "container root is host root" in findings["user namespaces"][1]
    assert findings["runtime"][0] == "OK" and "gVisor" in findings["runtime"][1]
    assert findings["rentals firewall"][0] == "OK"


def test_doctor_fails_a_configured_engine_that_is_missing(tmp_path, monkeypatch):
    from gpgpu_agent.doctor import check_container

    monkeypatch.setenv("PATH", str(tmp_path))

    (finding,) = check_container(doctor_config(tmp_path, container_engine="podman"))
    (auto,) = check_container(doctor_config(tmp_path))

    assert (finding.level, finding.words) == ("FAIL", "podman is not installed (apt-get install podman catatonit)")
    assert auto.level == "WARN" and "neither podman nor docker is installed" in auto.words


def test_doctor_warns_about_an_engine_socket_that_a_group_with_members_may_open(tmp_path, monkeypatch):
    import grp
    import socket

    from gpgpu_agent.doctor import _engine_socket_findings

    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        path.chmod(0o660)
        gid = path.stat().st_gid
        monkeypatch.setattr(grp, "getgrgid", lambda g: grp.struct_group(("docker", "x", gid, ["alice", "bob"])))

        (finding,) = _engine_socket_findings((str(path),))
        path.chmod(0o600)
        assert _engine_socket_findings((str(path),)) == []
        path.chmod(0o666)
        (world,) = _engine_socket_findings((str(path),))

    assert finding.level == "WARN" and "open to group docker (alice, bob)" in finding.words
    assert world.level == "WARN" and "open to every user" in world.words


# --- a restored checkpoint ------------------------------------------------------------------------


def _archive(tmp_path, name: str, data: bytes):  # type: ignore[no-untyped-def]
    path = tmp_path / "restore.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def _checkpoint_spec() -> CheckpointSpec:
    return CheckpointSpec(
        dir="/work/ckpt",
        max_bytes=1 << 20,
        upload_url="leases/29/checkpoint",
        restore_url="leases/29/checkpoint",
        restore_sha256="0" * 64,
        restore_size=0,
        resume_count=1,
    )


def test_docker_gives_a_restored_checkpoint_to_the_images_user_before_the_container_starts(
    docker, rentals, monkeypatch, tmp_path
):
    owners: list[tuple[str, int, int]] = []
    monkeypatch.setattr(container_module.os, "lchown", lambda p, u, g: owners.append((str(p), u, g)))
    docker.edit(
        lambda s: s.update(
            info={"userns": True, "remap": "165536.165536"},
            image_users={IMAGE: "1000:100"},
        )
    )
    runner = make_runner(docker, rentals)
    archive = _archive(tmp_path, "state.txt", b"step 13")

    runner.start(
        lease(
            29,
            checkpoint=_checkpoint_spec(),
            restore_archive=str(archive),
            agent_env={"GPGPU_RESUME_COUNT": "1"},
            agent_status={"lease_id": 29, "resume_count": 1},
        ),
        gpu_indexes=GPUS,
    )

    work = rentals / "containers" / "lease-29"
    assert (work / "ckpt" / "state.txt").read_bytes() == b"step 13"
    status = work / ".gpgpu-lease.json"
    assert json.loads(status.read_text()) == {"lease_id": 29, "resume_count": 1}
    assert sorted(owners) == sorted(
        (str(path), 165536 + 1000, 165536 + 100) for path in (work, work / "ckpt", work / "ckpt" / "state.txt", status)
    )
    create = next(c for c in docker.calls() if c[0] == "create")
    assert "GPGPU_RESUME_COUNT=1" in values(create, "--env")


def test_a_hostile_checkpoint_fails_the_containers_start_and_leaves_no_work_directory(
    runner, engine, rentals, tmp_path
):
    archive = _archive(tmp_path, "../../escaped", b"x")
    with pytest.raises(RunnerError, match="checkpoint"):
        runner.start(lease(30, checkpoint=_checkpoint_spec(), restore_archive=str(archive)), gpu_indexes=GPUS)
    assert not (rentals / "containers" / "lease-30").exists()
    assert not (rentals / "escaped").exists()
    assert not [c for c in engine.calls() if c[0] == "create"]
