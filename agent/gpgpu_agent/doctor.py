"""`gpgpu-agent doctor`: checks this machine can rent out its GPUs, in plain words.

One line per check, `OK`, `WARN` or `FAIL`, then a summary. Exit status 1 when any check
failed. Each check catches its own errors: a missing driver is a FAIL line, never a traceback.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

from gpgpu_agent.config import AgentConfig
from gpgpu_agent.runners import kinds

if TYPE_CHECKING:
    import requests

Level = Literal["OK", "WARN", "FAIL"]
CLOCK_SKEW_WARN_S = 2.0


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str
    words: str


def check_nvidia(config: AgentConfig) -> list[Finding]:
    """The driver through NVML: driver and CUDA versions, the GPUs seen, MIG."""
    if config.simulate:
        return [Finding("OK", "NVIDIA driver", "simulation mode: the fake NVIDIA driver is used")]
    try:
        from gpgpu_agent.nvml import NvmlCollector

        collector = NvmlCollector(offer_mig=config.offer_mig)
    except ImportError as exc:
        return [Finding("FAIL", "NVIDIA driver", f"the NVML bindings are not installed ({exc.name})")]
    except Exception as exc:  # NvmlUnavailable carries the sentence
        return [Finding("FAIL", "NVIDIA driver", str(exc) or type(exc).__name__)]
    try:
        sample = collector.sample()
    except Exception as exc:
        return [Finding("FAIL", "NVIDIA driver", f"NVML started but reading the GPUs failed: {exc}")]
    finally:
        collector.close()
    out = [
        Finding(
            "OK",
            "NVIDIA driver",
            f"driver {sample.driver_version or 'unknown'}, CUDA {sample.cuda_version or 'unknown'}",
        )
    ]
    if not sample.gpus:
        out.append(Finding("FAIL", "GPUs", "the driver sees no GPU"))
    for gpu in sample.gpus:
        vram = f"{gpu.vram_total_mb} MB" if gpu.vram_total_mb else "VRAM unknown"
        if gpu.errors.get("gpu"):
            out.append(Finding("FAIL", f"GPU {gpu.index}", f"cannot be read: {gpu.errors['gpu']}"))
        elif gpu.declined_reason:
            out.append(Finding("WARN", f"GPU {gpu.index}", f"{gpu.model}, {vram}: not offered ({gpu.declined_reason})"))
        else:
            mig = f", MIG on with {len(gpu.mig_devices)} instance(s)" if gpu.mig_enabled else ""
            out.append(Finding("OK", f"GPU {gpu.index}", f"{gpu.model}, {vram}{mig}"))
    return out


def _run(argv: list[str], timeout: float = 15) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return None


ENGINE_SOCKETS = ("/run/podman/podman.sock", "/var/run/docker.sock", "/run/docker.sock")


def check_container(config: AgentConfig) -> list[Finding]:
    """Container jobs: the engine and its version, user namespaces, the OCI runtime (gVisor or
    not), the GPUs' plumbing (Podman: the NVIDIA CDI spec; Docker: the NVIDIA toolkit), the
    rentals network's firewall, and whether anyone else could drive the engine by its socket."""
    from gpgpu_agent.runners.container import ContainerRunner, gpu_plumbing_problem

    engine = getattr(config, "container_engine", "auto")
    if config.simulate:
        return [Finding("OK", "containers", "simulation mode: container jobs are not run")]
    if engine == "none":
        return [Finding("OK", "containers", "container jobs are off on this machine (container_engine = none)")]
    rentals = getattr(config, "rentals_path", None) or Path(config.state_dir) / "rentals"
    try:
        runner = ContainerRunner(
            engine=engine,
            runtime=getattr(config, "container_runtime", "auto"),
            network=getattr(config, "container_network", "filtered"),
            rentals_dir=Path(rentals),
            cpu_limit=getattr(config, "job_cpus", None),
            memory_limit=getattr(config, "job_memory", None),
            pids_limit=getattr(config, "job_pids", 4096),
        )
    except ValueError as exc:
        return [Finding("FAIL", "containers", str(exc))]
    missing: Level = "WARN" if engine == "auto" else "FAIL"
    if shutil.which(runner.engine_bin) is None:
        words = f"{runner.engine} is not installed"
        if engine == "auto":
            words = "neither podman nor docker is installed: container jobs cannot run"
        return [Finding(missing, "container engine", words + " (apt-get install podman catatonit)")]
    try:
        facts = runner.facts()
    except Exception as exc:  # RunnerError carries the sentence
        return [Finding(missing, "container engine", str(exc))]
    caps = runner.capabilities()
    name = "Podman" if facts.engine == "podman" else "Docker"
    out = [Finding("OK", "container engine", f"{name} {facts.version}" + (", rootless" if facts.rootless else ""))]
    if facts.engine == "podman":
        if facts.user_namespace:
            out.append(
                Finding("OK", "user namespaces", "each container gets its own range of host uids (--userns=auto)")
            )
        else:
            out.append(
                Finding(
                    "FAIL",
                    "user namespaces",
                    "/etc/subuid and /etc/subgid have no range for `containers` (containers:2147483647:2147483648)",
                )
            )
    elif facts.user_namespace:
        out.append(Finding("OK", "user namespaces", "Docker runs with userns-remap: container root is not host root"))
    else:
        out.append(
            Finding(
                "WARN",
                "user namespaces",
                "Docker runs without userns-remap, so container root is host root: prefer Podman, or set "
                '"userns-remap": "default" in /etc/docker/daemon.json',
            )
        )
    runtime = caps["runtime"] or facts.default_runtime
    if runtime == "runsc":
        out.append(Finding("OK", "runtime", "gVisor (runsc): rentals do not talk to the host kernel directly"))
    elif caps["problem"] and "runtime is not known" in caps["problem"]:
        out.append(Finding("FAIL", "runtime", caps["problem"]))
    else:
        out.append(
            Finding(
                "WARN",
                "runtime",
                f"{runtime}: rentals share the host's kernel; install gVisor (runsc, https://gvisor.dev) for a "
                "second wall",
            )
        )
    gpu_problem = gpu_plumbing_problem(facts.engine, facts)
    gpu_words = "the NVIDIA CDI spec is present" if facts.engine == "podman" else "the NVIDIA toolkit is installed"
    out.append(
        Finding("FAIL", "container GPUs", gpu_problem) if gpu_problem else Finding("OK", "container GPUs", gpu_words)
    )
    if runner.firewall is None:
        out.append(Finding("OK", "rentals network", "none: containers get no network (container_network = none)"))
    else:
        problems = runner.firewall.check()
        if problems:
            words = "; ".join(problems) + ": run `gpgpu-agent setup` to install the rules"
            out.append(Finding("FAIL", "rentals firewall", words))
        else:
            words = (
                f"{runner.network_name} ({runner.subnet}) reaches the internet only; the nftables rules are in place"
            )
            out.append(Finding("OK", "rentals firewall", words))
    out.extend(_engine_socket_findings())
    return out


