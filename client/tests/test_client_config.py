"""Where the CLI keeps its API URL and token, and who may read it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gpgpu_client.config import Config, config_dir, config_load, config_save
from gpgpu_client.errors import ClientError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_saved_config_is_readable_by_its_owner_alone(tmp_path: Path) -> None:
    env = {"GPGPU_CONFIG_DIR": str(tmp_path / "gpgpu")}

    path = config_save(Config(api_url="https://market.example", token="secret-token"), env)

    assert path == tmp_path / "gpgpu" / "config.toml"
    assert _mode(path.parent) == 0o700
    assert _mode(path) == 0o600
    assert config_load(env) == Config(api_url="https://market.example", token="secret-token")


def test_saving_again_tightens_a_loose_folder_and_file(tmp_path: Path) -> None:
    folder = tmp_path / "gpgpu"
    folder.mkdir(mode=0o755)
    (folder / "config.toml").write_text('token = "old"\n')
    (folder / "config.toml").chmod(0o644)
    env = {"GPGPU_CONFIG_DIR": str(folder)}

    path = config_save(Config(api_url="http://x", token='quo"te\\'), env)

    assert _mode(folder) == 0o700
    assert _mode(path) == 0o600
    assert config_load(env).token == 'quo"te\\'


def test_the_folder_follows_xdg_then_home() -> None:
    assert config_dir({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == Path("/x/gpgpu")
    assert config_dir({"HOME": "/h"}) == Path("/h/.config/gpgpu")
    assert config_dir({"GPGPU_CONFIG_DIR": "/c", "XDG_CONFIG_HOME": "/x"}) == Path("/c")


def test_the_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {"GPGPU_CONFIG_DIR": str(tmp_path)}
    config_save(Config(api_url="http://file", token="file-token"), env)

    loaded = config_load({**env, "GPGPU_API_URL": "http://env", "GPGPU_TOKEN": "env-token"})

    assert loaded == Config(api_url="http://env", token="env-token")


def test_an_unknown_key_in_the_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('api_url = "http://x"\ntokn = "typo"\n')

    with pytest.raises(ClientError, match="unknown key 'tokn'"):
        config_load({"GPGPU_CONFIG_DIR": str(tmp_path)})
