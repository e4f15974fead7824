"""WhiteNoise's table of static files built once per process (core.staticfiles)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from core import staticfiles
from core.staticfiles import StaticFilesMiddleware

ADMIN_CSS = "/static/admin/css/base.css"


@pytest.fixture(autouse=True)
def no_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StaticFilesMiddleware, "_tables", {})


def _scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    scans: list[int] = []
    scan = staticfiles.WhiteNoiseMiddleware.add_files_from_finders

    def counted(self: Any) -> None:
        scans.append(1)
        scan(self)

    monkeypatch.setattr(staticfiles.WhiteNoiseMiddleware, "add_files_from_finders", counted)
    return scans


def test_clients_after_the_first_serve_static_files_from_the_same_table(monkeypatch: pytest.MonkeyPatch) -> None:
    scans = _scans(monkeypatch)
    first = Client().get(ADMIN_CSS)
    second = Client().get(ADMIN_CSS)
    assert first.status_code == second.status_code == 200
    assert b"".join(first.streaming_content) == b"".join(second.streaming_content)
    assert first["Cache-Control"] == second["Cache-Control"]
    assert len(scans) == 1  # two handlers, two middleware instances, one scan
    assert Client().get("/static/admin/css/no-such-file.css").status_code == 404


def test_other_static_settings_get_their_own_table(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    scans = _scans(monkeypatch)
    StaticFilesMiddleware(lambda request: None)
    settings.WHITENOISE_MAX_AGE = 7
    again = StaticFilesMiddleware(lambda request: None)
    assert len(scans) == 2
    assert "max-age=7" in dict(again.files[ADMIN_CSS].get_response("GET", {}).headers)["Cache-Control"]


def test_with_autorefresh_nothing_is_kept(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    settings.WHITENOISE_AUTOREFRESH = True
    StaticFilesMiddleware(lambda request: None)
    assert StaticFilesMiddleware._tables == {}
