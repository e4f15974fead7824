"""web's access log (granian's) without the agents' answered heartbeats.

A fleet heartbeats all the time: 10,000 machines every 5 s are 2,000 lines a second, 16-17 GB of
text a day (more in Docker's JSON lines), and writing each line took web about a seventh of its
CPU per steady heartbeat (benchmarks/README.md, Heartbeats). An answered heartbeat (2xx) says
nothing that /metrics' `gpgpu_agent_heartbeats_total` and `gpgpu_agent_heartbeat_seconds` do not
count; a refused or failed one (4xx, 5xx) and every other request are logged as before, in
granian's own format (the fault suite reads it: tests/faults/harness.py).

docker-compose's web loads `access_log.json` beside this module (`granian --access-log
--log-config core/access_log.json`). granian lays a configuration's top-level keys over its own,
so that file names only the filter and granian's two loggers again, the access logger with the
filter; the formatters and handlers stay granian's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

HEARTBEAT_PATH = "/api/agent/v1/heartbeat"


class AnsweredHeartbeatsLeftOut(logging.Filter):
    """Drops granian's access records of a POST to `path` answered 2xx; passes every other."""

    def __init__(self, path: str = HEARTBEAT_PATH) -> None:
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.args  # granian logs its format with one dict of the request's fields
        if not isinstance(fields, Mapping) or fields.get("path") != self.path or fields.get("method") != "POST":
            return True
        status = fields.get("status")
        return not (isinstance(status, int) and 200 <= status < 300)