def _engine_socket_findings(paths: tuple[str, ...] = ENGINE_SOCKETS) -> list[Finding]:
    """A WARN for each engine socket that users other than root may open: whoever can is root."""
    import grp
    import pwd
    import stat

    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISSOCK(st.st_mode):
            continue
        if st.st_mode & 0o006:
            out.append(Finding("WARN", "engine socket", f"{path} is open to every user: each of them is root here"))
            continue
        if st.st_mode & 0o060:
            try:
                group = grp.getgrgid(st.st_gid)
            except KeyError:
                continue
            members = set(group.gr_mem) | {u.pw_name for u in pwd.getpwall() if u.pw_gid == st.st_gid}
            members.discard("root")
            if members:
                who = ", ".join(sorted(members))
                out.append(
                    Finding(
                        "WARN",
                        "engine socket",
                        f"{path} is open to group {group.gr_name} ({who}): each of them can drive the engine, "
                        f"which is root on this machine; remove them from the group",
                    )
                )
    return out


def check_marketplace(
    config: AgentConfig, url: str, *, get: Callable[..., requests.Response] | None = None
) -> list[Finding]:
    """GET <url>/healthz answers, and the clocks agree (Date header or server_time)."""
    if not url:
        return [Finding("FAIL", "marketplace", "no marketplace URL (register first, or set marketplace_url)")]
    import requests

    get = get or requests.get
    sent = datetime.now(UTC)
    try:
        response = get(f"{url.rstrip('/')}/healthz", timeout=10)
    except requests.RequestException as exc:
        return [Finding("FAIL", "marketplace", f"cannot reach {url}: {type(exc).__name__}")]
    received = datetime.now(UTC)
    if response.status_code != 200:
        return [Finding("FAIL", "marketplace", f"{url}/healthz answered {response.status_code}")]
    out = [Finding("OK", "marketplace", f"{url} is reachable")]
    server_time: datetime | None = None
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("server_time"):
            server_time = datetime.fromisoformat(str(body["server_time"]).replace("Z", "+00:00"))
    except ValueError:
        pass
    if server_time is None and response.headers.get("Date"):
        try:
            server_time = email.utils.parsedate_to_datetime(response.headers["Date"])
        except (TypeError, ValueError):
            server_time = None
    if server_time is None:
        out.append(Finding("WARN", "clock", "the marketplace did not say its time; clock skew unknown"))
        return out
    local = sent + (received - sent) / 2
    skew = (local - server_time).total_seconds()
    # A Date header has whole seconds: up to 1 s of the difference is its rounding.
    words = f"this clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} the marketplace's"
    if abs(skew) > CLOCK_SKEW_WARN_S:
        out.append(Finding("WARN", "clock", words + "; usage periods may be refused: enable NTP (timedatectl)"))
    else:
        out.append(Finding("OK", "clock", words))
    return out


