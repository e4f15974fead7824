"""The agent's settings, from four places in order of precedence:

    command-line flag  >  environment (GPGPU_AGENT_<KEY>)  >  TOML file  >  defaults

The file is --config (or GPGPU_AGENT_CONFIG), else <state_dir>/agent.toml, else
/etc/gpgpu-agent/agent.toml; a missing default file is fine, a missing named one is an error.
An unknown key in the file, or a value that does not parse or is out of range wherever it came
from, raises ConfigError with a sentence naming the key and its source; the CLI prints it and
exits 2.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import SupportsFloat, SupportsIndex, SupportsInt, TypedDict, TypeVar, cast

T = TypeVar("T")

ENV_PREFIX = "GPGPU_AGENT_"
SYSTEM_STATE_DIR = Path("/var/lib/gpgpu-agent")
SYSTEM_CONFIG_FILE = Path("/etc/gpgpu-agent/agent.toml")
CONFIG_FILE_NAME = "agent.toml"
CREDENTIAL_FILE_NAME = "credential.json"
KEY_FILE_NAME = "signing.key"
CONTAINER_ENGINES = ("auto", "podman", "docker", "none")
CONTAINER_RUNTIMES = ("auto", "runc", "runsc", "crun")
CONTAINER_NETWORKS = ("filtered", "none")
SYSTEM_RENTALS_DIR = Path("/var/lib/gpgpu-rentals")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(Exception):
    """A setting is unknown or invalid; the message names the key and where it came from."""


def default_state_dir() -> Path:
    """/var/lib/gpgpu-agent for root (and the systemd unit), else ~/.local/state/gpgpu-agent."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    return Path.home() / ".local" / "state" / "gpgpu-agent"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Every setting the agent reads. Build with `load_config`, which validates each value."""

    marketplace_url: str = ""
    state_dir: Path = SYSTEM_STATE_DIR
    # Empty: <state_dir>/credential.json and <state_dir>/signing.key.
    credential_file: Path | None = None
    key_file: Path | None = None
    # Normally the marketplace says how often to heartbeat; this overrides it.
    heartbeat_interval_s: float | None = None
    # How often GPUs are sampled; a leased GPU is checked this often for its owner (reclaim ≤ 10 s).
    poll_interval_s: float = 1.0
    idle_threshold_pct: float = 10.0
    idle_grace_s: float = 120.0
    # SIGTERM (or docker stop -t) to SIGKILL; with poll_interval_s it bounds a reclaim.
    stop_grace_s: float = 5.0
    usage_interval_s: float = 60.0
    # Container jobs: the engine (auto: podman, else docker, else none), its OCI runtime (auto:
    # gVisor's runsc when the engine has it) and their network ("filtered": the internet but not
    # the owner's network; "none": no network at all).
    container_engine: str = "auto"
    container_runtime: str = "auto"
    container_network: str = "filtered"
    # Process jobs run only when the provider opts in, sandboxed (bubblewrap) as process_user.
    allow_process_jobs: bool = False
    process_user: str = "gpgpu-rental"
    # Where each lease's work directory is made (outside the state dir: the rental user passes
    # through it). Empty: /var/lib/gpgpu-rentals as root, else <state_dir>/rentals.
    rentals_dir: Path | None = None
    # Limits of every job, container or process. Empty: all CPUs but one, 3/4 of the memory.
    job_cpus: float | None = None
    job_memory: str | None = None
    job_pids: int = 4096
    spool_max_items: int = 100_000
    # A running job's output is shipped live (its renter follows it), up to this many bytes per
    # lease; 0: only the tail that comes with its end.
    log_max_bytes: int = 10 * 1024 * 1024
    offer_mig: bool = False
    hostname: str = ""
    region: str = ""
    simulate: bool = False
    simulate_gpus: str = "RTX 4090:24564"
    time_scale: float = 1.0
    # Simulated owners never use their GPUs (demos and tests that want a GPU free at once).
    simulate_owners_idle: bool = False
    # Stop every rental when the daemon stops (demos, tests). Off by default: a real agent leaves
    # them running and the next start adopts them, so an upgrade or a restart costs renters nothing.
    stop_rentals_on_exit: bool = False
    log_level: str = "INFO"

    @property
    def credential_path(self) -> Path:
        return self.credential_file or self.state_dir / CREDENTIAL_FILE_NAME

    @property
    def key_path(self) -> Path:
        return self.key_file or self.state_dir / KEY_FILE_NAME

    @property
    def rentals_path(self) -> Path:
        if self.rentals_dir is not None:
            return self.rentals_dir
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            return SYSTEM_RENTALS_DIR
        return self.state_dir / "rentals"

    @property
    def spool_path(self) -> Path:
        return self.state_dir / "spool.sqlite3"

    @property
    def status_path(self) -> Path:
        """The small JSON file the daemon rewrites after each heartbeat (read by `status`)."""
        return self.state_dir / "status.json"

    @property
    def runs_dir(self) -> Path:
        """Where runners keep their records (pid files, logs) of leases."""
        return self.state_dir / "runs"

    @property
    def fence_dir(self) -> Path:
        """The leases' fence deadlines, which their watchdogs read (gpgpu_agent.fencing)."""
        return self.state_dir / "fence"

    def simulated_gpus(self) -> list[tuple[str, int]]:
        """`simulate_gpus` as [(model, vram_mb)]; validated by load_config."""
        return _parse_gpus(self.simulate_gpus)


