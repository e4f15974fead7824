"""Attacks from inside a process job, against the real sandbox (bubblewrap, the rental user, the
lease's cgroup): each job tries to break out and prints BLOCKED (with what stopped it) or BREACH
(with what it got). Every test checks that no attempt got through, that the job's own log shows
the failure, and that the agent (this process) and another lease running beside it carry on.
"""

from __future__ import annotations

import os
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import SANDBOX_PYTHON, SandboxKit
from gpgpu_agent.runners.process import ProcessRunner
from gpgpu_agent.types import LeaseSpec, RunState

GPUS = {"GPU-aaa": 0, "GPU-bbb": 1}
CREDENTIAL = "gpm_" + "s3cr3t" * 8
SIGNING_KEY = "0x" + "5e" * 32

# The attempts share one helper: try something, print what happened.
PRELUDE = textwrap.dedent(
    """
    import os, socket, sys
    def attempt(what, action):
        try:
            got = action()
        except Exception as exc:
            print(f"BLOCKED {what}: {type(exc).__name__}: {exc}", flush=True)
        else:
            print(f"BREACH {what}: {str(got)[:200]!r}", flush=True)
    def read(path):
        with open(path) as f:
            return f.read()
    """
)


def lease(lease_id: int, script: str, *, gpus: tuple[str, ...] = ("GPU-aaa",)) -> LeaseSpec:
    return LeaseSpec(
        lease_id=lease_id,
        job_id=lease_id + 500,
        kind="process",
        image="",
        command=(SANDBOX_PYTHON, "-u", "-c", PRELUDE + textwrap.dedent(script)),
        env={},
        gpu_uuids=gpus,
        max_duration_s=120,
        price_per_gpu_hour="1.00",
    )


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up after {timeout} s")


def finished(runner: ProcessRunner, lease_id: int, timeout: float = 30.0) -> RunState:
    found: list[RunState] = []

    def check() -> bool:
        state = runner.poll(lease_id)
        if state.running:
            return False
        found.append(state)
        return True

    wait_until(check, timeout)
    return found[0]


def no_breach(state: RunState) -> None:
    assert "BREACH" not in state.log_tail, state.log_tail
    assert CREDENTIAL not in state.log_tail and SIGNING_KEY[2:] not in state.log_tail


@pytest.fixture
def agent_state(tmp_path: Path) -> Path:
    """An agent state directory as `register` leaves it: the credential and the key, 0600."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for name, text in (
        ("credential.json", f'{{"machine_id": 7, "credential": "{CREDENTIAL}"}}'),
        ("signing.key", f'{{"version": 1, "private_key": "{SIGNING_KEY}"}}'),
    ):
        (state / name).write_text(text)
        (state / name).chmod(0o600)
    return state


@pytest.fixture
def runner(agent_state: Path, sandbox_kit: SandboxKit, rentals_dir: Path) -> Iterator[ProcessRunner]:
    runner = ProcessRunner(
        agent_state,
        sandbox=sandbox_kit.sandbox,
        user=sandbox_kit.user,
        cgroups=sandbox_kit.cgroups,
        limits=sandbox_kit.limits,
        work_dir=rentals_dir,
    )
    yield runner
    for state in runner.adopt():
        if state.running:
            runner.stop(state.lease_id, grace_s=0)
        runner.forget(state.lease_id)


@pytest.fixture
def bystander(runner: ProcessRunner, rentals_dir: Path) -> Iterator[Callable[[], None]]:
    """Another renter's lease, running beside the attack: it must keep running, then finish 0."""
    runner.start(
        lease(
            90,
            """
            import time
            print('bystander up', flush=True)
            while not os.path.exists('/work/done'):
                time.sleep(0.05)
            print('bystander done', flush=True)
            """,
            gpus=("GPU-bbb",),
        ),
        gpu_indexes=GPUS,
    )
    wait_until(lambda: "bystander up" in runner.poll(90).log_tail)

    def carries_on() -> None:
        assert runner.poll(90).running, "the other lease died during the attack"
        (rentals_dir / "lease-90" / "done").touch()
        state = finished(runner, 90)
        assert state.exit_code == 0 and "bystander done" in state.log_tail

    yield carries_on


def attack(runner: ProcessRunner, lease_id: int, script: str) -> RunState:
    runner.start(lease(lease_id, script), gpu_indexes=GPUS)
    state = finished(runner, lease_id)
    no_breach(state)
    return state


# --- the agent's secrets and the owner's files ---------------------------------------------------


