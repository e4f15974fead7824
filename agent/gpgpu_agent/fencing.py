"""Fencing: a rental never outlives the agent's contact with the marketplace by more than the fence.

The marketplace ends a silent machine's leases as `lost` only after `lease_fence_s` (its heartbeat
reply says how long; 120 s when it does not) and a margin, and may then run their jobs elsewhere.
So that no job ever runs twice, each running lease has a deadline on this machine, and a watchdog
that does not need the agent process stops the workload when the deadline passes:

- **the deadline**: one file per lease, ``<state_dir>/fence/lease-<id>.json``, written atomically
  (``Fence``). The lease tracker arms it before it starts the workload; after each successful
  heartbeat the daemon renews it to (the time that heartbeat was sent) + ``lease_fence_s``, for
  every lease the heartbeat reported and the reply did not ask to stop. Counting from the moment
  the request left, never from when its answer came back, keeps the deadline at or before the
  marketplace's own last contact + ``lease_fence_s``. The lease's records forgotten, the file is
  removed (``disarm``);
- **the watchdogs**: a process lease's supervisor (``runners/shim.py``) reads the file twice a
  second; a container lease has a small detached watcher (this file, run as a script: ``watch``)
  that does the same. Neither is the agent's thread or child: an agent that is stopped
  (SIGSTOP), killed, or wedged does not stop them. When the deadline passes they stop the
  workload (SIGTERM to the workload, SIGKILL after the grace; ``stop -t`` for a container) and
  record that they did (``fenced_at``, wall-clock UTC): the supervisor in its exit file, the
  container watcher in ``lease-<id>.fenced.json`` beside the deadline. The agent, back in contact,
  reports the lease ``exited`` at the recorded exit time with a detail that starts ``fenced:``.

The clock: deadlines are ``CLOCK_BOOTTIME`` seconds, the same for every process of one boot. A
wall-clock step (NTP, someone's ``date -s``) cannot fire every fence at once or hold them off,
and, unlike ``CLOCK_MONOTONIC``, it keeps counting while the machine is suspended: a laptop that
slept for an hour wakes with its fences expired, as the marketplace will have ended its leases. A
deadline carries the kernel's boot id; one from another boot counts as passed. ``deadline_at``
(UTC) in the file is for people; no watchdog reads it.

A missing deadline file means the lease is not fenced (runners built without a fence directory,
as in the runners' own tests): the tracker always arms one before it starts a workload.

This file imports only the standard library: the container watcher runs it by path, under
``python -I -S``, as the supervisor runs shim.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

# When the marketplace's heartbeat reply does not say (docs/agent-api.md).
DEFAULT_LEASE_FENCE_S = 120.0
# How often the watchdogs read the deadline.
CHECK_INTERVAL_S = 0.5
# How long the container watcher gives the engine to carry out `stop` beyond the grace period.
ENGINE_STOP_SLACK_S = 60.0


def boottime() -> float:
    """Seconds since boot, suspend included (CLOCK_BOOTTIME): the clock of every deadline."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id() -> str | None:
    """The kernel's boot id: a deadline only means something within the boot that wrote it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def deadline_path(directory: Path, lease_id: int) -> Path:
    """The lease's deadline file."""
    return Path(directory) / f"lease-{int(lease_id)}.json"


def fenced_path(directory: Path, lease_id: int) -> Path:
    """Where a container watcher records that it fenced the lease."""
    return Path(directory) / f"lease-{int(lease_id)}.fenced.json"


def watcher_path(directory: Path, lease_id: int) -> Path:
    """The pid file of a container lease's watcher (see ContainerRunner)."""
    return Path(directory) / f"lease-{int(lease_id)}.watcher.json"


