"""The supervisor of one process lease: runs the workload and records its exit code in a file.

    python -I -S shim.py EXIT_FILE -- COMMAND [ARG...]

The process runner starts this script as the leader of a new session and process group; the
workload is its child, in the same group. It exists so that the exit code of a workload is known
even to an agent that restarted meanwhile (and so is not the workload's parent):

- it spawns COMMAND with default signal dispositions (Python ignores SIGPIPE and SIGXFSZ, which a
  child would otherwise inherit);
- it becomes a child subreaper, so the workload's orphaned descendants are re-parented to it and
  stay findable;
- it shrugs off SIGTERM, SIGINT, SIGHUP and SIGQUIT: the runner signals the whole process group,
  so the workload receives them itself, and the supervisor must outlive the workload to write
  down how it ended;
- when COMMAND ends, it SIGKILLs whatever the workload left behind (as Docker does when a
  container's first process exits), then writes ``{"exit_code": N}`` to EXIT_FILE atomically and
  exits with N.

Exit codes follow the shell's convention: the workload's own status 0–255, or 128+n when signal n
killed it (143 for SIGTERM, 137 for SIGKILL); 127 when COMMAND cannot be found, 126 when it cannot
be run.

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


def _write_exit(path: str, code: int, detail: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"exit_code": code, "detail": detail}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _ignore(_signum: int, _frame: object) -> None:
    """A caught (not ignored) disposition: exec resets it to the default in the workload."""


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        _note("usage: shim.py EXIT_FILE -- COMMAND [ARG...]")
        return 2
    exit_path, command = argv[1], argv[3:]
    me = os.getpid()
    _become_subreaper()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, _ignore)

    detail = ""
    try:
        child = os.posix_spawnp(command[0], command, os.environ, setsigdef=_DEFAULT_IN_WORKLOAD)
    except OSError as exc:
        code = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
        detail = f"could not run {command[0]!r}: {exc.strerror}"
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
        _kill_leftovers(me)
    _write_exit(exit_path, code, detail)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
