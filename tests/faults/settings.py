"""The marketplace's settings with the beat periods that are not read from the environment made
short, for the fault suite (tests/faults/harness.py starts every server process with
DJANGO_SETTINGS_MODULE=tests.faults.settings).

Everything else is marketplace.settings as the environment sets it. The periods below are fixed
numbers in marketplace.settings (15 s, 60 s); at those, a run would spend minutes waiting for a
budget release or a reconciliation after each fault. Each can still be set here from the
environment (FAULTS_BEAT_<ENTRY>_S, the entry's name upper-cased with _ for -).
"""

from __future__ import annotations

import os

from marketplace.settings import *  # noqa: F403 - this module is those settings, amended
from marketplace.settings import CELERY_BEAT_SCHEDULE as _BASE_SCHEDULE

# The entries whose period marketplace.settings fixes, and the suite's shorter one.
_SHORT_PERIODS_S = {
    "sweep-stuck-leases": 2.0,
    "release-budgets": 3.0,
    "settle": 2.0,
    "reconcile-settlements": 5.0,
    "reserve-budgets": 2.0,
    "release-jobs-on-chain": 5.0,
}


def _period(entry: str, default: float) -> float:
    raw = os.environ.get(f"FAULTS_BEAT_{entry.upper().replace('-', '_')}_S")
    return float(raw) if raw else default


CELERY_BEAT_SCHEDULE = {
    name: (
        {
            **entry,
            "schedule": _period(name, _SHORT_PERIODS_S[name]),
            "options": {"expires": _period(name, _SHORT_PERIODS_S[name])},
        }
        if name in _SHORT_PERIODS_S
        else entry
    )
    for name, entry in _BASE_SCHEDULE.items()
}
