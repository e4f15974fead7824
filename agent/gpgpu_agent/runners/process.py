"""The process runner: runs a lease's command in a bubblewrap sandbox, as the rental user, on the
leased GPUs only, within its CPU, memory and process limits.

How one lease runs:

- ``shim.py`` (the supervisor) is started with ``start_new_session=True``: it leads a new session
  and process group and is the ancestor of everything the workload starts; it stays outside the
  sandbox and outside the lease's cgroup, so it outlives any misbehaviour of the workload and
  writes down how it ended;
- its child joins the lease's cgroup (``cgroups.py``: ``cpus``, ``memory``, ``pids``), drops to the
  rental user (``sandbox.rental_user``; the simulated demo's unprivileged agent keeps its own), and
  executes ``bwrap`` with the lease's sandbox (``sandbox.py``: an empty root with ``/usr``
  read-only, its own PID, user, network and IPC namespaces, no network, no capability, only the
  leased GPUs' device nodes, one writable ``/work``). The arguments reach ``bwrap`` through a
  file descriptor (``--args``), so the job's environment never shows in a process listing;
- stdin is /dev/null; stdout and stderr are a pipe to the supervisor, which copies at most
  ``log_max_size`` of it into ``<log_dir>/lease-<id>.log`` (in the agent's state directory,
  opened by the runner; the workload holds no descriptor of it and cannot name it): the first
  bytes as they come, then a line saying the rest is left out, then, when the job ends, its last
  64 KiB. A job that prints without end cannot fill the disk of the agent's spool and
  credentials, and goes on running (``shim._Output`` says why this way);
- the environment is built from nothing: PATH, HOME=/work (its working directory), LANG, TMPDIR,
  then the job's ``env``, then what the agent sets and the job cannot override:
  CUDA_VISIBLE_DEVICES (the leased GPUs' indexes, comma-joined in lease order),
  CUDA_DEVICE_ORDER=PCI_BUS_ID (so CUDA numbers GPUs as NVML does), GPGPU_LEASE_ID, GPGPU_JOB_ID;
- the pid file (see state.py) is written atomically once the supervisor has a pid.

Stopping: SIGTERM goes to the workload's own processes (inside the sandbox; not to bwrap, whose
death would SIGKILL the sandbox at once and cut the grace period short), then after the grace
everything is SIGKILLed: the process tree, the process group and whatever is in the lease's
cgroup, so a process that double-forked or called setsid cannot outlive its lease.

Exit codes (RunState.exit_code) follow the shell's convention, as Docker's do: the workload's own
status 0–255; 128+n when signal n ended it (143: SIGTERM, 137: SIGKILL, also the OOM killer). 137
is also reported when the supervisor itself vanished without recording an exit (someone
SIGKILLed it, or the runner did at the end of a stop's grace period).

After an agent restart the workloads keep running (they are in their own session, their output
goes to files, and the supervisor, not the agent, waits for them); ``adopt`` finds them again by
their pid files. The agent's systemd unit must therefore use ``KillMode=process``, or stopping
the agent would kill the workloads with it. The supervisor's exit file keeps when the workload
ended (RunState.ended_at), so one that ended while the agent was away is reported at its real
end, not at the agent's return; only a supervisor that vanished without a record (SIGKILLed) is
given the time the runner noticed.

Fencing (gpgpu_agent.fencing): with ``fence_dir`` the supervisor is also the lease's watchdog. It
reads the lease's deadline file there and stops the workload itself (SIGTERM as ``stop`` sends it,
SIGKILL after ``fence_grace_s``) when the agent has not renewed it in time, whether the agent is
stopped, gone or only cut off from the marketplace; RunState.fenced_at then says when.

``sandbox=None`` runs commands without a sandbox, as the agent's user: only the supervisor's own
tests use it; ``daemon.build_agent`` never does.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

from gpgpu_agent import checkpoint
from gpgpu_agent.fencing import deadline_path
from gpgpu_agent.protocols import RunnerError
from gpgpu_agent.runners import shim
from gpgpu_agent.runners.cgroups import CgroupError, Cgroups, Limits
from gpgpu_agent.runners.common import (
    EXIT_KILLED,
    LOG_MAX_SIZE,
    LOG_MIN_BYTES,
    UnknownLeaseError,
    check_env,
    check_gpu_uuids,
    size_bytes,
)
from gpgpu_agent.runners.sandbox import TMP_DIR, WORK_DIR, Bubblewrap, LeaseView, SandboxUser, passwd_text
from gpgpu_agent.runners.state import (
    LOG_TAIL_BYTES,
    ExitRecord,
    ProcessRecord,
    ProcStat,
    RecordStore,
    all_proc_stats,
    boot_id,
    proc_stat,
    read_exit,
    read_from,
    read_tail,
    workload_pids,
    write_exit,
)
from gpgpu_agent.types import JobLimits, LeaseSpec, OutputRead, RunState

log = logging.getLogger(__name__)

SHIM = Path(__file__).with_name("shim.py")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTAINER_REFUSED = "the process runner runs process jobs only"
MIG_REFUSED = "MIG instances are rented as containers only; the process sandbox gives whole GPUs"
# Variables the agent sets last, whatever the job's env says.
RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPGPU_LEASE_ID", "GPGPU_JOB_ID")
# bwrap's own two processes sit between the supervisor and the workload (see the module docstring).
_SANDBOX_DEPTH = 3
_POLL_STEP_S = 0.02


class ProcessCapabilities(TypedDict):
    """How process jobs are isolated here (the heartbeat's ``capabilities.process``)."""

    sandbox: str
    sandbox_version: str
    user: str
    network: str
    limits: JobLimits


class ProcessRunner:
    """Runs ``kind: "process"`` leases as sandboxed, supervised process groups (see the module
    docstring).

    ``state_dir`` is the agent's state directory (pid and exit files go to ``state_dir/runs``);
    ``log_dir`` holds the workloads' output (default ``state_dir/logs``); ``work_dir`` the leases'
    work directories (default ``state_dir/rentals``). ``sandbox`` is the bubblewrap builder,
    ``user`` the rental user (None: the agent's own, for the simulated demo only), ``cgroups``
    and ``limits`` the per-lease limits (None: none, for the simulated demo only). ``kill_wait_s``
    bounds how long ``stop`` waits for the kernel to finish a SIGKILL, and then for the
    supervisor to end: a stop returns within ``grace_s + 2 * kill_wait_s``. ``fence_dir`` holds
    the leases' deadline files (None: the leases it starts are not fenced); ``fence_grace_s`` is
    SIGTERM to SIGKILL when a fence fires. ``log_max_size`` bounds each lease's log file, in the
    engines' syntax as the container runner's (at least 4k; ValueError otherwise). One runner is
    driven from one thread (``stop`` blocks for up to its grace period).
    """

    def __init__(
        self,
        state_dir: Path | str,
        log_dir: Path | str | None = None,
        *,
        sandbox: Bubblewrap | None,
        user: SandboxUser | None = None,
        cgroups: Cgroups | None = None,
        limits: Limits | None = None,
        work_dir: Path | str | None = None,
        python: str = sys.executable,
        path: str = DEFAULT_PATH,
        kill_wait_s: float = 1.0,
        log_tail_bytes: int = LOG_TAIL_BYTES,
        tmp_bytes: int = 1 << 30,
        fence_dir: Path | str | None = None,
        fence_grace_s: float = 5.0,
        log_max_size: str = LOG_MAX_SIZE,
    ):
        try:
            self.log_max_bytes = size_bytes(log_max_size)
        except ValueError:
            self.log_max_bytes = 0
        if self.log_max_bytes < LOG_MIN_BYTES:
            raise ValueError(f"log_max_size must be a size of at least 4k such as 20m, not {log_max_size!r}")
        state_dir = Path(state_dir)
        self.store = RecordStore(state_dir / "runs")
        self.log_dir = Path(log_dir) if log_dir is not None else state_dir / "logs"
        self.work_dir = Path(work_dir) if work_dir is not None else state_dir / "rentals"
        self.sandbox = sandbox
        self.user = user
        self.cgroups = cgroups
        self.limits = limits if cgroups is not None else None
        self.python = python
        self.path = path
        self.kill_wait_s = kill_wait_s
        self.log_tail_bytes = log_tail_bytes
        self.tmp_bytes = tmp_bytes
        self.fence_dir = Path(fence_dir) if fence_dir is not None else None
        self.fence_grace_s = fence_grace_s
        self._records: dict[int, ProcessRecord] = {}
        # Supervisors this runner started itself: it is their parent and must reap them.
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._boot_id = boot_id()
        # Leases whose cut log the owner has been told of (once per lease and agent run).
        self._cut_told: set[int] = set()

    def capabilities(self) -> ProcessCapabilities:
        """How process jobs are isolated here, for the heartbeat (docs/agent-api.md)."""
        return {
            "sandbox": "bubblewrap" if self.sandbox is not None else "none",
            "sandbox_version": self.sandbox.version_text if self.sandbox is not None else "",
            "user": self.user.name if self.user is not None else "",
            "network": "none",
            "limits": (self.limits or Limits(None, None, None)).describe(),
        }

    # --- Runner protocol ------------------------------------------------------------------

    def start(
        self, spec: LeaseSpec, *, gpu_indexes: Mapping[str, int], gpu_minors: Mapping[str, int] | None = None
    ) -> RunState:
        """Start the lease's command under its supervisor, in its sandbox; a second call for the
        same lease returns the state of the first (also after an agent restart: the pid file is
        found). ``gpu_minors``: each leased GPU's device minor number (/dev/nvidia<minor>; the
        index when not given). Raises RunnerError, with a sentence for the renter, when it cannot
        start."""
        if spec.kind != "process":
            raise RunnerError(CONTAINER_REFUSED)
        if self._record(spec.lease_id) is not None:
            return self.poll(spec.lease_id)
        if not spec.command:
            raise RunnerError("the job has no command to run")
        check_env(spec.env)
        check_gpu_uuids(spec.gpu_uuids)
        visible = []
        minors = []
        for uuid in spec.gpu_uuids:
            if uuid in gpu_indexes:
                visible.append(str(int(gpu_indexes[uuid])))
                minors.append(int((gpu_minors or {}).get(uuid, gpu_indexes[uuid])))
            elif uuid.startswith("MIG-"):
                if self.sandbox is not None:
                    raise RunnerError(MIG_REFUSED)
                visible.append(uuid)  # CUDA addresses a MIG instance by its uuid only
            else:
                raise RunnerError(f"GPU {uuid} is not on this machine")

        sandboxed = self.sandbox is not None
        work = self.work_dir / f"lease-{spec.lease_id}"
        env = {
            "PATH": self.path,
            "HOME": WORK_DIR if sandboxed else str(work),
            "LANG": "C.UTF-8",
            "TMPDIR": TMP_DIR if sandboxed else str(work),
        }
        if self.user is not None:
            env["USER"] = env["LOGNAME"] = self.user.name
        env.update(spec.env)
        env.update(spec.agent_env)
        env.update(
            {
                "CUDA_VISIBLE_DEVICES": ",".join(visible),
                "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                "GPGPU_LEASE_ID": str(spec.lease_id),
                "GPGPU_JOB_ID": str(spec.job_id),
            }
        )
        program = spec.command[0]
        if "/" in program:
            inside = program if os.path.isabs(program) else None
            found = inside is None or (os.path.isfile(inside) and os.access(inside, os.X_OK))
        else:
            found = shutil.which(program, path=env["PATH"]) is not None
        if not found:
            raise RunnerError(f"command not found: {program!r} (searched PATH={env['PATH']})")

        self.store.ensure()
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.prepare()
        work.mkdir(exist_ok=True, mode=0o700)
        if self.user is not None:
            os.chown(work, self.user.uid, self.user.gid)
        try:
            checkpoint.prepare_work(work, spec, owner=(self.user.uid, self.user.gid) if self.user is not None else None)
        except checkpoint.CheckpointError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise RunnerError(str(exc)) from exc
        log_path = self.log_dir / f"lease-{spec.lease_id}.log"
        exit_path = self.store.exit_path(spec.lease_id)
        try:
            exit_path.unlink()  # a stale exit file would end the new run at once
        except FileNotFoundError:
            pass
        cgroup_dirs: tuple[str, ...] = ()
        if self.cgroups is not None and self.limits is not None:
            try:
                cgroup_dirs = self.cgroups.create(spec.lease_id, self.limits)
            except CgroupError as exc:
                raise RunnerError(f"could not set the job's limits: {exc}") from exc
        fds: list[int] = []
        try:
            argv = [self.python, "-I", "-S", str(SHIM), str(exit_path)]
            if self.user is not None:
                argv += ["--uid", str(self.user.uid), "--gid", str(self.user.gid)]
            for directory in cgroup_dirs:
                argv += ["--cgroup", directory]
            if self.fence_dir is not None:
                argv += ["--fence", str(deadline_path(self.fence_dir, spec.lease_id))]
                argv += ["--grace", f"{max(0.0, self.fence_grace_s):g}"]
                argv += ["--term-depth", str(_SANDBOX_DEPTH if sandboxed else 1)]
            argv += ["--log-max", str(self.log_max_bytes)]
            if self.sandbox is not None:
                command, fds = self._sandbox_command(spec, work, env, minors)
                for fd in fds:
                    argv += ["--pass-fd", str(fd)]
                child_env = {"PATH": self.path}
                cwd = "/"
            else:
                command, child_env, cwd = list(spec.command), env, str(work)
            argv += ["--", *command]
            # Emptied: a log left by a try that never started is no run's, and the cap counts from 0.
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
            with open(log_fd, "ab") as log_file:
                child = subprocess.Popen(  # noqa: S603 - argv, no shell; the command is the job's
                    argv,
                    cwd=cwd,
                    env=child_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=fds,
                )
        except OSError as exc:
            if self.cgroups is not None:
                self.cgroups.remove(cgroup_dirs)
            raise RunnerError(f"could not start the job: {exc.strerror or exc}") from exc
        finally:
            for fd in fds:
                os.close(fd)
        stat = proc_stat(child.pid)
        record = ProcessRecord(
            lease_id=spec.lease_id,
            job_id=spec.job_id,
            pid=child.pid,
            pgid=child.pid,  # start_new_session: the supervisor leads its group
            start_ticks=stat.start_ticks if stat is not None else -1,
            boot_id=self._boot_id,
            started_at=datetime.now(UTC).isoformat(),
            command=tuple(spec.command),
            gpu_uuids=tuple(spec.gpu_uuids),
            log_path=str(log_path),
            exit_path=str(exit_path),
            work_dir=str(work),
            cgroups=cgroup_dirs,
            sandboxed=sandboxed,
        )
        self._children[spec.lease_id] = child
        self._records[spec.lease_id] = record
        self.store.save(record)
        log.info("lease %s: started %s as pid %s", spec.lease_id, list(spec.command), child.pid)
        return self.poll(spec.lease_id)

    def prepare(self) -> None:
        """Create the leases' root. bwrap binds a lease's directory by its path as the rental
        user, so with a rental user the root and every directory above it must let others pass
        through (x) without listing it: the root is 0711 and must not be inside the agent's own
        0700 state directory. Each lease's directory is 0700 and the rental user's."""
        if self.user is None:
            self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            return
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chmod(self.work_dir, 0o711)  # noqa: S103 - pass-through only (no r): see the docstring
        for directory in [self.work_dir, *self.work_dir.resolve().parents]:
            if not os.stat(directory).st_mode & 0o001:
                raise RunnerError(
                    f"the rentals directory {self.work_dir} is below {directory}, which other users may not "
                    "pass through; set rentals_dir outside the agent's state directory (gpgpu-agent setup does)"
                )

    def _sandbox_command(
        self, spec: LeaseSpec, work: Path, env: Mapping[str, str], minors: list[int]
    ) -> tuple[list[str], list[int]]:
        """``bwrap --args FD`` and the descriptors it reads: the work directory (bound by
        descriptor: the rental user needs no path to it), /etc/passwd and /etc/group, and the
        argument list itself (so the job's environment is not in any process listing)."""
        assert self.sandbox is not None
        uid = self.user.uid if self.user is not None else os.geteuid()
        gid = self.user.gid if self.user is not None else os.getegid()
        passwd, group = passwd_text(self.user, uid, gid)
        fds: list[int] = []
        try:
            work_fd = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
            fds.append(work_fd)
            passwd_fd = _memfd("passwd", passwd)
            fds.append(passwd_fd)
            group_fd = _memfd("group", group)
            fds.append(group_fd)
            view = LeaseView(
                lease_id=spec.lease_id,
                work_fd=work_fd,
                passwd_fd=passwd_fd,
                group_fd=group_fd,
                uid=uid,
                gid=gid,
                env=env,
                command=spec.command,
                gpu_minors=minors,
                tmp_bytes=self.tmp_bytes,
            )
            full = self.sandbox.argv(view)
            split = full.index("--")
            options = b"".join(a.encode("utf-8", "surrogateescape") + b"\0" for a in full[1:split])
            args_fd = _memfd("args", options)
            fds.append(args_fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        # bwrap reads its options from the descriptor; the command itself must follow on argv.
        return [full[0], "--args", str(args_fd), *full[split:]], fds

    def poll(self, lease_id: int) -> RunState:
        """The workload's state now. Raises UnknownLeaseError for a lease without a record."""
        record = self._require(lease_id)
        exit_record = self._exit(record)
        stats = all_proc_stats() if exit_record is None else None
        pids: tuple[int, ...] = ()
        if exit_record is None and stats is not None and self._leader_alive(record):
            pids = workload_pids(record.pid, record.pgid, stats)
        if lease_id not in self._cut_told and self._log_cut(record):
            self._cut_told.add(lease_id)
            head, tail = shim.log_split(self.log_max_bytes)
            log.warning(
                "lease %s: the job's output passed the %d bytes its log keeps; the rest is left out but for its "
                "last %d bytes (the job goes on)",
                lease_id,
                head,
                tail,
            )
        return RunState(
            lease_id=lease_id,
            running=exit_record is None,
            exit_code=None if exit_record is None else exit_record.exit_code,
            pids=pids,
            started_at=_parse_time(record.started_at),
            log_tail=read_tail(Path(record.log_path), self.log_tail_bytes),
            ended_at=None if exit_record is None else exit_record.exited_at,
            fenced_at=None if exit_record is None else exit_record.fenced_at,
        )

    def workspace(self, lease_id: int) -> Path | None:
        """The lease's work directory (the job's /work), while its records are kept."""
        record = self._record(lease_id)
        return Path(record.work_dir) if record is not None else None

    def read_output(self, lease_id: int, *, offset: int, limit: int) -> OutputRead | None:
        """Up to ``limit`` bytes of the lease's log file from ``offset`` (protocols.OutputReader):
        a plain read of the file the workload appends to. None for a lease without a record."""
        record = self._record(lease_id)
        if record is None:
            return None
        data, next_offset = read_from(Path(record.log_path), offset, limit)
        return OutputRead(data=data, next_offset=next_offset)

    def stop(self, lease_id: int, *, grace_s: float) -> RunState:
        """SIGTERM the workload's process group (and descendants that left it), wait up to
        ``grace_s`` for the workload to end, then SIGKILL them all; returns once the supervisor,
        the last of the workload's processes, is gone too (it records the exit just before it
        ends), within ``grace_s + 2 * kill_wait_s``. Stopping an ended workload returns its state."""
        record = self._require(lease_id)
        deadline = time.monotonic() + max(0.0, grace_s)
        if self._exit(record) is not None:
            return self._gone(record)
        self._signal(record, signal.SIGTERM)
        while time.monotonic() < deadline:
            if self._exit(record) is not None:
                return self._gone(record)
            time.sleep(min(_POLL_STEP_S, max(0.0, deadline - time.monotonic())))
        if self._exit(record) is None:
            log.info("lease %s: still running %.1f s after SIGTERM; sending SIGKILL", lease_id, grace_s)
            self._signal(record, signal.SIGKILL)
            kill_deadline = time.monotonic() + self.kill_wait_s
            while time.monotonic() < kill_deadline and self._exit(record) is None:
                time.sleep(_POLL_STEP_S)
            if self._exit(record) is None:
                # The supervisor would not die within kill_wait_s (uninterruptible sleep in the
                # kernel, typically a GPU driver call): report the kill; it cannot outlive SIGKILL.
                write_exit(
                    Path(record.exit_path),
                    ExitRecord(EXIT_KILLED, "killed with SIGKILL", exited_at=datetime.now(UTC)),
                )
                return self.poll(lease_id)
        return self._gone(record)

    def _gone(self, record: ProcessRecord) -> RunState:
        """The ended workload's state once its supervisor has exited too (at most kill_wait_s
        after its exit record, which it writes last): a stopped lease then holds no process, and
        none of the GPU memory a process holds until it ends."""
        deadline = time.monotonic() + self.kill_wait_s
        while self._leader_alive(record) and time.monotonic() < deadline:
            time.sleep(_POLL_STEP_S)
        return self.poll(record.lease_id)

    def adopt(self) -> list[RunState]:
        """Take back every lease with a pid file in the state directory, as after an agent restart.

        Returns one RunState per record: running ones (their supervisor is alive: same pid, same
        start time, same boot) are managed again, never signalled by adopting them; ended ones
        carry the exit code and end time their supervisor recorded, or 137 and the time it was
        found gone when it vanished without a record (killed while the agent was down). A pid
        that now belongs to another process (the kernel reused it) is never taken for the
        workload: that lease is reported ended and its pid untouched.
        """
        states = []
        for record in self.store.all():
            self._records[record.lease_id] = record
            states.append(self.poll(record.lease_id))
        return states

    def forget(self, lease_id: int) -> None:
        """Delete an ended lease's pid file, exit file, log and scratch directory. Forgetting an
        unknown lease does nothing; forgetting a running one raises RunnerError."""
        record = self._record(lease_id)
        if record is None:
            return
        if self._exit(record) is None:
            raise RunnerError(f"lease {lease_id} is still running; stop it before forgetting it")
        self.store.delete(lease_id)
        try:
            Path(record.log_path).unlink()
        except FileNotFoundError:
            pass
        # rmtree does not follow the symlinks a job may have planted in its work directory.
        shutil.rmtree(record.work_dir, ignore_errors=True)
        if record.cgroups and self.cgroups is not None:
            self.cgroups.remove(record.cgroups)
        self._records.pop(lease_id, None)
        self._cut_told.discard(lease_id)
        child = self._children.pop(lease_id, None)
        if child is not None:
            child.poll()

    # --- internals ------------------------------------------------------------------------

    def _record(self, lease_id: int) -> ProcessRecord | None:
        record = self._records.get(lease_id)
        if record is None:
            record = self.store.load(lease_id)
            if record is not None:
                self._records[lease_id] = record
        return record

    def _require(self, lease_id: int) -> ProcessRecord:
        record = self._record(lease_id)
        if record is None:
            raise UnknownLeaseError(lease_id)
        return record

    def _log_cut(self, record: ProcessRecord) -> bool:
        """Whether the supervisor cut the lease's log: its cut line is where the cap put it. Read
        there and nowhere else, so no output of the job's can pass for it. A lease started with
        another cap (an agent of another version) is not reported."""
        head, _tail = shim.log_split(self.log_max_bytes)
        try:
            fd = os.open(record.log_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return os.pread(fd, len(shim.CUT_MARK), head) == shim.CUT_MARK
        except OSError:
            return False
        finally:
            os.close(fd)

    def _leader_alive(self, record: ProcessRecord) -> bool:
        """Whether the lease's supervisor still runs: the pid is alive, not a zombie, and is the
        same process (same start time, same boot), not one the kernel has since given the pid."""
        child = self._children.get(record.lease_id)
        if child is not None:
            child.poll()  # reap it if it ended, so it does not linger as a zombie
        stat = proc_stat(record.pid)
        if stat is None or stat.zombie:
            return False
        if record.boot_id is not None and self._boot_id is not None and record.boot_id != self._boot_id:
            return False
        return stat.start_ticks == record.start_ticks

    def _exit(self, record: ProcessRecord) -> ExitRecord | None:
        """The workload's exit, or None while it runs. When the supervisor is gone without
        writing one, records (and returns) how it ended, so every later answer is the same."""
        exit_path = Path(record.exit_path)
        found = read_exit(exit_path)
        if found is not None or self._leader_alive(record):
            return found
        found = read_exit(exit_path)  # it may have written it just before exiting
        if found is not None:
            return found
        child = self._children.get(record.lease_id)
        code = EXIT_KILLED
        if child is not None and child.returncode is not None:
            code = child.returncode if child.returncode >= 0 else 128 - child.returncode
        # When it ended is not known: the time it was found gone is the best there is.
        lost = ExitRecord(
            code, "the workload's supervisor ended without recording an exit status", exited_at=datetime.now(UTC)
        )
        write_exit(exit_path, lost)
        return lost

    def _signal(self, record: ProcessRecord, signum: signal.Signals) -> None:
        """Send ``signum`` to the workload. Only while the supervisor is provably the one the
        runner started: a reused pid or process group id belongs to someone else and is never
        signalled.

        SIGKILL goes to everything: the process group, every descendant of the supervisor (also
        those that left the group) and every process in the lease's cgroup. Any other signal of a
        sandboxed lease goes to the workload's own processes only, not to bwrap's two (the
        supervisor's child and grandchild): bwrap dying would SIGKILL the sandbox at once."""
        stats = all_proc_stats()
        if not self._leader_alive(record):
            if signum == signal.SIGKILL and record.cgroups and self.cgroups is not None:
                self.cgroups.kill(record.cgroups)
            return
        if signum != signal.SIGKILL and record.sandboxed:
            for pid, depth in _descendants(record.pid, stats).items():
                if depth >= _SANDBOX_DEPTH:
                    _kill(pid, signum)
            return
        pids = workload_pids(record.pid, record.pgid, stats)
        try:
            os.killpg(record.pgid, signum)
        except ProcessLookupError:
            pass
        for pid in pids:
            st = stats.get(pid)
            if st is not None and st.pgid != record.pgid:
                _kill(pid, signum)
        if signum == signal.SIGKILL and record.cgroups and self.cgroups is not None:
            self.cgroups.kill(record.cgroups)


def _kill(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _descendants(leader: int, stats: Mapping[int, ProcStat]) -> dict[int, int]:
    """Live descendants of ``leader`` → their depth below it (1: its children)."""
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    found: dict[int, int] = {}
    stack = [(leader, 0)]
    while stack:
        pid, depth = stack.pop()
        for child in children.get(pid, ()):
            if child in found or child == leader:
                continue
            if not stats[child].zombie:
                found[child] = depth + 1
            stack.append((child, depth + 1))
    return found


def _memfd(name: str, data: bytes) -> int:
    """An anonymous in-memory file holding ``data``, positioned at its start."""
    fd = os.memfd_create(f"gpgpu-{name}", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
