"""`gpgpu-agent doctor`: checks this machine can rent out its GPUs, in plain words.

One line per check, `OK`, `WARN` or `FAIL`, then a summary. Exit status 1 when any check
failed. Each check catches its own errors: a missing driver is a FAIL line, never a traceback.
"""

from __future__ import annotations

import email.utils
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from gpgpu_agent.config import AgentConfig

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


def check_docker(config: AgentConfig) -> list[Finding]:
    """`docker info`, and the NVIDIA container runtime among its runtimes."""
    needed = config.runner == "docker" and not config.simulate
    missing_level: Level = "FAIL" if needed else "WARN"
    if shutil.which("docker") is None:
        words = "the docker command is not installed"
        if not needed:
            words += "; container jobs cannot run (process jobs can)"
        return [Finding(missing_level, "Docker", words)]
    info = _run(["docker", "info", "--format", "{{json .Runtimes}}"])
    if info is None or info.returncode != 0:
        detail = (info.stderr.strip().splitlines() or ["no answer"])[-1] if info else "no answer"
        return [
            Finding(
                missing_level,
                "Docker",
                f"`docker info` failed: {detail} (is the daemon running, is the agent's user in the docker group?)",
            )
        ]
    out = [Finding("OK", "Docker", "the Docker daemon answers")]
    if "nvidia" in info.stdout:
        out.append(Finding("OK", "NVIDIA container runtime", "registered with Docker"))
    elif shutil.which("nvidia-container-toolkit") or shutil.which("nvidia-container-runtime-hook"):
        out.append(Finding("OK", "NVIDIA container runtime", "the NVIDIA container toolkit is installed"))
    else:
        out.append(
            Finding(
                missing_level,
                "NVIDIA container runtime",
                "not found: install the NVIDIA Container Toolkit so containers can use the GPUs",
            )
        )
    return out


def check_marketplace(config: AgentConfig, url: str, *, get: Callable[..., Any] | None = None) -> list[Finding]:
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


def check_files(config: AgentConfig) -> list[Finding]:
    """The credential and the signing key exist and only their owner may read them."""
    out = []
    for name, path in (("credential", config.credential_path), ("signing key", config.key_path)):
        out.append(_private_file(name, Path(path)))
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


def run_doctor(config: AgentConfig, *, out: Any = None) -> int:
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
    for check in (check_nvidia, check_docker, check_files):
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
