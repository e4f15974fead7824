"""Attacks on the owner's machine from inside a rental, against a real container engine (issue 7).

The container runner is driven against real rootful Podman (and Docker, where a daemon answers),
with the real nftables firewall, and a rental tries what hostile renter code would: read the
agent's credential and signing key (a fake state directory with secret strings), read the host's
/etc/shadow, find an engine socket, write outside /work, see the agent's processes, fork-bomb,
exhaust memory, and reach the owner's LAN (192.168.77.2 in a network namespace), the cloud
metadata service (169.254.169.254, in the same namespace), this machine's own addresses (one of
them in a range that is otherwise public) and another rental. The same namespace trick plays
the internet (198.51.100.2, which must stay reachable) so the firewall is shown not to block
everything. Meanwhile a neighbour rental runs, and must finish with exit 0.

Every protection is shown to matter: the same probe runs once more in a container without it
(no firewall rules, the state directory, /etc/shadow and the engine socket mounted, the host's
PID namespace, a writable root) and the test asserts that there the attack WORKS. A test that
cannot fail proves nothing.

The probe image is built locally from Debian's static busybox (probe_image.py): no registry.
Needs root, nft, ip (iproute2) and busybox-static; without them, or without a working engine,
the module is skipped with the reason, except where GPGPU_REQUIRE_CONTAINER_ENGINE names the
engine ("1" means podman; "podman,docker" both): CI sets it, and there a missing engine fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpgpu_agent.protocols import RunnerError
from gpgpu_agent.runners import ContainerRunner, Firewall, UnknownLeaseError
from gpgpu_agent.runners.container import cgroups_hybrid
from gpgpu_agent.types import LeaseSpec, RunState

sys.path.insert(0, str(Path(__file__).parent))
from probe_image import ProbeImageError, ensure_probe_image

_required = os.environ.get("GPGPU_REQUIRE_CONTAINER_ENGINE", "").strip()
REQUIRED = {"podman"} if _required == "1" else {e.strip() for e in _required.split(",") if e.strip()}
LAN_NS, PUBLIC_NS = "gpgpu-t-lan", "gpgpu-t-pub"
LAN_ADDR, LAN_HOST_ADDR, METADATA_ADDR = "192.168.77.2", "192.168.77.1", "169.254.169.254"
PUBLIC_ADDR, PUBLIC_HOST_ADDR = "198.51.100.2", "198.51.100.1"
OUTSIDE_PORT, HOST_PORT, NEIGHBOUR_PORT = 8077, 8078, 8079
# Per engine: its own network, subnet and nftables tables, so both run side by side and nothing
# of a real agent on this machine is touched.
SUBNETS = {"podman": "10.213.250.0/24", "docker": "10.213.251.0/24"}
LEASE_BASE = {"podman": 8_800_000, "docker": 8_900_000}
GPU = {"GPU-00000000-0000-0000-0000-000000000000": 0}
SOCKETS = ("/run/podman/podman.sock", "/var/run/docker.sock", "/run/containerd/containerd.sock")

# What the attacker runs (busybox sh). Each attempt prints "RESULT <what>=<outcome>" and leaves
# the tool's own error in the log.
ATTACK = r"""
exec 2>&1  # one stream: the engine's log keeps stdout and stderr apart and may splice half lines
say() { echo "RESULT $1=$2"; }
echo "--- the agent's state directory"
busybox cat "$STATE_DIR/credential.json" "$STATE_DIR/signing.key"
for p in /proc/[0-9]*; do busybox cat "$p/root$STATE_DIR/credential.json" 2>/dev/null; done
for f in $(busybox find / -xdev \( -name credential.json -o -name signing.key \) 2>/dev/null); do busybox cat "$f"; done
echo "--- the environment"
busybox env
echo "--- the host's /etc/shadow"
busybox cat /etc/shadow
for p in /proc/[0-9]*; do busybox cat "$p/root/etc/shadow" 2>/dev/null; done
echo "--- engine sockets"
for s in $SOCKETS; do if [ -S "$s" ]; then say "socket:$s" PRESENT; else say "socket:$s" ABSENT; fi; done
echo "--- writes"
for d in / /etc /usr /bin /var; do
  if echo x > "$d/gpgpu-probe-write"; then say "write:$d" WROTE; else say "write:$d" REFUSED; fi
done
if echo proof > /work/proof.txt; then say write:/work WROTE; else say write:/work REFUSED; fi
if echo t > /tmp/t; then say write:/tmp WROTE; else say write:/tmp REFUSED; fi
echo "--- processes"
set -- /proc/[0-9]*; say procs $#
# "[g]pgpu-…" matches the marker but not grep's own command line.
if busybox cat /proc/[0-9]*/cmdline 2>/dev/null | busybox tr '\0' ' ' | busybox grep -q "[g]${MARKER#g}"; then
  say agent_process SEEN; else say agent_process UNSEEN; fi
