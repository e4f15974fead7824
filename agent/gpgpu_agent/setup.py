"""`gpgpu-agent setup`: prepare this machine, as root, so rentals stay in their sandboxes.

Idempotent; each step prints one line (`done`, `ok` when nothing had to change, or `FAIL` with
what to do), and the exit status is 1 when a step failed:

1. the **rental user** (``process_user``, default ``gpgpu-rental``): a system account with no
   home, no shell and no groups, that process jobs run as;
2. the **state directory**, root's and 0700 (the credential, the signing key, the spool, the
   leases' records and logs), and the **rentals directory**, 0711 (each lease's work directory
   is 0700 and the rental user's; the rental user may pass through, nobody may list it);
3. **subordinate ids** for Podman's ``--userns=auto`` (``containers`` in /etc/subuid and
   /etc/subgid), so every container runs under host uids of its own, not root's;
4. Podman's **network backend**: netavark, with aardvark-dns answering rentals' DNS on their
   network's gateway (where the egress firewall lets DNS through); Podman keeps the older CNI
   backend on a machine that already has images, so a drop-in names netavark;
5. the **rentals' network and egress firewall** (when containers are enabled with the
   ``filtered`` network): the engine's network for rentals and the nftables rules that keep its
   containers off the owner's network (see ``runners.firewall``);
6. a check that **bubblewrap** can build a sandbox here (process jobs need it).

It installs no package: on Debian/Ubuntu ``apt install bubblewrap podman netavark aardvark-dns
nftables uidmap``
(docs/security.md lists the steps for other systems).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from gpgpu_agent.config import AgentConfig
from gpgpu_agent.protocols import AgentError

SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
# Podman's --userns=auto takes ranges from the "containers" entry: 2^31 ids above 2^31, far from
# any real account's.
SUBID_LINE = "containers:2147483647:2147483648"

Step = Callable[[AgentConfig], tuple[str, str]]


class SetupError(AgentError):
    pass


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"cannot run {argv[0]}: {exc}") from None


def step_rental_user(config: AgentConfig) -> tuple[str, str]:
    name = config.process_user
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        entry = None
    if entry is not None:
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise SetupError(f"the user {name!r} exists and is root or in root's group; choose another process_user")
        groups = [g.gr_name for g in grp.getgrall() if name in g.gr_mem]
        if groups:
            raise SetupError(
                f"the user {name!r} belongs to the groups {', '.join(groups)}; a rental user must belong to none "
                "(remove it from them, or choose another process_user)"
            )
        return "ok", f"user {name} (uid {entry.pw_uid}) exists, in no other group"
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    done = _run(
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "GPGPU rentals (process jobs)",
            name,
        ]
    )
    if done.returncode != 0:
        raise SetupError(f"useradd failed: {done.stderr.strip() or done.returncode}")
    return "done", f"created the system user {name} (uid {pwd.getpwnam(name).pw_uid})"


def step_directories(config: AgentConfig) -> tuple[str, str]:
    state, rentals = config.state_dir, config.rentals_path
    if rentals.resolve().is_relative_to(state.resolve()):
        raise SetupError(
            f"rentals_dir {rentals} is inside the state directory {state}, which must stay 0700; move it out"
        )
    changed = []
    for path, mode in ((state, 0o700), (rentals, 0o711)):
        if not path.is_dir():
            path.mkdir(parents=True, mode=mode)
            changed.append(f"created {path}")
        st = path.stat()
        if st.st_uid != os.geteuid():
            os.chown(path, os.geteuid(), os.getegid())
            changed.append(f"{path} now belongs to the agent")
        if st.st_mode & 0o777 != mode:
            os.chmod(path, mode)
            changed.append(f"{path} mode {mode:o}")
    words = f"state {state} (0700), rentals {rentals} (0711)"
    return ("done", f"{words}: {', '.join(changed)}") if changed else ("ok", words)


def step_subids(config: AgentConfig) -> tuple[str, str]:
    if config.container_engine in ("none", "docker"):
        return "ok", f"not needed (container_engine = {config.container_engine})"
    added = []
    for path in SUBID_FILES:
        text = path.read_text() if path.exists() else ""
        if any(line.split(":", 1)[0] == "containers" for line in text.splitlines()):
            continue
        with path.open("a", encoding="ascii") as f:
            if text and not text.endswith("\n"):
                f.write("\n")
            f.write(SUBID_LINE + "\n")
        added.append(str(path))
    if added:
        return "done", f"added {SUBID_LINE!r} to {', '.join(added)} (podman --userns=auto)"
    return "ok", "subordinate ids for containers are set (podman --userns=auto)"


# A containers.conf drop-in (Podman reads every *.conf there, after containers.conf).
PODMAN_CONF_D = Path("/etc/containers/containers.conf.d")
NETWORK_BACKEND_CONF = "gpgpu-network.conf"
NETAVARK_DIRS = ("/usr/libexec/podman", "/usr/lib/podman", "/usr/local/libexec/podman", "/usr/local/lib/podman")


def _podman_used(config: AgentConfig) -> bool:
    if config.simulate or config.container_engine in ("none", "docker"):
        return False
    return config.container_engine == "podman" or shutil.which("podman") is not None


def step_network_backend(
    config: AgentConfig, *, conf_d: Path = PODMAN_CONF_D, helper_dirs: tuple[str, ...] = NETAVARK_DIRS
) -> tuple[str, str]:
    if not _podman_used(config):
        return "ok", "not needed (Podman is not the container engine here)"
    missing = [name for name in ("netavark", "aardvark-dns") if not any(Path(d, name).is_file() for d in helper_dirs)]
    if missing:
        raise SetupError(
            f"Podman needs {' and '.join(missing)} (rentals' network and its DNS): apt install netavark aardvark-dns"
        )
    target = conf_d / NETWORK_BACKEND_CONF
    wanted = '[network]\nnetwork_backend = "netavark"\n'
    if target.exists() and target.read_text() == wanted:
        return "ok", f"Podman uses netavark and aardvark-dns ({target})"
    conf_d.mkdir(parents=True, exist_ok=True)
    target.write_text(wanted)
    return "done", f"Podman set to netavark and aardvark-dns ({target})"


def step_network(config: AgentConfig) -> tuple[str, str]:
    if config.simulate or config.container_engine == "none":
        return "ok", "no container jobs here: no rentals network needed"
    if config.container_network == "none":
        return "ok", "containers get no network at all (container_network = none): no firewall needed"
    from gpgpu_agent.runners.container import ContainerRunner

    runner = ContainerRunner(
        engine=config.container_engine,
        runtime=config.container_runtime,
        network=config.container_network,
        rentals_dir=config.rentals_path,
    )
    return "done", runner.setup()


def step_sandbox(config: AgentConfig) -> tuple[str, str]:
    from gpgpu_agent.runners.sandbox import Bubblewrap, rental_user

    sandbox = Bubblewrap()
    user = rental_user(config.process_user)
    sandbox.probe(user)
    opt = "" if config.allow_process_jobs else " (process jobs stay off until allow_process_jobs = true)"
    return "ok", f"bubblewrap {sandbox.version_text} builds a sandbox as {user.name}{opt}"


STEPS: tuple[tuple[str, Step], ...] = (
    ("rental user", step_rental_user),
    ("directories", step_directories),
    ("subordinate ids", step_subids),
    ("podman network backend", step_network_backend),
    ("rentals network", step_network),
    ("process sandbox", step_sandbox),
)


def run_setup(config: AgentConfig, *, out: TextIO | None = None, steps: tuple[tuple[str, Step], ...] = STEPS) -> int:
    out = out or sys.stdout
    if os.geteuid() != 0:
        print("gpgpu-agent setup must run as root (it creates a user and firewall rules)", file=out)
        return 1
    failed = 0
    for name, step in steps:
        try:
            state, words = step(config)
        except AgentError as exc:
            state, words = "FAIL", str(exc)
            failed += 1
        print(f"{state:<4}  {name}: {words}", file=out)
    if failed:
        print(f"{failed} step(s) failed; fix them and run `gpgpu-agent setup` again.", file=out)
        return 1
    print("This machine is ready: run `gpgpu-agent doctor`, then start the agent.", file=out)
    return 0