# --- parsing and validation of single values ---------------------------------------------------


def _float_in(lo: float, hi: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        try:
            number = float(_float_arg(value))
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if not lo <= number <= hi:  # also refuses NaN
            raise ValueError(f"must be between {lo:g} and {hi:g}, not {value}")
        return number

    return parse


def _int_in(lo: int, hi: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"{value!r} is not a whole number")
        try:
            number = int(_int_arg(value))
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a whole number") from None
        if not lo <= number <= hi:
            raise ValueError(f"must be between {lo} and {hi}, not {number}")
        return number

    return parse


def _float_arg(value: object) -> str | bytes | SupportsFloat | SupportsIndex:
    """`value`, when float() takes it; TypeError otherwise (as from float())."""
    if isinstance(value, str | bytes | SupportsFloat | SupportsIndex):
        return value
    raise TypeError(f"float() argument must be a string or a real number, not {type(value).__name__!r}")


def _int_arg(value: object) -> str | bytes | SupportsInt | SupportsIndex:
    """`value`, when int() takes it; TypeError otherwise (as from int())."""
    if isinstance(value, str | bytes | SupportsInt | SupportsIndex):
        return value
    raise TypeError(f"int() argument must be a string or a real number, not {type(value).__name__!r}")


def _optional(parse: Callable[[object], T]) -> Callable[[object], T | None]:
    def parse_optional(value: object) -> T | None:
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        return parse(value)

    return parse_optional


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _choice(options: tuple[str, ...], *, upper: bool = False) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip()
        text = text.upper() if upper else text.lower()
        if text not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return text

    return parse


def _text(max_len: int) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not text")
        if len(value) > max_len or "\x00" in value:
            raise ValueError(f"must be at most {max_len} characters")
        return value.strip()

    return parse


def _url(value: object) -> str:
    text = _text(500)(value).rstrip("/")
    if text and not (text.startswith("http://") or text.startswith("https://")):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return text


def _path(value: object) -> Path:
    text = _text(1000)(value)
    if not text:
        raise ValueError("must not be empty")
    return Path(text).expanduser()


def _memory(value: object) -> str:
    text = _text(20)(value).lower()
    number = text[:-1] if text and text[-1] in "kmg" else text
    if not number.isdigit() or int(number) == 0:
        raise ValueError(f"{value!r} is not a memory size such as 16g or 4096m")
    return text


def _user_name(value: object) -> str:
    text = _text(32)(value)
    if not text or not text[0].isalpha() or not all(c.isalnum() or c in "-_." for c in text):
        raise ValueError(f"{value!r} is not a user name")
    if text == "root":
        raise ValueError("process jobs never run as root")
    return text


def _parse_gpus(value: object) -> list[tuple[str, int]]:
    text = _text(2000)(value)
    gpus: list[tuple[str, int]] = []
    for part in text.split(","):
        model, sep, vram = part.strip().rpartition(":")
        if not sep or not model.strip() or not vram.strip().isdigit() or not 0 < int(vram) < 2**31:
            raise ValueError(f"{part.strip()!r} is not MODEL:VRAM_MB (for example 'RTX 4090:24564')")
        gpus.append((model.strip(), int(vram)))
    if not 1 <= len(gpus) <= 64:
        raise ValueError("must name 1 to 64 GPUs")
    return gpus


def _gpus(value: object) -> str:
    _parse_gpus(value)
    return str(value).strip()


PARSERS: dict[str, Callable[[object], object]] = {
    "marketplace_url": _url,
    "state_dir": _path,
    "credential_file": _optional(_path),
    "key_file": _optional(_path),
    "heartbeat_interval_s": _optional(_float_in(0.1, 3600)),
    "poll_interval_s": _float_in(0.05, 2.0),
    "idle_threshold_pct": _float_in(0, 100),
    "idle_grace_s": _float_in(0, 86_400),
    "stop_grace_s": _float_in(0, 8),
    "usage_interval_s": _float_in(0.5, 3600),
    "container_engine": _choice(CONTAINER_ENGINES),
    "container_runtime": _choice(CONTAINER_RUNTIMES),
    "container_network": _choice(CONTAINER_NETWORKS),
    "allow_process_jobs": _bool,
    "process_user": _user_name,
    "rentals_dir": _optional(_path),
    "job_cpus": _optional(_float_in(0.01, 4096)),
    "job_memory": _optional(_memory),
    "job_pids": _int_in(16, 4_194_304),
    "spool_max_items": _int_in(10, 10_000_000),
    "log_max_bytes": _int_in(0, 1024**3),
    "offer_mig": _bool,
    "hostname": _text(255),
    "region": _text(64),
    "simulate": _bool,
    "simulate_gpus": _gpus,
    "time_scale": _float_in(0.001, 10_000),
    "simulate_owners_idle": _bool,
    "stop_rentals_on_exit": _bool,
    "log_level": _choice(LOG_LEVELS, upper=True),
}
KEYS = tuple(f.name for f in fields(AgentConfig))
assert set(PARSERS) == set(KEYS), "every setting needs a parser"


class _Parsed(TypedDict, total=False):
    """The settings as their parsers (PARSERS) return them: AgentConfig's fields and types."""

    marketplace_url: str
    state_dir: Path
    credential_file: Path | None
    key_file: Path | None
    heartbeat_interval_s: float | None
    poll_interval_s: float
    idle_threshold_pct: float
    idle_grace_s: float
    stop_grace_s: float
    usage_interval_s: float
    container_engine: str
    container_runtime: str
    container_network: str
    allow_process_jobs: bool
    process_user: str
    rentals_dir: Path | None
    job_cpus: float | None
    job_memory: str | None
    job_pids: int
    spool_max_items: int
    log_max_bytes: int
    offer_mig: bool
    hostname: str
    region: str
    simulate: bool
    simulate_gpus: str
    time_scale: float
    simulate_owners_idle: bool
    stop_rentals_on_exit: bool
    log_level: str


assert set(_Parsed.__annotations__) == set(KEYS), "every setting has its parsed type"


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, KEYS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _set(values: dict[str, object], key: str, raw: object, where: str) -> None:
    try:
        values[key] = PARSERS[key](raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: invalid value for '{key}': {exc}") from None


def _read_file(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    # An [agent] table is accepted as well as top-level keys.
    if set(data) == {"agent"} and isinstance(data["agent"], dict):
        data = data["agent"]
    return data


def load_config(
    flags: Mapping[str, object] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_file: Path | str | None = None,
) -> AgentConfig:
    """Merge defaults, the TOML file, the environment and the flags (each overriding the one
    before) into a validated AgentConfig. `flags` holds only the options given on the command
    line (None values are ignored). Raises ConfigError."""
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    for key in flags:
        if key not in PARSERS:
            raise _unknown(key, "command line")

    env_values: dict[str, object] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in PARSERS:
            raise _unknown(key, f"environment variable {name}")
        _set(env_values, key, raw, f"environment variable {name}")
    flag_values: dict[str, object] = {}
    for key, given in flags.items():
        _set(flag_values, key, given, f"command line option --{key.replace('_', '-')}")

    # The state dir decides where the default file is, so it is settled before the file is read.
    state_dir = _parsed_path(flag_values, "state_dir") or _parsed_path(env_values, "state_dir") or default_state_dir()
    named = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    file_values: dict[str, object] = {}
    path: Path | None
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
    else:
        candidates = [Path(state_dir) / CONFIG_FILE_NAME, SYSTEM_CONFIG_FILE]
        path = next((p for p in candidates if p.is_file()), None)
    if path is not None:
        where = path.name if not named else str(path)
        for key, written in _read_file(path).items():
            if key not in PARSERS:
                raise _unknown(key, where)
            _set(file_values, key, written, where)

    merged: dict[str, object] = {"state_dir": default_state_dir()}
    merged.update(file_values)
    merged.update(env_values)
    merged.update(flag_values)
    # Each value is its key's parser's result (PARSERS), of its setting's type: what _Parsed says.
    return AgentConfig(**cast(_Parsed, merged))


def _parsed_path(values: Mapping[str, object], key: str) -> Path | None:
    value = values.get(key)
    return value if isinstance(value, Path) else None
