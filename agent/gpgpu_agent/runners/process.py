"""The process runner: runs a lease's command as a plain process group on the leased GPUs.

Isolation is a process group and CUDA_VISIBLE_DEVICES, not a sandbox: the workload runs as the
agent's user and could look past CUDA_VISIBLE_DEVICES. Providers who rent to strangers use the
Docker runner; this one is for trusted jobs and for machines without Docker.

How one lease runs:

- ``shim.py`` (the supervisor) is started with ``start_new_session=True``: it leads a new session
  and process group, which the workload (its child) and the workload's children share, so one
  signal to the group reaches all of them and none is reached by a signal to the agent's group;
- stdin is /dev/null; stdout and stderr go to ``<log_dir>/lease-<id>.log``;
- the environment is built from nothing: PATH, HOME (the lease's scratch directory, also its
  working directory), LANG, then the job's ``env``, then what the agent sets and the job cannot
  override: CUDA_VISIBLE_DEVICES (the leased GPUs' indexes, comma-joined in lease order),
  CUDA_DEVICE_ORDER=PCI_BUS_ID (so CUDA numbers GPUs as NVML does), GPGPU_LEASE_ID, GPGPU_JOB_ID;
- the pid file (see state.py) is written atomically once the supervisor has a pid.

Exit codes (RunState.exit_code) follow the shell's convention, as Docker's do: the workload's own
status 0–255; 128+n when signal n ended it (143: SIGTERM, 137: SIGKILL). 137 is also reported
when the supervisor itself vanished without recording an exit (someone SIGKILLed it, or the
runner did at the end of a stop's grace period).

After an agent restart the workloads keep running (they are in their own session, their output
goes to files, and the supervisor, not the agent, waits for them); ``adopt`` finds them again by
their pid files. The agent's systemd unit must therefore use ``KillMode=process``, or stopping
the agent would kill the workloads with it.
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

from gpgpu_agent.protocols import RunnerError
from gpgpu_agent.runners.common import EXIT_KILLED, UnknownLeaseError, check_env, check_gpu_uuids
from gpgpu_agent.runners.state import (
    LOG_TAIL_BYTES,
    ExitRecord,
    ProcessRecord,
    RecordStore,
    all_proc_stats,
    boot_id,
    proc_stat,
    read_exit,
    read_tail,
    workload_pids,
    write_exit,
)
from gpgpu_agent.types import LeaseSpec, RunState

log = logging.getLogger(__name__)

SHIM = Path(__file__).with_name("shim.py")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTAINER_REFUSED = "this machine runs process jobs only; install Docker for container jobs"
# Variables the agent sets last, whatever the job's env says.
RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPGPU_LEASE_ID", "GPGPU_JOB_ID")
_POLL_STEP_S = 0.02


class ProcessRunner:
    """Runs ``kind: "process"`` leases as supervised process groups (see the module docstring).

    ``state_dir`` is the agent's state directory (pid and exit files go to ``state_dir/runs``);
    ``log_dir`` holds the workloads' output (default ``state_dir/logs``); ``work_dir`` the leases'
    scratch directories (default ``state_dir/work``). ``kill_wait_s`` bounds how long ``stop``
    waits for the kernel to finish a SIGKILL: a stop returns within ``grace_s + kill_wait_s``.

    Workloads run as the agent's user: run the agent as an unprivileged user. One runner is
    driven from one thread (``stop`` blocks for up to its grace period).
    """

    def __init__(
        self,
        state_dir: Path | str,
        log_dir: Path | str | None = None,
        *,
        work_dir: Path | str | None = None,
        python: str = sys.executable,
        path: str = DEFAULT_PATH,
        kill_wait_s: float = 1.0,
        log_tail_bytes: int = LOG_TAIL_BYTES,
    ):
        state_dir = Path(state_dir)
        self.store = RecordStore(state_dir / "runs")
        self.log_dir = Path(log_dir) if log_dir is not None else state_dir / "logs"
        self.work_dir = Path(work_dir) if work_dir is not None else state_dir / "work"
        self.python = python
        self.path = path
        self.kill_wait_s = kill_wait_s
        self.log_tail_bytes = log_tail_bytes
        self._records: dict[int, ProcessRecord] = {}
        # Supervisors this runner started itself: it is their parent and must reap them.
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._boot_id = boot_id()

    # --- Runner protocol ------------------------------------------------------------------

    def start(self, spec: LeaseSpec, *, gpu_indexes: Mapping[str, int]) -> RunState:
        """Start the lease's command under its supervisor; a second call for the same lease
        returns the state of the first (also after an agent restart: the pid file is found).
        Raises RunnerError, with a sentence for the renter, when it cannot start."""
        if spec.kind != "process":
            raise RunnerError(CONTAINER_REFUSED)
        if self._record(spec.lease_id) is not None:
            return self.poll(spec.lease_id)
        if not spec.command:
            raise RunnerError("the job has no command to run")
        check_env(spec.env)
        check_gpu_uuids(spec.gpu_uuids)
        visible = []
        for uuid in spec.gpu_uuids:
            if uuid in gpu_indexes:
                visible.append(str(int(gpu_indexes[uuid])))
            elif uuid.startswith("MIG-"):
                visible.append(uuid)  # CUDA addresses a MIG instance by its uuid only
            else:
                raise RunnerError(f"GPU {uuid} is not on this machine")

        work = self.work_dir / f"lease-{spec.lease_id}"
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {"PATH": self.path, "HOME": str(work), "LANG": "C.UTF-8"}
        env.update(spec.env)
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
            resolved = program if os.path.isabs(program) else str(work / program)
            found = os.path.isfile(resolved) and os.access(resolved, os.X_OK)
        else:
            found = shutil.which(program, path=env["PATH"]) is not None
        if not found:
            raise RunnerError(f"command not found: {program!r} (searched PATH={env['PATH']})")

        self.store.ensure()
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = self.log_dir / f"lease-{spec.lease_id}.log"
        exit_path = self.store.exit_path(spec.lease_id)
        try:
            exit_path.unlink()  # a stale exit file would end the new run at once
        except FileNotFoundError:
            pass
        argv = [self.python, "-I", "-S", str(SHIM), str(exit_path), "--", *spec.command]
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            with open(log_fd, "ab") as log_file:
                child = subprocess.Popen(  # noqa: S603 - argv, no shell; the command is the job's
                    argv,
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            raise RunnerError(f"could not start the job: {exc.strerror or exc}") from exc
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
        )
        self._children[spec.lease_id] = child
        self._records[spec.lease_id] = record
        self.store.save(record)
        log.info("lease %s: started %s as pid %s", spec.lease_id, list(spec.command), child.pid)
        return self.poll(spec.lease_id)

    def poll(self, lease_id: int) -> RunState:
        """The workload's state now. Raises UnknownLeaseError for a lease without a record."""
        record = self._require(lease_id)
        exit_record = self._exit(record)
        stats = all_proc_stats() if exit_record is None else None
        pids: tuple[int, ...] = ()
        if exit_record is None and stats is not None and self._leader_alive(record):
            pids = workload_pids(record.pid, record.pgid, stats)
        return RunState(
            lease_id=lease_id,
            running=exit_record is None,
            exit_code=None if exit_record is None else exit_record.exit_code,
            pids=pids,
            started_at=_parse_time(record.started_at),
            log_tail=read_tail(Path(record.log_path), self.log_tail_bytes),
        )

    def stop(self, lease_id: int, *, grace_s: float) -> RunState:
        """SIGTERM the workload's process group (and descendants that left it), wait up to
        ``grace_s`` for the workload to end, then SIGKILL them all; returns within
        ``grace_s + kill_wait_s``. Stopping an ended workload returns its state."""
        record = self._require(lease_id)
        deadline = time.monotonic() + max(0.0, grace_s)
        if self._exit(record) is not None:
            return self.poll(lease_id)
        self._signal(record, signal.SIGTERM)
        while time.monotonic() < deadline:
            if self._exit(record) is not None:
                return self.poll(lease_id)
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
                write_exit(Path(record.exit_path), ExitRecord(EXIT_KILLED, "killed with SIGKILL"))
        return self.poll(lease_id)

    def adopt(self) -> list[RunState]:
        """Take back every lease with a pid file in the state directory, as after an agent restart.

        Returns one RunState per record: running ones (their supervisor is alive: same pid, same
        start time, same boot) are managed again, never signalled by adopting them; ended ones
        carry the exit code their supervisor recorded, or 137 when it vanished without one (killed
        while the agent was down). A pid that now belongs to another process (the kernel reused
        it) is never taken for the workload: that lease is reported ended and its pid untouched.
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
        shutil.rmtree(record.work_dir, ignore_errors=True)
        self._records.pop(lease_id, None)
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
        lost = ExitRecord(code, "the workload's supervisor ended without recording an exit status")
        write_exit(exit_path, lost)
        return lost

    def _signal(self, record: ProcessRecord, signum: signal.Signals) -> None:
        """Send ``signum`` to the workload's process group and to its descendants outside it.
        Only while the supervisor is provably the one the runner started: a reused pid or
        process group id belongs to someone else and is never signalled."""
        stats = all_proc_stats()
        if not self._leader_alive(record):
            return
        pids = workload_pids(record.pid, record.pgid, stats)
        try:
            os.killpg(record.pgid, signum)
        except ProcessLookupError:
            pass
        for pid in pids:
            st = stats.get(pid)
            if st is not None and st.pgid != record.pgid:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
