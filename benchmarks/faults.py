"""The fault suite without pytest: `python benchmarks/faults.py` (docs/faults.md).

Starts the whole marketplace on PostgreSQL, Redis and anvil, with real agents, injects each
fault of GPGPU_FAULTS_ONLY (default: all) in turn, prints the table and every violation, and
exits 1 on any. Needs PostgreSQL's binaries, redis-server, bubblewrap and `npm ci`'s anvil; run
it with the repository's virtualenv and the worktree's agent:

    PYTHONPATH=agent .venv/bin/python benchmarks/faults.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.faults.harness import Config, suite_running  # needs the repository on sys.path (above)


def main() -> int:
    config = Config.from_env()
    with suite_running(config, log=lambda line: print(line, flush=True)) as suite:
        ok = suite.run()
        print(suite.report(), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
