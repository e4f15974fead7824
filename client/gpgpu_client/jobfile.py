"""Job files (TOML or YAML) and `gpgpu run`'s flags, checked against what the submit API
(POST /api/v1/jobs/) takes before anything is sent, and turned into its body.

The file's keys, all optional but gpus, max_price and duration:

    name = "train"                 kind = "container" or "process" (default: container when
                                   an image is given, process for a command alone)
    image = "pytorch/pytorch:2.4"  command = ["python", "train.py"] (or one string, split like a shell)
    env = { EPOCHS = "3" }         gpus = 1
    vram = 20 (GB; or "24gb", "24564mb")
    models = ["RTX-4090"]          region = "eu"
    max_price = "0.50" (per GPU-hour)
    duration = "2h" (expected; seconds or 90s/30m/2h/1d)
    max_duration = "3h"            interruptible = true
    checkpoint_interval = "10m"
    checkpoint_dir = "/work/ckpt" (follows the job from machine to machine; README "Checkpoints")
"""

from __future__ import annotations

import posixpath
import re
import shlex
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from gpgpu_client.units import parse_duration, parse_price, parse_vram_mb

# The submit API's bounds (the server checks them again).
MAX_GPUS = 16
MAX_PRICE = Decimal("1000")
PRICE_DECIMALS = 6
MAX_DURATION_S = 30 * 24 * 3600
MIN_CHECKPOINT_S = 60
MAX_CHECKPOINT_S = 24 * 3600
MAX_COMMAND_PARTS = 256
MAX_ARGUMENT_CHARS = 4096
MAX_ENV_VARS = 128
MAX_ENV_VALUE_CHARS = 4096
MAX_MODELS = 32
KINDS = ("container", "process")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
CHECKPOINT_DIR_RE = re.compile(r"/work(/[A-Za-z0-9._@+-]+)+")
MAX_CHECKPOINT_DIR_CHARS = 200

KEYS = (
    "name",
    "kind",
    "image",
    "command",
    "env",
    "gpus",
    "vram",
    "models",
    "region",
    "max_price",
    "duration",
    "max_duration",
    "interruptible",
    "checkpoint_interval",
    "checkpoint_dir",
)


class JobFileError(ValueError):
    """A job file or flag the API would refuse; the message names the key."""