def write_json_atomic(path: Path, data: object) -> None:
    """Replace ``path`` with ``data`` as JSON (mode 0600) in one step: a reader sees the old file
    or the new one, never half of one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(path: Path) -> object:
    """The JSON in ``path``; None when it is missing or is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def deadline_passed(path: Path, *, now: float | None = None, boot: str | None = None) -> bool:
    """Whether the lease's deadline has passed (``now``: boottime() seconds). False when there is
    no deadline file (the lease is not fenced); True for a deadline of another boot. The
    supervisor (shim.py) reads the file the same way."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("deadline"), int | float):
        return False
    written_in = data.get("boot_id")
    boot = boot if boot is not None else boot_id()
    if written_in is not None and boot is not None and written_in != boot:
        return True
    return (boottime() if now is None else now) >= float(data["deadline"])


class Fence:
    """The deadlines of this machine's leases (module docstring), written by the agent.

    ``directory`` holds one file per lease; ``fence_s`` is the marketplace's ``lease_fence_s``
    (``set_fence_s`` after each heartbeat reply). ``arm`` (before a workload starts) sets the
    lease's deadline from the last contact; ``renew`` (after a successful heartbeat) moves every
    named lease's deadline; ``disarm`` removes it. Thread-safe: the poll loop arms and disarms,
    the network loop renews. ``clock`` is boottime(); ``wall`` the UTC clock for ``deadline_at``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        fence_s: float = DEFAULT_LEASE_FENCE_S,
        clock: Callable[[], float] = boottime,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.directory = Path(directory)
        self.fence_s = float(fence_s)
        self._clock = clock
        self._wall = wall
        self._boot_id = boot_id()
        # The last contact with the marketplace (boottime): until the first, the agent's start.
        self._contact = self._clock()
        self._lock = threading.Lock()

    def path(self, lease_id: int) -> Path:
        return deadline_path(self.directory, lease_id)

    def set_fence_s(self, fence_s: float) -> None:
        self.fence_s = float(fence_s)

    def now(self) -> float:
        """This fence's clock (boottime): what `renew`'s `contact` is measured in."""
        return self._clock()

    def armed(self, lease_id: int) -> bool:
        return self.path(lease_id).exists()

    @property
    def deadline(self) -> float:
        """The deadline (boottime) a lease armed now gets: the last contact + fence_s."""
        return self._contact + self.fence_s

    def arm(self, lease_id: int) -> None:
        """Give a lease about to start its deadline. Raises OSError when it cannot be written (the
        tracker then refuses the lease: no workload starts without one)."""
        with self._lock:
            self._write(lease_id, self.deadline)

    def renew(self, lease_ids: Iterable[int], *, contact: float) -> None:
        """The marketplace heard from this machine at ``contact`` (boottime, when the request
        was sent): move the deadline of each of ``lease_ids`` that is armed. A lease disarmed
        meanwhile stays disarmed. Raises the first OSError once every other deadline is written
        (the one that failed keeps its old deadline: its workload is fenced early, never late)."""
        failed: OSError | None = None
        with self._lock:
            self._contact = max(self._contact, contact)
            for lease_id in lease_ids:
                if self.path(lease_id).exists():
                    try:
                        self._write(lease_id, self.deadline)
                    except OSError as exc:
                        failed = failed or exc
        if failed is not None:
            raise failed

    def disarm(self, lease_id: int) -> None:
        """The lease is over here: its deadline goes (a container watcher then exits)."""
        with self._lock:
            for path in (self.path(lease_id), fenced_path(self.directory, lease_id)):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

    def _write(self, lease_id: int, deadline: float) -> None:
        left = deadline - self._clock()
        wall = self._wall()
        write_json_atomic(
            self.path(lease_id),
            {
                "lease_id": int(lease_id),
                "deadline": deadline,
                "boot_id": self._boot_id,
                "fence_s": self.fence_s,
                "deadline_at": iso(wall + timedelta(seconds=left)),
            },
        )


# --- the container watcher (run as a script) ---------------------------------------------------


def _engine(engine_bin: str, args: list[str], timeout: float) -> subprocess.CompletedProcess[bytes] | None:
    try:
        return subprocess.run(  # noqa: S603 - argv from the agent, no shell
            [engine_bin, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _running(engine_bin: str, name: str) -> bool | None:
    """Whether the container runs: True, False (stopped or gone), None (the engine did not say)."""
    done = _engine(engine_bin, ["inspect", "--type", "container", "--format", "{{.State.Running}}", name], 60)
    if done is None:
        return None
    if done.returncode != 0:
        text = done.stderr.decode("utf-8", "replace").lower()
        return False if "no such" in text or "no container" in text else None
    return done.stdout.strip() == b"true"


def watch_container(
    *, engine_bin: str, name: str, deadline_file: Path, record_file: Path, grace_s: float, check_s: float
) -> int:
    """Until the deadline file is gone (the lease is over) or its deadline passes; then, if the
    container still runs, record ``fenced_at`` and stop it (``stop -t grace``, ``kill`` if that
    fails). Returns the exit status."""
    boot = boot_id()
    while True:
        if not deadline_file.exists():
            return 0
        if deadline_passed(deadline_file, boot=boot):
            break
        time.sleep(check_s)
    if _running(engine_bin, name) is False:
        return 0
    write_json_atomic(record_file, {"fenced_at": iso(datetime.now(UTC)), "deadline_file": str(deadline_file)})
    grace = max(0, int(-(-grace_s // 1)))  # the engines count whole seconds
    done = _engine(engine_bin, ["stop", "-t", str(grace), name], grace + ENGINE_STOP_SLACK_S)
    if done is None or done.returncode != 0:
        _engine(engine_bin, ["kill", name], ENGINE_STOP_SLACK_S)
    return 0


def _daemonize() -> None:
    """Leave the caller: the first process prints the watcher's pid and exits at once, the watcher
    goes on in a session of its own with no terminal and its output discarded (so the agent
    neither waits for it nor keeps it as a zombie, and a signal to the agent's group misses it)."""
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


USAGE = (
    "usage: fencing.py watch --engine-bin BIN --name CONTAINER --deadline FILE --record FILE --grace SECONDS "
    "[--check SECONDS] [--foreground]"
)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "watch":
        sys.stderr.write(USAGE + "\n")
        return 2
    options: dict[str, str] = {}
    foreground = False
    rest = argv[2:]
    while rest:
        flag = rest.pop(0)
        if flag == "--foreground":
            foreground = True
        elif flag in ("--engine-bin", "--name", "--deadline", "--record", "--grace", "--check") and rest:
            options[flag] = rest.pop(0)
        else:
            sys.stderr.write(USAGE + "\n")
            return 2
    try:
        engine_bin, name = options["--engine-bin"], options["--name"]
        deadline_file, record_file = Path(options["--deadline"]), Path(options["--record"])
        grace_s, check_s = float(options["--grace"]), float(options.get("--check", CHECK_INTERVAL_S))
    except (KeyError, ValueError):
        sys.stderr.write(USAGE + "\n")
        return 2
    if not foreground:
        _daemonize()
    return watch_container(
        engine_bin=engine_bin,
        name=name,
        deadline_file=deadline_file,
        record_file=record_file,
        grace_s=grace_s,
        check_s=check_s,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
