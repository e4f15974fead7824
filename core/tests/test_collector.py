"""core.collector: the cyclic collector is paused inside the block and left as it was found."""

from __future__ import annotations

import gc

import pytest

from core.collector import collector_paused


def test_the_collector_is_off_inside_and_on_again_after_even_when_the_block_fails() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("the block failed")
    assert gc.isenabled()


def test_a_caller_that_turned_it_off_keeps_it_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
