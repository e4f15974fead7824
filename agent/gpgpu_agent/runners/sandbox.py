"""The sandbox of a process job: bubblewrap (``bwrap``), run as a dedicated unprivileged user.

Why bubblewrap: it is the sandbox Flatpak is built on, packaged by every distribution
(``apt install bubblewrap``), small enough to audit (one C file), needs no daemon and no setuid
bit where unprivileged user namespaces are allowed, and exposes exactly the primitives this job
needs (namespaces, bind mounts from file descriptors, a fresh /dev and /proc). nsjail is not
packaged by Debian and brings its own config language; systemd-run's sandboxing needs systemd as
PID 1 and builds no private mount view from an empty root.

What a process job sees (``Bubblewrap.argv``):

- its own user, PID, IPC, UTS, cgroup and network namespaces: it sees only its own processes,
  has no network at all (``--unshare-net``: no route to the owner's LAN, to 169.254.169.254 or
  anywhere else), and may not create further user namespaces (``--disable-userns``);
- an empty root with, read-only: ``/usr`` (and the ``/bin``, ``/lib*`` links or directories),
  the few files of ``/etc`` that programs need to start (the loader's cache, TLS certificates,
  time zone), a ``/etc/passwd`` and ``/etc/group`` written for the sandbox, ``/sys``;
- a fresh ``/proc`` (its own processes only) and a fresh ``/dev`` (null, zero, random, tty, pts,
  shm) plus the device nodes of the leased GPUs and the control nodes CUDA needs
  (``/dev/nvidiactl``, ``/dev/nvidia-uvm``, ``/dev/nvidia-uvm-tools``), nothing else;
- one writable directory of the host, ``/work`` (its HOME and working directory), bind-mounted by
  the sandbox user through a directory it may pass through but not list (see the process
  runner); a private, size-limited ``/tmp`` and ``/dev/shm`` in memory (counted in the lease's
  memory limit); everything else, the sandbox's own root included, is read-only;
- no capability, ``no_new_privs`` (set by bwrap), a new session (no terminal to inject into), an
  environment built from nothing: only what the runner passes.

Nothing else of the host exists inside: not the agent's state directory (credential, signing
key, spool), not ``/home`` or ``/root``, not other leases' directories, not ``/run`` or
``/var/run`` (no container engine socket, no D-Bus), not the rest of ``/etc`` (no
``/etc/shadow``).

The user: the runner's supervisor drops to the dedicated rental user (``gpgpu-agent setup``
creates ``gpgpu-rental``) before it starts ``bwrap``, so even a sandbox escape lands in an
account that owns nothing. An agent that is not root cannot change user: the runner then refuses
process jobs, except in simulation (``--simulate``: the demo on a developer's own laptop), where
the sandbox runs as the agent's own user, still without any view of the agent's files.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpgpu_agent.protocols import AgentError

DEFAULT_RENTAL_USER = "gpgpu-rental"
WORK_DIR = "/work"
# The sandbox's private tmpfs (a path inside the sandbox, not the host's /tmp).
TMP_DIR = "/tmp"  # noqa: S108
# Host paths a job may read, when they exist: enough to run programs from /usr.
_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/localtime",
    "/etc/mime.types",
)
_TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# The nodes CUDA opens besides each GPU's own /dev/nvidia<minor>.
NVIDIA_CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


class SandboxError(AgentError):
    """Process jobs cannot be sandboxed here; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class SandboxUser:
    """The account process jobs run as (never root, never the agent's own)."""

    name: str
    uid: int
    gid: int


