"""Where the CLI keeps the API URL and token: `config.toml` in $GPGPU_CONFIG_DIR, else
$XDG_CONFIG_HOME/gpgpu, else ~/.config/gpgpu; the folder 0700 and the file 0600, since the token
is a password. GPGPU_API_URL and GPGPU_TOKEN override the file; command-line flags override both."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gpgpu_client.errors import ClientError

KNOWN_KEYS = frozenset({"api_url", "token"})


@dataclass(frozen=True)
class Config:
    api_url: str | None
    token: str | None


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("GPGPU_CONFIG_DIR"):
        return Path(env["GPGPU_CONFIG_DIR"])
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "gpgpu"


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    return config_dir(environ) / "config.toml"


def config_load(environ: Mapping[str, str] | None = None) -> Config:
    """The file's values under the environment's. A file that cannot be read as TOML, or with a
    key this client does not know, is a ClientError."""
    env = os.environ if environ is None else environ
    path = config_path(env)
    values: dict[str, object] = {}
    if path.exists():
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ClientError(f"cannot read {path}: {exc}") from exc
        unknown = sorted(set(values) - KNOWN_KEYS)
        if unknown:
            raise ClientError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KNOWN_KEYS))})")
    api_url = env.get("GPGPU_API_URL") or values.get("api_url")
    token = env.get("GPGPU_TOKEN") or values.get("token")
    return Config(api_url=str(api_url) if api_url else None, token=str(token) if token else None)


def config_save(config: Config, environ: Mapping[str, str] | None = None) -> Path:
    """Write the file (replacing it atomically), the folder made 0700 and the file 0600 before the
    token is in it. Returns its path."""
    path = config_path(environ)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    lines = []
    for key, value in (("api_url", config.api_url), ("token", config.token)):
        if value is not None:
            # A JSON string is a valid TOML basic string.
            lines.append(f"{key} = {json.dumps(value)}\n")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(lines))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