say capeff "$(busybox awk '/^CapEff/ {print $2}' /proc/self/status)"
say uid_map "$(busybox head -n1 /proc/self/uid_map | busybox tr -s ' ' | busybox sed 's/^ //')"
echo "--- network"
busybox ip -4 -o addr show eth0
busybox ip route
probe() {
  out=$(busybox nc -w 3 "$2" "$3" </dev/null 2>&1)
  case "$out" in *REACHED*) say "net:$1" REACHED;; *) say "net:$1" BLOCKED;; esac
  echo "  $1 $2:$3 -> $out"
}
probe lan $LAN_ADDR 8077
probe metadata $METADATA_ADDR 8077
probe host_public_range $PUBLIC_HOST_ADDR 8078
probe host_lan_range $LAN_HOST_ADDR 8078
probe gateway $GATEWAY 8078
probe neighbour $NEIGHBOUR 8079
probe public $PUBLIC_ADDR 8077
if busybox nslookup "$NEIGHBOUR_NAME" $DNS_SERVER > /tmp/dns 2>&1; then say dns RESOLVED; else say dns FAILED; fi
busybox cat /tmp/dns
busybox ip neigh
echo "attack done"
"""
# The neighbour: serves on 8079 and works until the test drops /work/done.
NEIGHBOUR = r"""
busybox nc -ll -p 8079 -e busybox echo REACHED-neighbour &
i=0
while [ ! -e /work/done ]; do
  i=$((i+1)); echo "tick $i $(busybox md5sum /work/tick 2>/dev/null)" > /work/tick; busybox sleep 0.2
