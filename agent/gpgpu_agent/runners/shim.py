"""The supervisor of one process lease: runs the workload and records how and when it ended in a file.

    python -I -S shim.py EXIT_FILE [--uid UID --gid GID] [--cgroup DIR]... [--pass-fd FD]... -- COMMAND [ARG...]

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
- when COMMAND ends, it SIGKILLs whatever the workload left behind (as Docker does when a
  container's first process exits), then writes ``{"exit_code": N, "detail": …, "started_at": …,
  "exited_at": …}`` to EXIT_FILE atomically (fsync, rename) and exits with N. The times are
  wall-clock UTC (ISO 8601): when the workload started, and when it ended (the moment the
  supervisor reaped it). They outlive an agent restart, so the agent reports a workload that
  ended while it was away at its real end.

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
        if not value.isdigit():
            return None
        if flag == "--uid":
            options.uid = int(value)
        elif flag == "--gid":
            options.gid = int(value)
        elif flag == "--pass-fd":
            options.pass_fds.append(int(value))
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


def main(argv: list[str]) -> int:
    options = _parse(argv)
    if options is None:
        _note("usage: shim.py EXIT_FILE [--uid UID --gid GID] [--cgroup DIR]... [--pass-fd FD]... -- COMMAND [ARG...]")
        return 2
    me = os.getpid()
    _become_subreaper()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, _ignore)

    child, detail, code = _spawn(options)
    started_at = _now() if child is not None else None
    if child is None:
        _note(detail)
    else:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:  # cannot happen while the child is ours; be safe anyway
                code, detail = 137, "the workload vanished"
                break
            if pid == child:
                code = os.waitstatus_to_exitcode(status)
                if code < 0:
                    try:
                        name = signal.Signals(-code).name
                    except ValueError:
                        name = "unnamed"
                    detail = f"killed by signal {-code} ({name})"
                    code = 128 - code
                break
    exited_at = _now()
    if child is not None:
        _kill_leftovers(me)
    _write_exit(
        options.exit_path,
        {"exit_code": code, "detail": detail, "started_at": started_at, "exited_at": exited_at},
    )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
