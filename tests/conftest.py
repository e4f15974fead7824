"""Fixtures of the end-to-end tests under tests/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent_market import Market


@pytest.fixture
def market(live_server: Any, settings: Any, tmp_path: Path) -> Iterator[Market]:
    """A live marketplace, a funded renter, a provider, and room for one simulated machine's agent
    (stopped, and its rentals' directory removed, at the end)."""
    settings.GPGPU = {**settings.GPGPU, "HEARTBEAT_INTERVAL_S": 1}
    m = Market(live_server.url, tmp_path)
    try:
        yield m
    finally:
        m.stop_agent()
        m.session.close()
        shutil.rmtree(m.rentals_dir, ignore_errors=True)