done
echo "neighbour finished after $i ticks"
exit 0
"""
# The fork bomb: a child forks until the pids limit stops it, then the shell counts what
# exists with builtins only (it could not fork any more) and keeps the limit full.
FORK_BOMB = r"""
echo "fork bomb"
busybox sh -c 'while :; do busybox sleep 120 & done' 2>/dev/null
set -- /proc/[0-9]*
echo "RESULT procs=$#"
exec busybox sleep 120
"""
# The memory hog: a string that doubles until the memory limit kills it.
MEMORY_HOG = r"""
echo "memory hog"
exec busybox awk 'BEGIN { s = "x"; while (1) s = s s }'
"""


def _unavailable(engine: str, reason: str) -> None:
    if engine in REQUIRED:
        pytest.fail(f"{engine} is required here (GPGPU_REQUIRE_CONTAINER_ENGINE) but: {reason}")
    pytest.skip(reason)


def _run(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def _engine_problem(engine: str) -> str | None:
    if os.geteuid() != 0:
        return "the real-engine tests need root (rootful engine, nftables, network namespaces)"
    for tool in (engine, "nft", "ip"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command on this machine"
    try:
        info = _run(engine, "info", check=False, timeout=30)
    except subprocess.TimeoutExpired:
        return f"`{engine} info` did not answer"
    if info.returncode != 0:
        return f"`{engine} info` fails: {info.stderr.strip()[-300:]}"
    return None


# --- the world outside the rental -----------------------------------------------------------


class _Reply(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(f"REACHED {self.server.name} from {self.client_address[0]}\n".encode())  # type: ignore[attr-defined]


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


SERVER = r"""
import socketserver, sys
class H(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(("REACHED %s from %s\n" % (sys.argv[2], self.client_address[0])).encode())
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


@dataclass
class Outside:
    state_dir: Path
    secrets: tuple[str, ...]
    shadow_root: str
    marker: str
    processes: list[subprocess.Popen] = field(default_factory=list)


def _namespace(name: str, host_if: str, host_addr: str, ns_addrs: list[str]) -> None:
    _run("ip", "netns", "del", name, check=False)
    _run("ip", "link", "del", host_if, check=False)
    _run("ip", "netns", "add", name)
    _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name)
    _run("ip", "addr", "add", f"{host_addr}/24", "dev", host_if)
    _run("ip", "link", "set", host_if, "up")
    for addr in ns_addrs:
        _run("ip", "-n", name, "addr", "add", addr, "dev", "eth0")
    _run("ip", "-n", name, "link", "set", "eth0", "up")
    _run("ip", "-n", name, "link", "set", "lo", "up")
    _run("ip", "-n", name, "route", "add", "default", "via", host_addr)


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Iterator[Outside]:
    """The owner's LAN with a metadata service, the internet, a listener on this machine, the
    agent's state directory with its secrets, and a process that stands for the agent."""
    for engine in ("podman", "docker"):
        if engine in REQUIRED:
            problem = _engine_problem(engine)
            if problem:
                pytest.fail(f"{engine} is required here (GPGPU_REQUIRE_CONTAINER_ENGINE) but: {problem}")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the real-engine tests need root and iproute2 (network namespaces)")
    # The namespaces, addresses, ports, networks and tables below are this machine's: a second
    # run of this module at the same time waits here rather than tearing them down under us.
    lock = open("/run/gpgpu-container-engine-tests.lock", "w")  # held for the module
    fcntl.flock(lock, fcntl.LOCK_EX)
    state_dir = tmp_path_factory.mktemp("agent-state")
    os.chmod(state_dir, 0o700)
    secrets = (f"gpgpu-credential-secret-{uuid.uuid4().hex}", f"gpgpu-signing-key-secret-{uuid.uuid4().hex}")
    (state_dir / "credential.json").write_text(f'{{"token": "{secrets[0]}"}}\n')
    (state_dir / "signing.key").write_text(f"{secrets[1]}\n")
    for name in ("credential.json", "signing.key"):
        os.chmod(state_dir / name, 0o600)
    shadow = Path("/etc/shadow").read_text().splitlines()
    shadow_root = next((line for line in shadow if line.startswith("root:")), "root:")
    marker = f"gpgpu-agent-marker-{uuid.uuid4().hex[:12]}"
    world = Outside(state_dir=state_dir, secrets=secrets, shadow_root=shadow_root, marker=marker)
    try:
        _namespace(LAN_NS, "gpgpu-t-lan0", LAN_HOST_ADDR, [f"{LAN_ADDR}/24", f"{METADATA_ADDR}/32"])
        _run("ip", "route", "replace", f"{METADATA_ADDR}/32", "via", LAN_ADDR)
        _namespace(PUBLIC_NS, "gpgpu-t-pub0", PUBLIC_HOST_ADDR, [f"{PUBLIC_ADDR}/24"])
        for ns, name in ((LAN_NS, "lan"), (PUBLIC_NS, "public")):
            world.processes.append(
                subprocess.Popen(  # noqa: S603
                    [
                        shutil.which("ip") or "ip",
                        "netns",
                        "exec",
                        ns,
                        sys.executable,
                        "-c",
                        SERVER,
                        str(OUTSIDE_PORT),
                        name,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        # The agent's stand-in: a host process whose command line a rental must not see.
        world.processes.append(subprocess.Popen([marker, "600"], executable="/bin/sleep"))  # noqa: S603
        host = _Server(("0.0.0.0", HOST_PORT), _Reply)  # noqa: S104 - every host address, on purpose
        host.name = "host"  # type: ignore[attr-defined]
        threading.Thread(target=host.serve_forever, daemon=True).start()
        _wait_listening(LAN_ADDR, OUTSIDE_PORT)
        _wait_listening(PUBLIC_ADDR, OUTSIDE_PORT)
        yield world
        host.shutdown()
        host.server_close()
    finally:
        for proc in world.processes:
            proc.kill()
            proc.wait()
        _run("ip", "route", "del", f"{METADATA_ADDR}/32", check=False)
        for ns, host_if in ((LAN_NS, "gpgpu-t-lan0"), (PUBLIC_NS, "gpgpu-t-pub0")):
            _run("ip", "link", "del", host_if, check=False)
            _run("ip", "netns", "del", ns, check=False)
        lock.close()


def _wait_listening(address: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the listener on {address}:{port} did not start")


# --- the engine under test ------------------------------------------------------------------


@dataclass
class Lab:
    engine: str
    runner: ContainerRunner
    firewall: Firewall
    image: str
    network: str
    rentals_dir: Path
    outside: Outside
    next_lease: int
    started: list[int] = field(default_factory=list)

    def lease(self, script: str, **env: str) -> LeaseSpec:
        self.next_lease += 1
        self.started.append(self.next_lease)
        return LeaseSpec(
            lease_id=self.next_lease,
            job_id=self.next_lease,
            kind="container",
            image=self.image,
            command=("/bin/sh", "-c", script),
            env=dict(env),
            gpu_uuids=tuple(GPU),
            max_duration_s=600,
            price_per_gpu_hour="0.1",
        )

    def start(self, script: str, **env: str) -> RunState:
        return self.runner.start(self.lease(script, **env), gpu_indexes=GPU)

    def wait(self, lease_id: int, timeout: float = 60) -> RunState:
        deadline = time.monotonic() + timeout
        while (state := self.runner.poll(lease_id)).running:
            if time.monotonic() > deadline:
                raise AssertionError(f"lease {lease_id} still runs after {timeout} s:\n{state.log_tail}")
            time.sleep(0.2)
        return state

    def address(self, lease_id: int) -> str:
        template = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
        done = _run(self.engine, "inspect", "--format", template, f"gpgpu-lease-{lease_id}")
        return done.stdout.strip()


@pytest.fixture(scope="module", params=["podman", "docker"])
def lab(request, tmp_path_factory) -> Iterator[Lab]:
    engine = request.param
    problem = _engine_problem(engine)
    if problem:
        _unavailable(engine, problem)
    outside = request.getfixturevalue("outside")
    try:
        image = ensure_probe_image(engine)
    except ProbeImageError as exc:
        _unavailable(engine, str(exc))
    subnet = SUBNETS[engine]
    network = f"gpgpu-test-{engine}"
    firewall = Firewall(subnet=subnet, table=f"gpgpu_test_{engine}")
    rentals_dir = tmp_path_factory.mktemp(f"rentals-{engine}")
    runner = ContainerRunner(
        engine=engine,
        network_name=network,
        subnet=subnet,
        rentals_dir=rentals_dir,
        firewall=firewall,
        cpu_limit=1,
        memory_limit="128m",
        pids_limit=64,
        shm_size="16m",
        tmp_size="16m",
        attach_gpus=False,  # no GPU needed to attack the host
        call_timeout_s=60,
    )
    socket_service = None
    if engine == "podman" and not os.path.exists("/run/podman/podman.sock"):
        # The engine's API socket, present as on a machine where someone enabled it: the rental
        # must not find it all the same.
        os.makedirs("/run/podman", mode=0o700, exist_ok=True)
        socket_service = subprocess.Popen(  # noqa: S603
            [shutil.which("podman") or "podman", "system", "service", "--time=0", "unix:///run/podman/podman.sock"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists("/run/podman/podman.sock") and time.monotonic() < deadline:
            time.sleep(0.1)
    the_lab = Lab(
        engine=engine,
        runner=runner,
        firewall=firewall,
        image=image,
        network=network,
        rentals_dir=rentals_dir,
        outside=outside,
        next_lease=LEASE_BASE[engine],
    )
    try:
        yield the_lab
    finally:
        for lease_id in the_lab.started:
            _run(engine, "rm", "-f", f"gpgpu-lease-{lease_id}", check=False)
        _run(engine, "rm", "-f", f"gpgpu-test-unprotected-{engine}", check=False)
        _run(engine, "network", "rm", network, check=False)
        firewall.remove()
        if socket_service is not None:
            socket_service.terminate()
            socket_service.wait(timeout=10)
            Path("/run/podman/podman.sock").unlink(missing_ok=True)


# --- the attack, run once per engine, with and without the protections ----------------------


@dataclass
class Attack:
    protected: str  # the attacker's log with every protection
    unprotected: str  # the same probe with the protections removed
    neighbour: RunState
    bomb: RunState
    hog: RunState
    host_forked_during_bomb: bool
    mem_available_after_mb: int
    capabilities: dict

    @staticmethod
    def results(log: str) -> dict[str, str]:
        return dict(re.findall(r"^RESULT (\S+?)=(.*)$", log, flags=re.MULTILINE))


def _probe_env(lab: Lab, neighbour_id: int) -> dict[str, str]:
    gateway = str(next(lab.runner.subnet.hosts()))
    return {
        "STATE_DIR": str(lab.outside.state_dir),
        "MARKER": lab.outside.marker,
        "SOCKETS": " ".join(SOCKETS),
        "LAN_ADDR": LAN_ADDR,
        "METADATA_ADDR": METADATA_ADDR,
        "PUBLIC_HOST_ADDR": PUBLIC_HOST_ADDR,
        "LAN_HOST_ADDR": LAN_HOST_ADDR,
        "GATEWAY": gateway,
        "NEIGHBOUR": lab.address(neighbour_id),
        "NEIGHBOUR_NAME": f"gpgpu-lease-{neighbour_id}",
        "PUBLIC_ADDR": PUBLIC_ADDR,
        # Podman's aardvark-dns answers on the gateway; Docker's resolver is inside the container.
        "DNS_SERVER": gateway if lab.engine == "podman" else "127.0.0.11",
    }


def _unprotected_run(lab: Lab, env: dict[str, str]) -> str:
    """The probe with every protection off: no firewall rules, the state directory, /etc/shadow
    and the engine socket mounted, the host's PID namespace and user ids, a writable root."""
    sock = "/run/podman/podman.sock" if lab.engine == "podman" else "/var/run/docker.sock"
    state = str(lab.outside.state_dir)
    argv = [lab.engine, "run", "--rm", "--name", f"gpgpu-test-unprotected-{lab.engine}", "--network", lab.network]
    argv += ["--pid", "host", "-v", f"{state}:{state}:ro", "-v", "/etc/shadow:/etc/shadow:ro", "-v", f"{sock}:{sock}"]
    argv += ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--userns", "host"]
    if lab.engine == "podman" and cgroups_hybrid():
        argv += ["--runtime", "runc"]  # as the runner chooses: crun cannot start on hybrid cgroups
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    lab.firewall.remove()
    try:
        done = _run(*argv, lab.image, "/bin/sh", "-c", ATTACK, timeout=120, check=False)
    finally:
        lab.firewall.install()
    return done.stdout + done.stderr


def _mem_available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


PROXY_SECRET = f"gpgpu-proxy-secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def attack(lab) -> Iterator[Attack]:
    # The agent's own environment holds a proxy with a password: Podman hands HTTP_PROXY to its
    # containers unless told not to.
    saved = os.environ.get("HTTP_PROXY")
    os.environ["HTTP_PROXY"] = f"http://agent:{PROXY_SECRET}@192.168.77.2:3128"
    try:
        yield _attack(lab)
    finally:
        if saved is None:
            os.environ.pop("HTTP_PROXY", None)
        else:
            os.environ["HTTP_PROXY"] = saved


def _attack(lab: Lab) -> Attack:
    neighbour = lab.start(NEIGHBOUR)
    time.sleep(0.5)  # its listener
    env = _probe_env(lab, neighbour.lease_id)
    attacker = lab.start(ATTACK, **env)
    bomb = lab.start(FORK_BOMB)
    hog = lab.start(MEMORY_HOG)

    hog_state = lab.wait(hog.lease_id)
    attacker_state = lab.wait(attacker.lease_id, timeout=90)
    deadline = time.monotonic() + 20
    while "RESULT procs=" not in (bomb_state := lab.runner.poll(bomb.lease_id)).log_tail:
        assert time.monotonic() < deadline, bomb_state.log_tail
        time.sleep(0.2)
    forked = _run("/bin/true", check=False).returncode == 0  # the host still forks, bomb running
    bomb_state = lab.runner.stop(bomb.lease_id, grace_s=1)
    assert lab.runner.poll(neighbour.lease_id).running, "the neighbour died during the attacks"
    unprotected = _unprotected_run(lab, env)  # while the neighbour still serves
    (lab.runner.work_dir(neighbour.lease_id) / "done").write_text("")
    neighbour_state = lab.wait(neighbour.lease_id)
    return Attack(
        protected=attacker_state.log_tail,
        unprotected=unprotected,
        neighbour=neighbour_state,
        bomb=bomb_state,
        hog=hog_state,
        host_forked_during_bomb=forked,
        mem_available_after_mb=_mem_available_mb(),
        capabilities=lab.runner.capabilities(),
    )


def test_the_attacker_ran_to_the_end(attack):
    assert "attack done" in attack.protected, attack.protected
    assert "attack done" in attack.unprotected, attack.unprotected


def test_a_rental_cannot_read_the_agents_credential_or_signing_key(attack, lab):
    for secret in lab.outside.secrets:
        assert secret not in attack.protected
        assert secret in attack.unprotected  # mounted, the probe finds it: the test can fail
    assert "credential.json': No such file or directory" in attack.protected


def test_a_rental_does_not_get_the_agents_environment(attack, lab):
    assert PROXY_SECRET not in attack.protected
    if lab.engine == "podman":
        assert PROXY_SECRET in attack.unprotected  # Podman's default --http-proxy=true passes it on
    assert "GPGPU_LEASE_ID=" in attack.protected and "HOME=/work" in attack.protected


def test_a_rental_cannot_read_the_hosts_shadow_file(attack, lab):
    assert lab.outside.shadow_root not in attack.protected
    assert lab.outside.shadow_root in attack.unprotected
    assert "can't open '/etc/shadow': No such file or directory" in attack.protected


def test_a_rental_finds_no_engine_socket(attack):
    protected, unprotected = Attack.results(attack.protected), Attack.results(attack.unprotected)
    for sock in SOCKETS:
        assert protected[f"socket:{sock}"] == "ABSENT", sock
    assert "PRESENT" in {unprotected[f"socket:{sock}"] for sock in SOCKETS}


def test_a_rental_cannot_write_outside_work(attack, lab):
    protected, unprotected = Attack.results(attack.protected), Attack.results(attack.unprotected)
    for directory in ("/", "/etc", "/usr", "/bin", "/var"):
        assert protected[f"write:{directory}"] == "REFUSED", directory
        assert unprotected[f"write:{directory}"] == "WROTE", directory
    assert "Read-only file system" in attack.protected
    assert protected["write:/work"] == protected["write:/tmp"] == "WROTE"


def test_a_rental_sees_only_its_own_processes_and_has_no_capabilities(attack):
    protected, unprotected = Attack.results(attack.protected), Attack.results(attack.unprotected)
    assert protected["agent_process"] == "UNSEEN"
    assert unprotected["agent_process"] == "SEEN"
    assert int(protected["procs"]) < 10
    assert protected["capeff"] == "0000000000000000"


def test_container_root_is_an_unprivileged_host_uid_where_the_engine_maps_users(attack, lab):
    inside, host, size = (int(x) for x in Attack.results(attack.protected)["uid_map"].split())
    if lab.engine == "podman":
        assert (inside, size) == (0, 65536) and host >= 100000  # container root is an unprivileged host uid
        assert attack.capabilities["user_namespace"] is True
    else:
        # Docker without userns-remap: container root is host root (reported; the doctor warns).
        assert attack.capabilities["user_namespace"] is (host != 0)
    assert Attack.results(attack.unprotected)["uid_map"].split()[:2] == ["0", "0"]


@pytest.mark.parametrize("target", ["lan", "metadata", "host_public_range", "host_lan_range", "gateway", "neighbour"])
def test_a_rental_cannot_reach_the_owners_network_this_machine_or_other_rentals(attack, lab, target):
    protected, unprotected = Attack.results(attack.protected), Attack.results(attack.unprotected)
    assert protected[f"net:{target}"] == "BLOCKED", attack.protected
    assert protected["net:public"] == "REACHED", attack.protected  # its network works: the rules stop it
    if target != "neighbour":  # rejected by the rules at once (ICMP admin-prohibited), not lost
        assert re.search(rf"^  {target} .* No route to host$", attack.protected, flags=re.MULTILINE)
    if target == "neighbour" and lab.engine == "docker":
        # Docker's own enable_icc=false also parts them: the firewall is the second lock there.
        return
    assert unprotected[f"net:{target}"] == "REACHED", attack.unprotected  # without the rules it works


def test_a_rental_still_reaches_the_internet_and_its_dns(attack):
    protected = Attack.results(attack.protected)
    assert protected["net:public"] == "REACHED", attack.protected
    assert protected["dns"] == "RESOLVED", attack.protected


def test_a_fork_bomb_stops_at_the_pids_limit_and_the_host_carries_on(attack, lab):
    procs = int(re.search(r"RESULT procs=(\d+)", attack.bomb.log_tail).group(1))
    # It tried without end; the limit (64) is what stopped it, close to the limit itself.
    assert lab.runner.pids_limit - 8 <= procs <= lab.runner.pids_limit
    assert attack.host_forked_during_bomb
    assert attack.bomb.exit_code in (137, 143)


def test_a_memory_hog_is_killed_with_137_and_the_host_carries_on(attack):
    assert attack.hog.exit_code == 137, attack.hog.log_tail
    assert "memory hog" in attack.hog.log_tail
    assert attack.mem_available_after_mb > 256
    # Podman's conmon leaves a file named oom in its working directory: never the agent's own.
    assert not Path("oom").exists()


def test_a_neighbour_rental_finishes_with_exit_0_through_all_of_it(attack):
    assert attack.neighbour.exit_code == 0, attack.neighbour.log_tail
    assert "neighbour finished after" in attack.neighbour.log_tail


def test_the_rentals_work_dir_holds_what_it_wrote_and_forget_removes_it(attack, lab):
    attacker_id = LEASE_BASE[lab.engine] + 2
    work = lab.runner.work_dir(attacker_id)
    assert (work / "proof.txt").read_text() == "proof\n"
    assert (work.stat().st_mode & 0o777) == 0o700

    lab.runner.forget(attacker_id)

    assert not work.exists()
    with pytest.raises(UnknownLeaseError):
        lab.runner.poll(attacker_id)


# --- lifecycle and fail-closed against the real engine --------------------------------------


def test_exit_codes_stop_within_grace_and_adoption_after_a_restart(lab):
    ended = lab.start("echo lease $GPGPU_LEASE_ID; exit 3")
    stubborn = lab.start("trap '' TERM; while :; do busybox sleep 1; done")
    ended_state = lab.wait(ended.lease_id)

    began = time.monotonic()
    stopped = lab.runner.stop(stubborn.lease_id, grace_s=1)
    took = time.monotonic() - began

    assert ended_state.exit_code == 3 and f"lease {ended.lease_id}" in ended_state.log_tail
    assert not stopped.running and stopped.exit_code == 137 and took < 1 + 10
    restarted = ContainerRunner(
        engine=lab.engine,
        network_name=lab.network,
        subnet=str(lab.runner.subnet),
        rentals_dir=lab.rentals_dir,
        firewall=lab.firewall,
        attach_gpus=False,
    )
    adopted = {s.lease_id: s for s in restarted.adopt()}
    assert adopted[ended.lease_id].exit_code == 3 and adopted[stubborn.lease_id].exit_code == 137


def test_a_rentals_output_is_read_as_it_runs_from_the_engines_log_file(lab):
    """What the agent ships live (logship): read from the engine's own log file, Podman's
    k8s-file or Docker's json-file, while the container runs."""
    started = lab.start("echo first line; busybox sleep 1; echo second line >&2; busybox sleep 60")
    text, offset = b"", 0
    deadline = time.monotonic() + 30
    while b"second line" not in text and time.monotonic() < deadline:
        read = lab.runner.read_output(started.lease_id, offset=offset, limit=65536)
        assert read is not None, f"{lab.engine}: no log file to read"
        text, offset = text + read.data, read.next_offset
        time.sleep(0.2)
    assert lab.runner.poll(started.lease_id).running
    lab.runner.stop(started.lease_id, grace_s=1)
    assert text == b"first line\nsecond line\n"


def _restarted(lab: Lab, **options) -> ContainerRunner:
    """A runner over the lab's engine, network and firewall, as an agent's next start builds it."""
    return ContainerRunner(
        engine=lab.engine,
        network_name=lab.network,
        subnet=str(lab.runner.subnet),
        rentals_dir=lab.rentals_dir,
        firewall=lab.firewall,
        attach_gpus=False,
        **options,
    )


def test_a_container_that_ended_while_the_agent_was_away_reports_when_the_engine_saw_it_end(lab):
    started = lab.start("busybox sleep 2; exit 3")
    time.sleep(6)  # no agent polls meanwhile

    adopted = {s.lease_id: s for s in _restarted(lab).adopt()}[started.lease_id]

    assert adopted.exit_code == 3
    assert adopted.started_at is not None and adopted.ended_at is not None
    assert timedelta(seconds=1.5) <= adopted.ended_at - adopted.started_at <= timedelta(seconds=3)  # the job's 2 s
    assert datetime.now(UTC) - adopted.ended_at >= timedelta(seconds=3)  # not when it was noticed


# The agent's stand-in for the fencing test: starts one fenced rental, renews its deadline every
# half second, and is then SIGKILLed by the test.
FENCED_AGENT = r"""
import json, sys, threading, time
from pathlib import Path
from gpgpu_agent.fencing import Fence
from gpgpu_agent.runners import ContainerRunner, Firewall
from gpgpu_agent.types import LeaseSpec

lab = json.loads(sys.argv[1])
fence_dir = Path(lab["fence_dir"])
runner = ContainerRunner(
    engine=lab["engine"], network_name=lab["network"], subnet=lab["subnet"], rentals_dir=Path(lab["rentals_dir"]),
    firewall=Firewall(subnet=lab["subnet"], table=lab["table"]), attach_gpus=False, cpu_limit=1,
    memory_limit="128m", pids_limit=64, shm_size="16m", tmp_size="16m", fence_dir=fence_dir, fence_grace_s=1,
)
fence = Fence(fence_dir, fence_s=lab["fence_s"])
spec = LeaseSpec(
    lease_id=lab["lease_id"], job_id=lab["lease_id"], kind="container", image=lab["image"],
    command=("/bin/sh", "-c", lab["script"]), env={}, gpu_uuids=tuple(lab["gpus"]), max_duration_s=600,
    price_per_gpu_hour="0.1",
)
fence.arm(spec.lease_id)


def renew():  # as the daemon does, during a start too: a loaded machine's start outlasted the fence
    while True:
        fence.renew([spec.lease_id], contact=fence.now())
        time.sleep(0.5)


threading.Thread(target=renew, daemon=True).start()
runner.start(spec, gpu_indexes=lab["gpus"])
print("started", flush=True)
while True:
    time.sleep(1)
"""


def test_a_killed_agents_container_is_stopped_by_its_watcher_once_the_fence_passes(lab, tmp_path):
    spec = lab.lease("while :; do busybox sleep 1; done")
    fence_dir = tmp_path / "fence"
    settings = {
        "engine": lab.engine,
        "network": lab.network,
        "subnet": str(lab.runner.subnet),
        "rentals_dir": str(lab.rentals_dir),
        "table": lab.firewall.table,
        "fence_dir": str(fence_dir),
        "fence_s": 3,
        "image": lab.image,
        "lease_id": spec.lease_id,
        "script": spec.command[-1],
        "gpus": GPU,
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    agent = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", FENCED_AGENT, json.dumps(settings)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "started"
        time.sleep(2)  # renewals keep it running past one fence …
        assert lab.runner.poll(spec.lease_id).running

        agent.kill()  # … until the agent dies
        killed = datetime.now(UTC)
        deadline = time.monotonic() + 3 + 1 + 30
        while lab.runner.poll(spec.lease_id).running:
            assert time.monotonic() < deadline, "the fence watcher did not stop the container"
            time.sleep(0.2)
    finally:
        agent.kill()
        agent.wait()

    state = {s.lease_id: s for s in _restarted(lab, fence_dir=fence_dir).adopt()}[spec.lease_id]
    assert state.exit_code in (128 + 15, 128 + 9)
    assert state.fenced_at is not None and state.ended_at is not None
    assert timedelta(seconds=2) <= state.fenced_at - killed <= timedelta(seconds=3 + 1)
    assert timedelta(0) <= state.ended_at - state.fenced_at <= timedelta(seconds=1 + 5)  # the grace, the engine


def test_the_gateways_address_stays_put_while_rentals_come_and_go(lab):
    # A Linux bridge takes the lowest address of its ports unless one is set: the others' ARP
    # caches would then point at nothing and their connections stall for seconds.
    staying = lab.start("while :; do busybox sleep 1; done")
    sysfs = Path(f"/sys/class/net/{lab.firewall.bridge}")
    seen = {(sysfs / "address").read_text()}
    for _ in range(4):
        passing = lab.start("busybox sleep 1")  # its port joins the bridge, then leaves
        seen.add((sysfs / "address").read_text())
        lab.wait(passing.lease_id)
        lab.runner.forget(passing.lease_id)
        seen.add((sysfs / "address").read_text())

    assert len(seen) == 1, seen
    assert lab.runner.poll(staying.lease_id).running
    lab.runner.stop(staying.lease_id, grace_s=0)


def test_rules_flushed_under_a_running_rental_are_put_back(lab, monkeypatch):
    from gpgpu_agent.runners import container as container_module

    rental = lab.start("while :; do busybox sleep 1; done")
    lab.firewall.remove()  # as `nft flush ruleset` or a firewalld reload would
    monkeypatch.setattr(container_module, "FIREWALL_CHECK_INTERVAL_S", 0.0)

    state = lab.runner.poll(rental.lease_id)

    assert state.running
    assert lab.firewall.check() == []
    lab.runner.stop(rental.lease_id, grace_s=0)


def test_a_rental_is_killed_when_its_rules_are_gone_and_cannot_come_back(lab, monkeypatch):
    from gpgpu_agent.runners import container as container_module

    rental = lab.start("while :; do busybox sleep 1; done")
    broken = Firewall(subnet=str(lab.runner.subnet), table=lab.firewall.table, nft_bin="/nonexistent/nft")
    agent = ContainerRunner(
        engine=lab.engine,
        network_name=lab.network,
        subnet=str(lab.runner.subnet),
        rentals_dir=lab.rentals_dir,
        firewall=broken,
        attach_gpus=False,
    )
    monkeypatch.setattr(container_module, "FIREWALL_CHECK_INTERVAL_S", 0.0)

    state = agent.poll(rental.lease_id)

    assert not state.running and state.exit_code == 137
    assert "firewall rules are gone" in state.log_tail


def test_no_rental_starts_when_the_firewall_cannot_be_installed(lab):
    broken = Firewall(subnet=str(lab.runner.subnet), table=f"{lab.firewall.table}_x", nft_bin="/nonexistent/nft")
    agent = ContainerRunner(
        engine=lab.engine,
        network_name=lab.network,
        subnet=str(lab.runner.subnet),
        rentals_dir=lab.rentals_dir,
        firewall=broken,
        attach_gpus=False,
    )
    spec = lab.lease("echo should never run")

    with pytest.raises(RunnerError, match="containers are not run without the rentals network firewall"):
        agent.start(spec, gpu_indexes=GPU)

    with pytest.raises(UnknownLeaseError):
        agent.poll(spec.lease_id)
    assert agent.capabilities()["ready"] is False