def test_a_job_cannot_read_the_agents_credential_or_signing_key(runner, agent_state, bystander):
    state = attack(
        runner,
        1,
        f"""
        for path in ('../../credential.json', '../../signing.key', '../credential.json',
                     {str(agent_state / "credential.json")!r}, {str(agent_state / "signing.key")!r},
                     '/var/lib/gpgpu-agent/credential.json', '/proc/1/root/../credential.json'):
            attempt('read ' + path, lambda p=path: read(p))
        attempt('list the state dir', lambda: os.listdir({str(agent_state)!r}))
        """,
    )

    assert state.log_tail.count("BLOCKED read") == 7
    assert "BLOCKED list the state dir: FileNotFoundError" in state.log_tail
    bystander()


def test_a_job_cannot_read_the_owners_files(runner, bystander):
    state = attack(
        runner,
        2,
        """
        for path in ('/etc/shadow', '/etc/sudoers', '/root/.bash_history', '/home', '/var/log', '/run',
                     '/etc/hostname', '/etc/ssh'):
            attempt('read ' + path, lambda p=path: read(p) if os.path.isfile(p) else os.listdir(p))
        print('passwd sees', read('/etc/passwd').count(chr(10)), 'accounts', flush=True)
        """,
    )

    assert state.log_tail.count("BLOCKED read") == 8
    assert "passwd sees 3 accounts" in state.log_tail  # root, the job's own user, nobody
    bystander()


def test_a_job_cannot_see_another_leases_work_directory(runner, rentals_dir, bystander):
    (rentals_dir / "lease-90" / "weights.bin").write_text("another renter's model")
    state = attack(
        runner,
        3,
        f"""
        attempt('read the other lease', lambda: read({str(rentals_dir / "lease-90" / "weights.bin")!r}))
        attempt('list the rentals', lambda: os.listdir({str(rentals_dir)!r}))
        def others():
            found = [n for n in os.listdir('/work/..') if n.startswith('lease') or n.startswith('gpgpu')]
            if not found:
                raise LookupError('no other lease in view of /work/..')
            return found
        attempt('find leases beside /work', others)
        """,
    )

    assert state.log_tail.count("BLOCKED") == 3
    assert "another renter" not in state.log_tail
    bystander()


def test_a_job_cannot_reach_a_container_engine_socket(runner, bystander):
    engine = Path("/run/gpgpu-test-engine.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    engine.unlink(missing_ok=True)
    server.bind(str(engine))
    engine.chmod(0o666)  # even a socket anyone may open is out of the sandbox's view
    server.listen(1)
    try:
        state = attack(
            runner,
            4,
            """
            for path in ('/run/gpgpu-test-engine.sock', '/var/run/docker.sock', '/run/docker.sock',
                         '/run/podman/podman.sock', '/run/containerd/containerd.sock'):
                def connect(p=path):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(p)
                    return 'connected'
                attempt('connect ' + path, connect)
            """,
        )
    finally:
        server.close()
        engine.unlink(missing_ok=True)

    assert state.log_tail.count("BLOCKED connect") == 5
    bystander()


def test_a_job_can_write_only_its_work_directory(runner, rentals_dir, bystander):
    state = attack(
        runner,
        5,
        """
        for path in ('/usr/bin/evil', '/etc/evil', '/evil', '/proc/sys/kernel/hostname', '/sys/kernel/evil'):
            attempt('write ' + path, lambda p=path: open(p, 'w').write('x'))
        open('/work/result.txt', 'w').write('trained')
        open('/tmp/gpgpu-job-scratch-5f1c', 'w').write('scratch')
        print('wrote /work and its own /tmp', flush=True)
        """,
    )

    assert state.log_tail.count("BLOCKED write") == 5
    assert "wrote /work and its own /tmp" in state.log_tail
    assert (rentals_dir / "lease-5" / "result.txt").read_text() == "trained"
    # The job's /tmp is its own, not the host's (a name nothing else on the host uses).
    assert not Path("/tmp/gpgpu-job-scratch-5f1c").exists()  # noqa: S108
    bystander()


# --- the owner's processes and the host's privileges ----------------------------------------------


def test_a_job_sees_only_its_own_processes_and_cannot_signal_the_agent(runner, bystander):
    agent_pid = os.getpid()
    state = attack(
        runner,
        6,
        f"""
        pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
        print('pids seen', pids, flush=True)
        import signal
        attempt('signal the agent', lambda: os.kill({agent_pid}, signal.SIGKILL))
        attempt("read the agent's environment", lambda: read('/proc/{agent_pid}/environ'))
        print('pid 1 is', read('/proc/1/cmdline').split(chr(0))[0], flush=True)
        """,
    )

    assert "pids seen [1, 2]" in state.log_tail  # bwrap's init and the job itself
    assert "BLOCKED signal the agent: ProcessLookupError" in state.log_tail
    assert "BLOCKED read the agent's environment" in state.log_tail
    assert "pid 1 is /usr/bin/bwrap" in state.log_tail  # the sandbox's own init, not the host's
    bystander()


def test_a_job_has_no_privileges_and_cannot_gain_any(runner, sandbox_kit, bystander):
    state = attack(
        runner,
        7,
        """
        status = dict(line.split(':', 1) for line in read('/proc/self/status').splitlines() if ':' in line)
        print('uid', os.getuid(), 'caps', status['CapEff'].strip(), 'nnp', status['NoNewPrivs'].strip(), flush=True)
        attempt('become root', lambda: os.setuid(0))
        import ctypes, subprocess
        attempt('mount', lambda: subprocess.run(['mount', '-t', 'tmpfs', 'none', '/work'], check=True,
                                                capture_output=True))
        libc = ctypes.CDLL(None, use_errno=True)
        def unshare(flag):
            if libc.unshare(flag) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            return 'unshared'
        attempt('new user namespace', lambda: unshare(0x10000000))
        attempt('new mount namespace', lambda: unshare(0x00020000))
        """,
    )

    expected_uid = sandbox_kit.user.uid if sandbox_kit.user is not None else os.geteuid()
    assert expected_uid != 0
    assert f"uid {expected_uid} caps 0000000000000000 nnp 1" in state.log_tail
    assert "BLOCKED become root" in state.log_tail
    assert "BLOCKED mount" in state.log_tail
    assert "BLOCKED new user namespace" in state.log_tail
    assert "BLOCKED new mount namespace" in state.log_tail
    bystander()


def test_the_jobs_environment_holds_nothing_of_the_agents(runner, monkeypatch, bystander):
    monkeypatch.setenv("GPGPU_AGENT_CREDENTIAL_FILE", "/var/lib/gpgpu-agent/credential.json")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "owner-secret")
    state = attack(runner, 8, "print('env', sorted(os.environ), flush=True)")

    assert "GPGPU_AGENT" not in state.log_tail and "AWS_SECRET" not in state.log_tail
    assert "'CUDA_VISIBLE_DEVICES'" in state.log_tail
    bystander()


