"""Which EVMs the chain tests run on, and how hard the property tests try (tests/depth.py)."""

from __future__ import annotations

import pytest

from tests.depth import depth, evms


def test_chain_tests_run_on_anvil_unless_asked_for_the_in_process_evm_or_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPGPU_TEST_EVMS", raising=False)
    assert evms() == ("anvil",)
    monkeypatch.setenv("GPGPU_TEST_EVMS", "eth-tester")
    assert evms() == ("eth-tester",)
    monkeypatch.setenv("GPGPU_TEST_EVMS", "all")
    assert evms() == ("anvil", "eth-tester")
    monkeypatch.setenv("GPGPU_TEST_EVMS", "eth-tester, anvil")
    assert evms() == ("eth-tester", "anvil")


@pytest.mark.parametrize("value", ["ganache", "", "anvil,hardhat"])
def test_an_evm_the_tests_do_not_know_is_refused_rather_than_running_no_chain_test(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("GPGPU_TEST_EVMS", value)
    with pytest.raises(ValueError, match="GPGPU_TEST_EVMS"):
        evms()


def test_an_unknown_depth_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPGPU_TEST_DEPTH", "deeper")
    with pytest.raises(ValueError, match="GPGPU_TEST_DEPTH"):
        depth()
