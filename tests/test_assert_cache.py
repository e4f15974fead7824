"""The assert rewriting done once before xdist's workers start (tests/assert_cache.py): what it
writes must be what pytest itself would load, or every worker would rewrite again (or worse,
run tests with plain asserts)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _pytest.assertion import rewrite

from tests import assert_cache


def _suite(root: Path) -> Path:
    (root / "conftest.py").write_text("")
    inner = root / "inner"
    inner.mkdir()
    (inner / "test_sums.py").write_text("def test_sum():\n    total = 1 + 1\n    assert total == 3\n")
    (inner / "helpers.py").write_text("VALUE = 1\n")
    (inner / "test_broken.py").write_text("def test_(:\n")
    return inner


def _cached(config: pytest.Config, module: Path):  # type: ignore[no-untyped-def]
    pyc = rewrite.get_cache_dir(module) / (module.name[:-3] + rewrite.PYC_TAIL)
    return rewrite._read_pyc(module, pyc, lambda *_: None)


@pytest.mark.parametrize("processes", [1, 2])
def test_the_test_modules_are_rewritten_once_and_pytest_loads_what_was_written(
    pytestconfig: pytest.Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    inner = _suite(tmp_path)
    files = assert_cache.test_files(pytestconfig, [str(inner / "test_sums.py") + "::test_sum", str(inner)])
    # The test modules and the conftest above them; not the helper module pytest leaves alone.
    assert set(files) == {tmp_path / "conftest.py", inner / "test_sums.py", inner / "test_broken.py"}

    # The module with a syntax error is left for the worker's import to report.
    assert assert_cache.warm(pytestconfig, files, processes) == 2
    assert assert_cache.warm(pytestconfig, files, processes) == 0  # already there and valid

    code = _cached(pytestconfig, inner / "test_sums.py")
    assert code is not None
    namespace: dict[str, object] = {}
    exec(code, namespace)  # noqa: S102 - the module just written, as pytest would run it
    with pytest.raises(AssertionError) as failure:
        namespace["test_sum"]()  # type: ignore[operator]
    assert "assert 2 == 3" in str(failure.value)  # pytest's explanation: the asserts were rewritten


def test_a_changed_module_is_rewritten_again(
    pytestconfig: pytest.Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    inner = _suite(tmp_path)
    module = inner / "test_sums.py"
    assert assert_cache.warm(pytestconfig, [module], 1) == 1
    module.write_text("def test_sum():\n    assert 1 + 1 == 2\n")
    assert assert_cache.warm(pytestconfig, [module], 1) == 1


def test_nothing_is_written_where_bytecode_is_not(
    pytestconfig: pytest.Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    inner = _suite(tmp_path)
    assert assert_cache.warm(pytestconfig, [inner / "test_sums.py"], 1) == 0
    assert _cached(pytestconfig, inner / "test_sums.py") is None