# --- the network ----------------------------------------------------------------------------------


def test_a_job_reaches_no_network_not_the_metadata_service_the_lan_nor_the_host(runner, bystander):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        try:
            listener.settimeout(15)
            accepted.append(listener.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        state = attack(
            runner,
            9,
            f"""
            for host, port in (('169.254.169.254', 80), ('192.168.1.1', 80), ('10.0.0.1', 22),
                               ('127.0.0.1', {port}), ('1.1.1.1', 443)):
                attempt(f'connect {{host}}:{{port}}',
                        lambda h=host, p=port: socket.create_connection((h, p), timeout=3) and 'connected')
            attempt('resolve a name', lambda: socket.gethostbyname('example.com'))
            """,
        )
    finally:
        listener.close()
        thread.join(1)

    assert state.log_tail.count("BLOCKED connect") == 5
    assert accepted == []  # nothing reached the host's own listener
    bystander()


# --- resources ------------------------------------------------------------------------------------


def test_a_fork_bomb_stops_at_the_leases_process_limit(runner, sandbox_kit, bystander):
    if sandbox_kit.cgroups is None:
        pytest.skip("no cgroups here (not root): the process limit needs them")
    state = attack(
        runner,
        10,
        """
        import time
        children = 0
        try:
            for _ in range(100_000):
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
        except OSError as exc:
            print('BLOCKED fork bomb after', children, 'children:', exc, flush=True)
        else:
            print('BREACH fork bomb: all children started', flush=True)
        """,
    )

    assert "BLOCKED fork bomb after" in state.log_tail
    children = int(state.log_tail.split("BLOCKED fork bomb after")[1].split()[0])
    assert children < sandbox_kit.limits.pids
    assert os.fork  # the agent can still fork: prove it
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    bystander()


def test_a_job_that_exhausts_memory_is_killed_alone(runner, sandbox_kit, bystander):
    if sandbox_kit.cgroups is None:
        pytest.skip("no cgroups here (not root): the memory limit needs them")
    state = attack(
        runner,
        11,
        """
        hoard = []
        print('hoarding', flush=True)
        while True:
            hoard.append(bytearray(16 << 20))
            if len(hoard) * 16 > 4096:
                print('BREACH memory: 4 GiB held', flush=True)
                break
        """,
    )

    assert "hoarding" in state.log_tail
    assert state.exit_code == 137  # the OOM killer, inside the lease's cgroup only
    bystander()
