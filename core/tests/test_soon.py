"""A run asked for soon (core.soon): the "queued" marker a web process sets is the one the worker's
task clears, so after a run has started the next request sends again, whichever processes they are."""

from __future__ import annotations

import os
from typing import Any

import pytest

from core import soon

pytestmark = pytest.mark.django_db

KEY = "core.tests.soon.queued"


def _request(sent: list[int], capture: Any) -> None:
    with capture(execute=True):
        soon.request_soon(key=KEY, send=lambda: sent.append(1), what="test")


def test_a_run_cleared_in_another_process_lets_the_next_request_send(
    django_capture_on_commit_callbacks: Any,
) -> None:
    soon.marker_delete(KEY)
    sent: list[int] = []
    _request(sent, django_capture_on_commit_callbacks)
    _request(sent, django_capture_on_commit_callbacks)
    assert sent == [1]  # the second request found the first run queued

    # The worker is another process: its task clears the marker as it starts.
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        try:
            soon.request_clear(key=KEY, what="test")
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    _request(sent, django_capture_on_commit_callbacks)
    assert sent == [1, 1]  # a process's own memory would have kept the marker for QUEUED_TTL_S
    soon.marker_delete(KEY)
