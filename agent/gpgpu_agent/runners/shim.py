"""The supervisor of one process lease: runs the workload, records how and when it ended in a file,
and fences it.

    python -I -S shim.py EXIT_FILE [--uid UID --gid GID] [--cgroup DIR]... [--pass-fd FD]...
                         [--fence FILE [--grace SECONDS] [--term-depth N]] [--log-max BYTES]
                         -- COMMAND [ARG...]

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
- with ``--log-max BYTES`` it is the only writer of the lease's log, its own stdout (see _Output):
  the workload's stdout and stderr are a pipe it reads, and it writes at most BYTES of what
  comes through to the log;
- when COMMAND ends, it SIGKILLs whatever the workload left behind (as Docker does when a
  container's first process exits), copies the last of its output to the log, then writes
  ``{"exit_code": N, "detail": …, "started_at": …, "exited_at": …, "fenced_at": …}`` to EXIT_FILE
  atomically (fsync, rename) and exits with N. The times are wall-clock UTC (ISO 8601): when
  the workload started, when it ended (the moment the supervisor reaped it), and when the fence
  fired (null if it did not). They outlive an agent restart, so the agent reports a workload
  that ended while it was away at its real end.

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
# The lease's log: the runner opens it (O_APPEND) as the supervisor's stdout and stderr.
_LOG_FD = 1
_READ_BYTES = 64 * 1024
# The end of the output that a cut log still gets when the job ends: the log tail the agent
# reports with the job's end (state.LOG_TAIL_BYTES), at most half the log.
_TAIL_BYTES = 64 * 1024
# Past the cut, one read of the pipe per pause: see _Output.
_DISCARD_PAUSE_S = 0.01
# Where the log is cut, this line begins (at byte log_split(BYTES)[0] of a log that started empty:
# the runner looks for it there to tell the owner).
CUT_MARK = b"\n[gpgpu-agent] this lease's log keeps the first "


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


def log_split(max_bytes: int) -> tuple[int, int]:
    """(head, tail) of a log of at most ``max_bytes`` of output: its first ``head`` bytes are
    written as the job writes them, its last ``tail`` bytes when the job ends."""
    tail = min(_TAIL_BYTES, max_bytes // 2)
    return max_bytes - tail, tail


class _Output:
    """The workload's stdout and stderr: a pipe whose read end only this supervisor holds,
    copied into the lease's log up to ``max_bytes``.

    Why a pipe and not the log file itself, with RLIMIT_FSIZE: the limit would hold for every
    file the job writes, and its ``/work`` is where it keeps its checkpoints and results, which
    must not be cut at the size of a log. And the job never holds a descriptor of a file in the
    agent's state directory, which it could fallocate or reopen through ``/proc/self/fd``.
    Why this supervisor and not the agent: the job outlives the agent's restarts, so its pipe
    must too, and the agent never waits on a job or holds its output.

    What the log holds: the first ``head`` bytes of the output as they come; then, once the
    output passes them, a line that says so (CUT_MARK); when the job ends, a line that says how
    much was left out and the last ``tail`` bytes (log_split), so the job's last lines (its
    error) still come with its end. Everything between is read and dropped, so the job never
    blocks on a full pipe and goes on: its output is no breach of its lease, the owner's disk is
    safe from it, and a verbose training run is worth more to its renter alive. Past the cut the
    pipe is read once per _DISCARD_PAUSE_S only: this supervisor is outside the lease's cgroup,
    so a job printing without end would otherwise turn its output into the owner's CPU time; it
    waits on its pipe instead. Memory: one read and ``tail`` bytes. A log that cannot be written
    (a full disk) drops the output; the job goes on all the same.
    """

    def __init__(self, source: int, max_bytes: int):
        self.source = source
        self.max_bytes = max_bytes
        self.head, self.tail = log_split(max_bytes)
        self.cut = False
        self.kept = bytearray()
        self.left_out = 0
        self.resume_at = 0.0
        self.open = True
        self.broken = False

    def pause_s(self) -> float:
        """How long until the pipe may be read again (0: now)."""
        return max(0.0, self.resume_at - time.monotonic()) if self.cut else 0.0

    def pump(self, reads: int, *, throttle: bool = True) -> None:
        """Copy up to ``reads`` reads of what the pipe holds now; never blocks."""
        for _ in range(reads):
            if not self.open or (throttle and self.pause_s() > 0):
                return
            try:
                data = os.read(self.source, _READ_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.open = False
                return
            self._take(data)
            if self.cut and throttle:
                self.resume_at = time.monotonic() + _DISCARD_PAUSE_S

    def finish(self, deadline: float) -> None:
        """Once the workload's processes are gone: copy what is left in the pipe (until its end,
        or ``deadline`` if a process that holds it would not die), then the end of a cut output."""
        while self.open and time.monotonic() < deadline:
            select.select([self.source], [], [], max(0.0, deadline - time.monotonic()))
            self.pump(64, throttle=False)
        os.close(self.source)
        if self.cut:
            self._write(
                f"[gpgpu-agent] the end of the output: its last {len(self.kept)} bytes ({self.left_out} bytes "
                "before them were left out)\n".encode()
            )
            self._write(bytes(self.kept))

    def _take(self, data: bytes) -> None:
        if not self.cut:
            try:
                written = os.fstat(_LOG_FD).st_size  # the supervisor's own notes count too
            except OSError:
                written = self.head
            room = max(0, self.head - written)
            if len(data) <= room:
                self._write(data)
                return
            self._write(data[:room])
            self._write(
                CUT_MARK
                + f"{self.head} bytes of the output and its last {self.tail} (it keeps at most "
                f"{self.max_bytes}); the rest is left out, and the end comes when the job ends\n".encode()
            )
            self.cut = True
            data = data[room:]
        self.kept += data
        excess = len(self.kept) - self.tail
        if excess > 0:
            self.left_out += excess
            del self.kept[:excess]

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken:
            try:
                view = view[os.write(_LOG_FD, view) :]
            except OSError:
                self.broken = True


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
    log_max: int | None = None


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
        elif flag == "--log-max":
            options.log_max = max(1, int(value))
        else:
            return None
    if (options.uid is None) != (options.gid is None):
        return None
    return options


def _child(options: _Options, report_fd: int, output_fd: int | None) -> None:
    """In the forked child: make ``output_fd`` (if any) its stdout and stderr, enter the cgroups,
    drop privileges, exec. Never returns: on a failure it writes ``errno:message`` to
    ``report_fd`` and exits 126/127 without running the command."""
    step = "start"
    try:
        signal.set_wakeup_fd(-1)  # the supervisor's; the workload has no business with it
        if output_fd is not None:
            os.dup2(output_fd, 1)
            os.dup2(output_fd, 2)
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


def _spawn(options: _Options, output_fd: int | None) -> tuple[int | None, str, int]:
    """Fork and start the workload (its stdout and stderr ``output_fd``, else the supervisor's):
    (pid, "", 0) once it runs, (None, why, exit code 126 or 127) when it never started."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(options, write_fd, output_fd)
    os.close(write_fd)
    if output_fd is not None:
        os.close(output_fd)  # the workload's alone: the pipe ends when its last process does
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


def _supervise(
    options: _Options, me: int, child: int, wake: int, output: _Output | None
) -> tuple[int, str, str | None]:
    """Wait for the workload, copying its ``output`` and fencing it if its deadline passes:
    (exit code, detail, fenced_at). ``wake`` is readable when a SIGCHLD arrived
    (signal.set_wakeup_fd)."""
    boot = _boot_id()
    fenced_at: str | None = None
    kill_at: float | None = None
    check_at = time.monotonic()
    while True:
        status = _reap(child)
        if status is not None:
            if status == -1:
                return 137, "the workload vanished", fenced_at
            code, detail = _exit_code(status)
            return code, detail, fenced_at
        due = fenced_at is None and options.fence is not None and time.monotonic() >= check_at
        if due:
            # On time, not at each wake-up: a chatty job's output wakes this loop at every line.
            check_at = time.monotonic() + _FENCE_CHECK_S
        if due and options.fence is not None and _deadline_passed(options.fence, boot):
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
        timeout = _FENCE_CHECK_S
        if fenced_at is None and options.fence is not None:
            timeout = min(timeout, check_at - time.monotonic())
        if kill_at is not None:
            timeout = min(timeout, kill_at - time.monotonic())
        timeout = max(0.0, timeout)
        watch = [wake]
        if output is not None and output.open:
            pause = output.pause_s()
            if pause > 0:
                timeout = min(timeout, pause)
            else:
                watch.append(output.source)
        select.select(watch, [], [], timeout)
        try:
            while os.read(wake, 512):
                pass
        except BlockingIOError:
            pass
        if output is not None:
            output.pump(16)


def main(argv: list[str]) -> int:
    options = _parse(argv)
    if options is None:
        _note(
            "usage: shim.py EXIT_FILE [--uid UID --gid GID] [--cgroup DIR]... [--pass-fd FD]... "
            "[--fence FILE [--grace SECONDS] [--term-depth N]] [--log-max BYTES] -- COMMAND [ARG...]"
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

    output: _Output | None = None
    output_fd: int | None = None
    if options.log_max is not None:
        read_fd, output_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_fd, False)
        output = _Output(read_fd, options.log_max)
    child, detail, code = _spawn(options, output_fd)
    started_at = _now() if child is not None else None
    fenced_at: str | None = None
    if child is None:
        _note(detail)
    else:
        code, detail, fenced_at = _supervise(options, me, child, wake_r, output)
    exited_at = _now()
    if child is not None:
        _kill_leftovers(me)
    if output is not None:
        output.finish(time.monotonic() + _CLEANUP_LIMIT_S)
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