def rental_user(name: str = DEFAULT_RENTAL_USER) -> SandboxUser:
    """Look the rental user up; SandboxError when it is missing, root, or the agent's own user."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SandboxError(
            f"the user {name!r} that process jobs run as does not exist; run `gpgpu-agent setup` as root"
        ) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise SandboxError(f"the user {name!r} is root or in root's group; process jobs never run as root")
    if entry.pw_uid == os.geteuid():
        raise SandboxError(f"the user {name!r} is the agent's own user; process jobs need an account of their own")
    return SandboxUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


@dataclass(frozen=True, slots=True)
class LeaseView:
    """What one lease's sandbox is made of (file descriptors are the supervisor's, inherited)."""

    lease_id: int
    work_fd: int
    passwd_fd: int
    group_fd: int
    uid: int
    gid: int
    env: Mapping[str, str]
    command: Sequence[str]
    gpu_minors: Sequence[int]
    tmp_bytes: int


class Bubblewrap:
    """Builds ``bwrap`` command lines (see the module docstring) and checks bwrap works here."""

    def __init__(self, bwrap_bin: str = "bwrap", *, dev_root: Path = Path("/dev"), host_root: Path = Path("/")):
        found = shutil.which(bwrap_bin)
        if found is None:
            raise SandboxError(
                f"bubblewrap is not installed (no `{bwrap_bin}` command); install it (apt install bubblewrap) "
                "to allow process jobs"
            )
        self.bwrap = found
        self.dev_root = dev_root
        self.host_root = host_root
        self.version = self._version()
        if self.version < (0, 4, 0):
            raise SandboxError(f"bubblewrap {self.version_text} is too old; 0.4.0 or newer is needed")

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def _version(self) -> tuple[int, int, int]:
        try:
            done = subprocess.run(  # noqa: S603 - argv, no shell
                [self.bwrap, "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxError(f"cannot run {self.bwrap}: {exc}") from None
        m = _VERSION.search(done.stdout + done.stderr)
        if done.returncode != 0 or m is None:
            raise SandboxError(f"{self.bwrap} --version failed: {(done.stderr or done.stdout).strip()[:200]}")
        return int(m.group(1)), int(m.group(2)), int(m.group(3))

    def argv(self, view: LeaseView) -> list[str]:
        """The full ``bwrap … -- command`` argv for one lease."""
        args = [
            self.bwrap,
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",
            "--unshare-cgroup-try",
        ]
        if self.version >= (0, 8, 0):
            args.append("--disable-userns")
        args += [
            "--uid",
            str(view.uid),
            "--gid",
            str(view.gid),
            "--hostname",
            f"lease-{int(view.lease_id)}",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--clearenv",
        ]
        for name, value in view.env.items():
            args += ["--setenv", name, value]
        args += ["--ro-bind", "/usr", "/usr"]
        for name in _TOP_LEVEL:
            host = self.host_root / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                args += ["--ro-bind", str(host), f"/{name}"]
        for path in _ETC_FILES:
            if (self.host_root / path.lstrip("/")).exists():
                args += ["--ro-bind", path, path]
        args += [
            "--ro-bind-data",
            str(view.passwd_fd),
            "/etc/passwd",
            "--ro-bind-data",
            str(view.group_fd),
            "/etc/group",
            "--ro-bind",
            "/sys",
            "/sys",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
        ]
        for node in self._gpu_nodes(view.gpu_minors):
            args += ["--dev-bind", node, node]
        if self.version >= (0, 5, 0):
            args += ["--size", str(view.tmp_bytes)]
        args += ["--tmpfs", TMP_DIR, "--bind-fd", str(view.work_fd), WORK_DIR]
        # The root bwrap builds is a tmpfs the job would own: make it read-only once everything
        # is mounted, so only /work (and the private /tmp and /dev/shm, in memory) are writable.
        args += ["--remount-ro", "/", "--chdir", WORK_DIR, "--"]
        args += list(view.command)
        return args

    def _gpu_nodes(self, minors: Iterable[int]) -> list[str]:
        """The leased GPUs' device nodes and CUDA's control nodes that exist on this host."""
        wanted = [f"/dev/nvidia{int(m)}" for m in minors] + list(NVIDIA_CONTROL_NODES)
        return [node for node in wanted if (self.dev_root / node.removeprefix("/dev/")).exists()]

    def probe(self, user: SandboxUser | None) -> None:
        """Start an empty sandbox (as ``user`` when given) and check it runs; SandboxError with
        bwrap's own words when the kernel refuses (user namespaces disabled, AppArmor…)."""
        argv = [
            self.bwrap,
            "--unshare-user",
            "--unshare-pid",
            "--unshare-net",
            "--die-with-parent",
            "--ro-bind",
            "/usr",
            "/usr",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
        ]
        for name in _TOP_LEVEL:
            host = self.host_root / name
            if host.is_symlink():
                argv += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                argv += ["--ro-bind", str(host), f"/{name}"]
        argv += ["--", "true"]
        try:
            done = subprocess.run(  # noqa: S603 - argv, no shell
                argv,
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
                cwd="/",
                # As the rental user when given (None: subprocess's defaults, the agent's own).
                user=user.uid if user is not None else None,
                group=user.gid if user is not None else None,
                extra_groups=[] if user is not None else None,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxError(f"cannot start bubblewrap: {exc}") from None
        if done.returncode != 0:
            words = " ".join(done.stderr.split())[:300] or f"exit status {done.returncode}"
            hint = ""
            if "ermission" in words or "Operation not permitted" in words:
                hint = (
                    "; unprivileged user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone=1, "
                    "or an AppArmor profile for bwrap on Ubuntu)"
                )
            raise SandboxError(f"bubblewrap cannot create a sandbox here: {words}{hint}")


def passwd_text(user: SandboxUser | None, uid: int, gid: int) -> tuple[bytes, bytes]:
    """The /etc/passwd and /etc/group a sandbox sees: root, nobody and its own user only."""
    name = user.name if user is not None else "rental"
    passwd = (
        "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
        f"{name}:x:{uid}:{gid}:GPGPU rental:{WORK_DIR}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\n{name}:x:{gid}:\nnogroup:x:65534:\n"
    return passwd.encode(), group.encode()