def check_process_sandbox(config: AgentConfig) -> list[Finding]:
    """Whether process jobs are accepted, and if the provider opted in, whether the sandbox works
    here: bubblewrap, the rental user (the agent must be root), the per-lease cgroups."""
    if not config.allow_process_jobs:
        return [Finding("OK", "process jobs", "off (allow_process_jobs = false): this machine runs containers only")]
    runner, why = kinds.process_runner(config)
    if why is not None or runner is None:
        return [Finding("FAIL", "process jobs", f"allowed, but they cannot run sandboxed: {why}")]
    caps = runner.capabilities()
    limits = caps["limits"]
    limit_words = (
        f"limits {limits['cpus']:g} CPUs, {limits['memory_mb']} MB, {limits['pids']} processes"
        if limits["cpus"] is not None
        else "no CPU, memory or process limits (simulation without cgroups)"
    )
    who = f"as {caps['user']}" if caps["user"] else "as the agent's own user (simulation)"
    return [
        Finding(
            "OK",
            "process jobs",
            f"sandboxed by bubblewrap {caps['sandbox_version']} {who}, no network, {limit_words}",
        )
    ]


def check_files(config: AgentConfig) -> list[Finding]:
    """The credential and the signing key exist and only their owner may read them; the state
    directory is the agent's alone."""
    out = []
    for name, path in (("credential", config.credential_path), ("signing key", config.key_path)):
        out.append(_private_file(name, Path(path)))
    try:
        mode = config.state_dir.stat().st_mode & 0o777
    except OSError as exc:
        out.append(Finding("FAIL", "state directory", f"{config.state_dir} cannot be read: {exc.strerror}"))
    else:
        if mode & 0o077:
            out.append(
                Finding(
                    "FAIL",
                    "state directory",
                    f"{config.state_dir} has mode {mode:04o}: run `chmod 700 {config.state_dir}`",
                )
            )
        else:
            out.append(Finding("OK", "state directory", f"{config.state_dir} is the agent's alone ({mode:04o})"))
    return out


def _private_file(name: str, path: Path) -> Finding:
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return Finding("FAIL", name, f"{path} does not exist: run `gpgpu-agent register`")
    except OSError as exc:
        return Finding("FAIL", name, f"{path} cannot be read: {exc.strerror}")
    if mode & 0o077:
        return Finding("FAIL", name, f"{path} has mode {mode:04o}; others may read it: run `chmod 600 {path}`")
    return Finding("OK", name, f"{path} is present, mode {mode:04o}")


def run_doctor(config: AgentConfig, *, out: TextIO | None = None) -> int:
    """Print every finding and a summary; 1 when any check failed, else 0."""
    out = out or sys.stdout
    url = config.marketplace_url
    if not url:
        try:
            from gpgpu_agent.credentials import load_credential

            url = load_credential(config.credential_path).marketplace_url
        except Exception:
            url = ""
    findings: list[Finding] = []
    for check in (check_nvidia, check_container, check_process_sandbox, check_files):
        try:
            findings.extend(check(config))
        except Exception as exc:  # a check must never crash the doctor
            findings.append(Finding("FAIL", check.__name__.removeprefix("check_"), f"the check crashed: {exc}"))
    try:
        findings.extend(check_marketplace(config, url))
    except Exception as exc:
        findings.append(Finding("FAIL", "marketplace", f"the check crashed: {exc}"))
    for f in findings:
        print(f"{f.level:<4}  {f.check}: {f.words}", file=out)
    fails = sum(f.level == "FAIL" for f in findings)
    warns = sum(f.level == "WARN" for f in findings)
    if fails:
        print(f"{fails} problem(s) to fix, {warns} warning(s): this machine cannot rent out its GPUs yet.", file=out)
    elif warns:
        print(f"No problems; {warns} warning(s) worth a look.", file=out)
    else:
        print("All checks passed.", file=out)
    return 1 if fails else 0
