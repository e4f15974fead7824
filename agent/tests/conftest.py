"""What the agent's tests share: the real process sandbox, or a clear reason it is missing.

Process jobs only ever run sandboxed (bubblewrap, the rental user, per-lease cgroups), so the
runner's tests run in the real sandbox. Without it (no bwrap, or root without the rental user
that `gpgpu-agent setup` creates) they are skipped locally and fail under CI, where .ci/run
installs bubblewrap and runs the setup.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpgpu_agent.runners.cgroups import CgroupError, Cgroups, Limits
from gpgpu_agent.runners.sandbox import Bubblewrap, SandboxError, SandboxUser, rental_user

# A Python the sandbox can see (it shows /usr only; a virtualenv's python is elsewhere).
SANDBOX_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
# Limits the tests' leases get: small enough that a fork bomb and a memory hog hit them fast.
TEST_LIMITS = Limits(cpus=1.0, memory_bytes=256 * 1024 * 1024, pids=64)


def missing(reason: str) -> None:
    """Skip locally, fail in CI: the sandbox must be tested where the project is built."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must install bubblewrap and run `gpgpu-agent setup`)")
    pytest.skip(reason)


@dataclass(frozen=True)
class SandboxKit:
    sandbox: Bubblewrap
    user: SandboxUser | None
    cgroups: Cgroups | None
    limits: Limits | None


@pytest.fixture(scope="session")
def sandbox_kit() -> SandboxKit:
    """The real sandbox: bwrap, and as root the rental user and per-lease cgroups."""
    if not os.path.exists(SANDBOX_PYTHON):
        missing(f"{SANDBOX_PYTHON} is needed inside the sandbox")
    try:
        sandbox = Bubblewrap()
        user = rental_user() if os.geteuid() == 0 else None
        sandbox.probe(user)
    except SandboxError as exc:
        missing(str(exc))
    cgroups = None
    if os.geteuid() == 0:
        try:
            # A name of this test process's own: other test processes (pytest-xdist workers) use
            # the same lease ids.
            cgroups = Cgroups.detect(name=f"gpgpu-rentals-test-{os.getpid()}")
        except CgroupError as exc:
            missing(str(exc))
    return SandboxKit(sandbox=sandbox, user=user, cgroups=cgroups, limits=TEST_LIMITS if cgroups else None)


@pytest.fixture
def rentals_dir() -> Iterator[Path]:
    """A leases' root the rental user may pass through (0711, outside any 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="gpgpu-rentals-", dir="/tmp"))
    os.chmod(path, 0o711)  # noqa: S103 - pass-through only
    yield path
    shutil.rmtree(path, ignore_errors=True)
