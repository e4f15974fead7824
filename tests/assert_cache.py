"""Rewrite the test modules' asserts once, before pytest-xdist starts its workers.

pytest rewrites every test module's `assert` statements when it imports the module and keeps the
result as bytecode in `__pycache__` (`*-pytest-<version>.pyc`). Under xdist every worker imports
every test module to collect it, and on a fresh checkout all of them do so at the same moment:
four workers each rewrote the same 121 modules (about 6 s of CPU each on this project's 4,300
asserts, most of a cold collection's time). Rewritten once here, spread over the cores, the
workers find the bytecode already there.

This reaches into pytest's assertion module (pinned in requirements-dev.txt); if its internals
change, `warm` does nothing and the workers rewrite as they always did.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

SKIPPED_DIRS = frozenset({".git", ".venv", "node_modules", "var", "__pycache__"})


def test_files(config: pytest.Config, args: Iterable[str]) -> list[Path]:
    """The files a run over `args` (paths, with or without `::test`) imports with its asserts
    rewritten: the test modules under them and the conftest.py files above and below them."""
    root = config.rootpath
    patterns = config.getini("python_files")
    found: set[Path] = set()
    for arg in args:
        path = (config.invocation_params.dir / arg.split("::", 1)[0]).resolve()
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = [name for name in dirnames if name not in SKIPPED_DIRS]
                for name in filenames:
                    file = Path(dirpath, name)
                    if name == "conftest.py" or any(file.match(pattern) for pattern in patterns):
                        found.add(file)
        else:
            continue
        for parent in path.parents:
            if (parent / "conftest.py").is_file():
                found.add(parent / "conftest.py")
            if parent == root:
                break
    return sorted(found)


def _rewrite(config: pytest.Config, file: Path) -> bool:
    """Rewrite one module and write its cached bytecode, unless a valid one is there: whether it
    wrote one."""
    from _pytest.assertion import rewrite

    state = config.stash[rewrite.assertstate_key]
    cache_dir = rewrite.get_cache_dir(file)
    pyc = cache_dir / (file.name[:-3] + rewrite.PYC_TAIL)
    if rewrite._read_pyc(file, pyc, state.trace) is not None:
        return False
    if not rewrite.try_makedirs(cache_dir):
        return False
    source_hash, code = rewrite._rewrite_test(file, config)
    return rewrite._write_pyc(state, code, source_hash, pyc)


_config: pytest.Config | None = None
_INTERNALS = (
    "assertstate_key",
    "get_cache_dir",
    "PYC_TAIL",
    "_read_pyc",
    "try_makedirs",
    "_rewrite_test",
    "_write_pyc",
)


def _rewrite_in_child(file: Path) -> bool:
    assert _config is not None
    try:
        return _rewrite(_config, file)
    except Exception:  # a syntax error, an unreadable file: the worker's own import reports it
        return False


def warm(config: pytest.Config, files: list[Path], processes: int) -> int:
    """Rewrite `files` over `processes` forked processes: how many were written (0 when nothing
    was missing, bytecode is not written, or pytest's internals are not the ones this knows)."""
    global _config
    if sys.dont_write_bytecode or not files or not config.getoption("assertmode") == "rewrite":
        return 0
    try:
        from _pytest.assertion import rewrite

        for name in _INTERNALS:
            getattr(rewrite, name)
    except (ImportError, AttributeError):
        return 0
    _config = config
    try:
        if processes <= 1:
            return sum(map(_rewrite_in_child, files))
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            return sum(pool.map(_rewrite_in_child, files, chunksize=1))
    finally:
        _config = None
