"""The supervisor of one process lease: runs the workload, records how and when it ended in a file,
and fences it.

    python -I -S shim.py EXIT_FILE [--uid UID --gid GID] [--cgroup DIR]... [--pass-fd FD]...
                         [--fence FILE [--grace SECONDS] [--term-depth N]] -- COMMAND [ARG...]

The process runner starts this script as the leader of a new session and process group; the
workload is its child, in the same group. It exists so that the exit code of a workload is known
even to an agent that restarted meanwhile (and so is not the workload's parent):

- it forks the workload's first process, which joins each ``--cgroup`` directory (writes its pid
  to ``cgroup.procs``: the lease's CPU, memory and process limits), drops to ``--uid``/``--gid``
  with no supplementary groups, restores default signal dispositions (Python ignores SIGPIPE and
  SIGXFSZ, which a child would otherwise inherit) and executes COMMAND (the sandbox, for a
  process job: ``bwrap``). If any of that fails the command is never run: a workload never
  starts outside its limits or as the supervisor's user;
- the supervisor itself stays outside the lease's cgroup (an OOM kill inside the lease cannot
  take it with it) and closes its copies of the ``--pass-fd`` descriptors once the child has them;
- it becomes a child subreaper, so the workload's orphaned descendants are re-parented to it and
  stay findable;
- it shrugs off SIGTERM, SIGINT, SIGHUP and SIGQUIT: the runner signals the workload itself, and
  the supervisor must outlive the workload to write down how it ended;
- it is the lease's fence watchdog (see gpgpu_agent/fencing.py): with ``--fence FILE`` it reads
  the lease's deadline from FILE twice a second, and once the deadline has passed without the
  agent renewing it (the agent lost contact with the marketplace, or is stopped or gone) it sends
  SIGTERM to the workload's processes (those ``--term-depth`` levels or more below it: 3 in the
  sandbox, whose first two are bwrap's, as the runner's own stop does), then after ``--grace``
  seconds SIGKILLs everything below it and in the lease's cgroups. It needs nothing of the
  agent process for that;
- when COMMAND ends, it SIGKILLs whatever the workload left behind (as Docker does when a
  container's first process exits), then writes ``{"exit_code": N, "detail": …, "started_at": …,
  "exited_at": …, "fenced_at": …}`` to EXIT_FILE atomically (fsync, rename) and exits with N. The
  times are wall-clock UTC (ISO 8601): when the workload started, when it ended (the moment the
  supervisor reaped it), and when the fence fired (null if it did not). They outlive an agent
  restart, so the agent reports a workload that ended while it was away at its real end.

Exit codes follow the shell's convention: the workload's own status 0–255, or 128+n when signal n
killed it (143 for SIGTERM, 137 for SIGKILL); 127 when COMMAND cannot be found, 126 when it cannot
be run (or its cgroup or user could not be entered).

This file imports only the standard library and nothing from its package: it runs under
``python -I`` (isolated from the workload's PYTHON* variables) by file path.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

PR_SET_CHILD_SUBREAPER = 36
_DEFAULT_IN_WORKLOAD = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
)
_CLEANUP_LIMIT_S = 2.0
# How often the deadline file is read (fencing.CHECK_INTERVAL_S).
_FENCE_CHECK_S = 0.5


def _become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # Not Linux, or no prctl: orphans then go to init, and the group still finds them.


def _note(message: str) -> None:
    try:
        sys.stderr.write(f"[gpgpu-agent] {message}\n")
        sys.stderr.flush()
    except OSError:
        pass


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        rest = raw[raw.rindex(b")") + 2 :].split()
        return rest[0].decode("ascii", "replace"), int(rest[1]), int(rest[2])
    except (OSError, ValueError, IndexError):
        return None


def _leftovers(me: int) -> list[int]:
    """Live processes of the workload other than this supervisor: its process group, and its
    descendants (orphans come back to it as subreaper, even those that called setsid)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                stats[int(name)] = st
    children: dict[int, list[int]] = {}
    for pid, (_state, ppid, _pgid) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (state, _ppid, pgid) in stats.items() if pgid == me and state not in ("Z", "X")}
    stack = [me]
    while stack:
        for child in children.get(stack.pop(), ()):
            if stats[child][0] not in ("Z", "X"):
                found.add(child)
            stack.append(child)
    found.discard(me)
    return sorted(found)