def job_file_read(path: Path) -> dict[str, Any]:
    """The file's table: TOML for .toml, YAML for .yaml/.yml."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(f"cannot read it: {exc.strerror if isinstance(exc, OSError) else exc}") from exc
    try:
        if suffix == ".toml":
            data: object = tomllib.loads(text)
        elif suffix in {".yaml", ".yml"}:
            data = yaml.safe_load(text)
        else:
            raise JobFileError("a job file ends in .toml, .yaml or .yml")
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(f"not valid TOML: {exc}") from exc
    except yaml.YAMLError as exc:
        raise JobFileError(f"not valid YAML: {' '.join(str(exc).split())}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobFileError("the file must hold a table of keys (name, gpus, max_price, duration, …)")
    return data


def job_spec(values: Mapping[str, Any]) -> dict[str, Any]:
    """The submit API's body for a job file's (or the flags') `values`; JobFileError for the first
    key the API would refuse."""
    unknown = sorted(str(key) for key in values if key not in KEYS)
    if unknown:
        raise JobFileError(f"{unknown[0]}: unknown key (known: {', '.join(KEYS)})")
    body: dict[str, Any] = {}
    body["name"] = _string(values, "name", 200)
    # Unsaid, the kind follows from what is given: an image runs as a container, a command alone
    # as a process (the provider's agent decides whether it accepts either).
    inferred = "process" if values.get("command") and not values.get("image") else "container"
    body["kind"] = _string(values, "kind", 20) or inferred
    if body["kind"] not in KINDS:
        raise JobFileError(f"kind: must be one of {', '.join(KINDS)}")
    body["image"] = _string(values, "image", 500)
    body["command"] = _command(values.get("command"))
    body["env"] = _env(values.get("env"))
    body["gpu_count"] = _gpus(values)
    body["min_vram_mb"] = _vram(values.get("vram"))
    body["allowed_models"] = _models(values.get("models"))
    body["region"] = _string(values, "region", 64)
    body["max_price_per_gpu_hour"] = _price(values)
    body["expected_duration_s"] = _duration(values, "duration", required=True)
    max_duration = _duration(values, "max_duration", required=False)
    if max_duration is not None:
        if max_duration < body["expected_duration_s"]:
            raise JobFileError("max_duration: must be at least duration")
        body["max_duration_s"] = max_duration
    interruptible = values.get("interruptible", True)
    if not isinstance(interruptible, bool):
        raise JobFileError("interruptible: must be true or false")
    body["interruptible"] = interruptible
    checkpoint = _duration(values, "checkpoint_interval", required=False)
    if checkpoint is not None and not MIN_CHECKPOINT_S <= checkpoint <= MAX_CHECKPOINT_S:
        raise JobFileError(f"checkpoint_interval: must be between {MIN_CHECKPOINT_S} and {MAX_CHECKPOINT_S} seconds")
    body["checkpoint_interval_s"] = checkpoint
    checkpoint_dir = _string(values, "checkpoint_dir", MAX_CHECKPOINT_DIR_CHARS)
    if checkpoint_dir:
        parts = checkpoint_dir.split("/")
        if (
            not CHECKPOINT_DIR_RE.fullmatch(checkpoint_dir)
            or posixpath.normpath(checkpoint_dir) != checkpoint_dir
            or any(part in {".", ".."} for part in parts)
            or parts[2].startswith(".gpgpu")
        ):
            raise JobFileError("checkpoint_dir: must be a directory under /work, like /work/ckpt (no '.' or '..')")
        body["checkpoint_dir"] = checkpoint_dir
    if body["kind"] == "container" and not body["image"]:
        raise JobFileError('image: a container job needs an image (or kind = "process")')
    if body["kind"] == "process" and not body["command"]:
        raise JobFileError("command: a process job needs a command")
    return body


def _string(values: Mapping[str, Any], key: str, limit: int) -> str:
    value = values.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise JobFileError(f"{key}: must be a string")
    if len(value) > limit:
        raise JobFileError(f"{key}: at most {limit} characters")
    return value


def _command(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise JobFileError(f"command: {exc}") from exc
    elif isinstance(value, list) and all(isinstance(part, str) for part in value):
        parts = list(value)
    else:
        raise JobFileError("command: must be a string or a list of strings")
    if len(parts) > MAX_COMMAND_PARTS:
        raise JobFileError(f"command: at most {MAX_COMMAND_PARTS} parts")
    if any(len(part) > MAX_ARGUMENT_CHARS for part in parts):
        raise JobFileError(f"command: each part at most {MAX_ARGUMENT_CHARS} characters")
    return parts


def _env(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JobFileError('env: must be a table of NAME = "value"')
    if len(value) > MAX_ENV_VARS:
        raise JobFileError(f"env: at most {MAX_ENV_VARS} variables")
    env: dict[str, str] = {}
    for name, raw in value.items():
        if not isinstance(name, str) or not ENV_NAME_RE.fullmatch(name):
            raise JobFileError(f"env: {str(name)[:60]!r} is not a valid variable name")
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise JobFileError(f"env.{name}: must be a string")
        text = str(raw)
        if len(text) > MAX_ENV_VALUE_CHARS:
            raise JobFileError(f"env.{name}: at most {MAX_ENV_VALUE_CHARS} characters")
        env[name] = text
    return env


def _gpus(values: Mapping[str, Any]) -> int:
    value = values.get("gpus")
    if value is None:
        raise JobFileError("gpus: required (how many GPUs the job needs, 1 to 16)")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_GPUS:
        raise JobFileError(f"gpus: must be a whole number from 1 to {MAX_GPUS}")
    return int(value)


def _vram(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise JobFileError("vram: must be a size in GB (20) or with a unit (24gb, 24564mb)")
    try:
        return parse_vram_mb(value if isinstance(value, (int, str)) else repr(value))
    except ValueError as exc:
        raise JobFileError(f"vram: {exc}") from None


def _models(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise JobFileError("models: must be a list of model names")
    if len(value) > MAX_MODELS:
        raise JobFileError(f"models: at most {MAX_MODELS}")
    if any(len(m) > 100 for m in value):
        raise JobFileError("models: each name at most 100 characters")
    return list(value)


def _price(values: Mapping[str, Any]) -> str:
    value = values.get("max_price")
    if value is None:
        raise JobFileError('max_price: required (the most you pay per GPU-hour, e.g. "0.50")')
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise JobFileError('max_price: must be a price such as "0.50"')
    try:
        price = parse_price(value)
    except ValueError as exc:
        raise JobFileError(f"max_price: {exc}") from None
    if not Decimal(0) < price <= MAX_PRICE:
        raise JobFileError(f"max_price: must be above 0 and at most {MAX_PRICE}")
    exponent = price.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > PRICE_DECIMALS:
        raise JobFileError(f"max_price: at most {PRICE_DECIMALS} decimal places")
    return str(price)


def _duration(values: Mapping[str, Any], key: str, *, required: bool) -> int | None:
    value = values.get(key)
    if value is None:
        if required:
            raise JobFileError(f'{key}: required (how long the job runs, e.g. "2h")')
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise JobFileError(f'{key}: must be seconds or a duration such as "90m"')
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise JobFileError(f"{key}: {exc}") from None
    if not 1 <= seconds <= MAX_DURATION_S:
        raise JobFileError(f"{key}: must be between 1 second and 30 days")
    return seconds