def _reap_all() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_leftovers(me: int) -> None:
    deadline = time.monotonic() + _CLEANUP_LIMIT_S
    while time.monotonic() < deadline:
        pids = _leftovers(me)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)
        _reap_all()


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _write_exit(path: str, record: dict[str, object]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _deadline_passed(path: str, boot: str | None) -> bool:
    """fencing.deadline_passed, which this file cannot import: no readable deadline is no fence;
    a deadline of another boot has passed; else CLOCK_BOOTTIME against the deadline."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    deadline = data.get("deadline") if isinstance(data, dict) else None
    if not isinstance(deadline, int | float):
        return False
    written_in = data.get("boot_id")
    if written_in is not None and boot is not None and written_in != boot:
        return True
    return time.clock_gettime(time.CLOCK_BOOTTIME) >= deadline


def _descendants(me: int) -> dict[int, int]:
    """Live descendants of this supervisor → their depth below it (1: its children)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[0] not in ("Z", "X"):
                parents[int(name)] = st[1]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    stack = [(me, 0)]
    while stack:
        pid, depth = stack.pop()
        for child in children.get(pid, ()):
            if child not in found:
                found[child] = depth + 1
                stack.append((child, depth + 1))
    return found


def _terminate(me: int, depth: int) -> None:
    """SIGTERM the workload's processes: those at least ``depth`` levels below the supervisor."""
    for pid, below in _descendants(me).items():
        if below >= depth:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass


def _kill_all(me: int, cgroups: list[str]) -> None:
    """SIGKILL everything below the supervisor, in its group and in the lease's cgroups (through
    cgroup.kill where the kernel has it, cgroup v2; else each pid cgroup.procs lists)."""
    pids = set(_leftovers(me))
    for directory in cgroups:
        try:
            with open(os.path.join(directory, "cgroup.kill"), "w", encoding="ascii") as f:
                f.write("1")
            continue
        except OSError:
            pass
        try:
            with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as f:
                pids.update(int(line) for line in f if line.strip().isdigit())
        except OSError:
            pass
    pids.discard(me)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _ignore(_signum: int, _frame: object) -> None:
    """A caught (not ignored) disposition: exec resets it to the default in the workload."""


@dataclass
class _Options:
    exit_path: str
    command: list[str]
    uid: int | None = None
    gid: int | None = None
    cgroups: list[str] = field(default_factory=list)
    pass_fds: list[int] = field(default_factory=list)
    fence: str | None = None
    grace_s: float = 5.0
    term_depth: int = 1


def _parse(argv: list[str]) -> _Options | None:
    if len(argv) < 4 or "--" not in argv[2:]:
        return None
    split = argv.index("--", 2)
    options = _Options(exit_path=argv[1], command=argv[split + 1 :])
    rest = argv[2:split]
    if not options.command or len(rest) % 2:
        return None
    for flag, value in zip(rest[::2], rest[1::2], strict=True):
        if flag == "--cgroup":
            options.cgroups.append(value)
            continue
        if flag == "--fence":
            options.fence = value
            continue
        if flag == "--grace":
            try:
                options.grace_s = max(0.0, float(value))
            except ValueError:
                return None
            continue
        if not value.isdigit():
            return None
        if flag == "--uid":
            options.uid = int(value)
        elif flag == "--gid":
            options.gid = int(value)
        elif flag == "--pass-fd":
            options.pass_fds.append(int(value))
        elif flag == "--term-depth":
            options.term_depth = max(1, int(value))
        else:
            return None
    if (options.uid is None) != (options.gid is None):
        return None
    return options


def _child(options: _Options, report_fd: int) -> None:
    """In the forked child: enter the cgroups, drop privileges, exec. Never returns: on a failure
    it writes ``errno:message`` to ``report_fd`` and exits 126/127 without running the command."""
    step = "start"
    try:
        signal.set_wakeup_fd(-1)  # the supervisor's; the workload has no business with it
        step = "join the lease's cgroup"
        for directory in options.cgroups:
            with open(os.path.join(directory, "cgroup.procs"), "w", encoding="ascii") as f:
                f.write(str(os.getpid()))
        for signum in _DEFAULT_IN_WORKLOAD:
            signal.signal(signum, signal.SIG_DFL)
        if options.uid is not None and options.gid is not None:
            step = "switch to the rental user"
            os.setgroups([])
            os.setresgid(options.gid, options.gid, options.gid)
            os.setresuid(options.uid, options.uid, options.uid)
            if os.getuid() != options.uid or os.geteuid() != options.uid:
                raise PermissionError(errno.EPERM, "the user id did not change")
        step = f"run {options.command[0]!r}"
        os.execvp(options.command[0], options.command)  # noqa: S606 - argv from the runner, no shell
    except OSError as exc:
        code = exc.errno or errno.EPERM
        message = f"{code}:could not {step}: {exc.strerror or exc}"
    except BaseException as exc:  # nothing may escape a forked child
        code = errno.EPERM
        message = f"{code}:could not {step}: {exc}"
    try:
        os.write(report_fd, message.encode("utf-8", "replace")[:1000])
    finally:
        os._exit(127 if code in (errno.ENOENT, errno.ENOTDIR) and step.startswith("run") else 126)


def _spawn(options: _Options) -> tuple[int | None, str, int]:
    """Fork and start the workload: (pid, "", 0) once it runs, (None, why, exit code 126 or 127)
    when it never started."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(options, write_fd)
    os.close(write_fd)
    for fd in options.pass_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    with os.fdopen(read_fd, "rb") as report:
        failure = report.read()  # EOF without a byte: the exec succeeded (CLOEXEC closed the pipe)
    if not failure:
        return pid, "", 0
    _, status = os.waitpid(pid, 0)
    _errno, _, words = failure.decode("utf-8", "replace").partition(":")
    return None, words or "the workload could not be started", os.waitstatus_to_exitcode(status)


def _exit_code(status: int) -> tuple[int, str]:
    """The shell's exit code for a wait status, and what a signal death says."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return code, ""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unnamed"
    return 128 - code, f"killed by signal {-code} ({name})"


def _reap(child: int) -> int | None:
    """Reap every child that ended (orphans come back to the subreaper); the workload's wait
    status once it has ended, else None."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # cannot happen while the child is ours; be safe anyway
            return -1
        if pid == 0:
            return None
        if pid == child:
            return status


def _supervise(options: _Options, me: int, child: int, wake: int) -> tuple[int, str, str | None]:
    """Wait for the workload, fencing it if its deadline passes: (exit code, detail, fenced_at).
    ``wake`` is readable when a SIGCHLD arrived (signal.set_wakeup_fd)."""
    boot = _boot_id()
    fenced_at: str | None = None
    kill_at: float | None = None
    while True:
        status = _reap(child)
        if status is not None:
            if status == -1:
                return 137, "the workload vanished", fenced_at
            code, detail = _exit_code(status)
            return code, detail, fenced_at
        if fenced_at is None and options.fence is not None and _deadline_passed(options.fence, boot):
            fenced_at = _now()
            _note(
                f"fenced: this machine's lease deadline passed without renewal at {fenced_at} (the agent lost "
                "contact with the marketplace); stopping the workload"
            )
            _terminate(me, options.term_depth)
            kill_at = time.monotonic() + options.grace_s
        if kill_at is not None and time.monotonic() >= kill_at:
            _kill_all(me, options.cgroups)
            kill_at = time.monotonic() + 1.0  # again, until the workload is gone
        timeout = _FENCE_CHECK_S if kill_at is None else max(0.0, min(_FENCE_CHECK_S, kill_at - time.monotonic()))
        select.select([wake], [], [], timeout)
        try:
            while os.read(wake, 512):
                pass
        except BlockingIOError:
            pass


def main(argv: list[str]) -> int:
    options = _parse(argv)
    if options is None:
        _note(
            "usage: shim.py EXIT_FILE [--uid UID --gid GID] [--cgroup DIR]... [--pass-fd FD]... "
            "[--fence FILE [--grace SECONDS] [--term-depth N]] -- COMMAND [ARG...]"
        )
        return 2
    me = os.getpid()
    _become_subreaper()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, _ignore)
    # A SIGCHLD wakes the wait below at once (the exit time is the moment the workload ended);
    # the handler must be a function: SIG_IGN for SIGCHLD would have the kernel reap children.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, _ignore)

    child, detail, code = _spawn(options)
    started_at = _now() if child is not None else None
    fenced_at: str | None = None
    if child is None:
        _note(detail)
    else:
        code, detail, fenced_at = _supervise(options, me, child, wake_r)
    exited_at = _now()
    if child is not None:
        _kill_leftovers(me)
    if fenced_at is not None:
        detail = f"fenced: the lease's deadline passed at {fenced_at}" + (f"; {detail}" if detail else "")
    _write_exit(
        options.exit_path,
        {
            "exit_code": code,
            "detail": detail,
            "started_at": started_at,
            "exited_at": exited_at,
            "fenced_at": fenced_at,
        },
    )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
