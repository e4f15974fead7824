"""A local anvil node (Foundry's development EVM) for tests, benchmarks and the demo.

anvil comes from the npm package @foundry-rs/anvil-<os>-<arch> (`npm ci` at the repository root),
or from $ANVIL_BIN. Two ways to run it:

- `with anvil_running() as w3:` a throwaway node on a free port, stopped on exit (tests, benchmarks);
- `node = anvil_start(port=8545, state_path=...)` / `python -m billing.chain.anvil --port 8545
  --state var/chain/anvil-state.json`: a long-running node whose chain is kept in a file (loaded at
  start, written every few seconds and on exit), so a restarted demo finds its contracts again.

This module imports nothing from Django, so scripts can use it before settings exist.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from web3 import Web3

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GAS_LIMIT = 100_000_000
STATE_INTERVAL_S = 5


def anvil_binary() -> Path | None:
    """The anvil executable shipped by @foundry-rs/anvil in node_modules (or $ANVIL_BIN), if present."""
    if os.environ.get("ANVIL_BIN"):
        return Path(os.environ["ANVIL_BIN"])
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    system = {"Linux": "linux", "Darwin": "darwin", "Windows": "win32"}.get(platform.system())
    suffix = ".exe" if system == "win32" else ""
    candidate = REPO_ROOT / "node_modules" / "@foundry-rs" / f"anvil-{system}-{arch}" / "bin" / f"anvil{suffix}"
    return candidate if candidate.is_file() else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (another process may still take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def anvil_command(
    *,
    port: int,
    host: str = "127.0.0.1",
    state_path: Path | None = None,
    chain_id: int | None = None,
    gas_limit: int = DEFAULT_GAS_LIMIT,
    no_mining: bool = False,
    block_time: float | None = None,
) -> list[str]:
    """The argv that starts anvil with these options. Raises FileNotFoundError without the binary."""
    binary = anvil_binary()
    if binary is None:
        raise FileNotFoundError("anvil not found: run `npm ci` at the repository root (or set ANVIL_BIN)")
    argv = [str(binary), "--host", host, "--port", str(port), "--gas-limit", str(gas_limit), "--silent"]
    if state_path is not None:
        argv += ["--state", str(state_path), "--state-interval", str(STATE_INTERVAL_S)]
    if chain_id is not None:
        argv += ["--chain-id", str(chain_id)]
    if no_mining:
        argv.append("--no-mining")
    if block_time is not None:
        argv += ["--block-time", f"{block_time:g}"]
    return argv


def rpc_wait(url: str, *, timeout_s: float = 20.0, process: subprocess.Popen[bytes] | None = None) -> Web3:
    """Poll `url` until a JSON-RPC node answers; return a Web3 on it.

    Raises RuntimeError if `process` exits first or nothing answers within `timeout_s`.
    """
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 60}, exception_retry_configuration=None))
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            error = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"anvil exited early (status {process.returncode}): {error.strip()}")
        with contextlib.suppress(Exception):
            if w3.is_connected():
                return w3
        if time.monotonic() > deadline:
            raise RuntimeError(f"no JSON-RPC node answered at {url} within {timeout_s:g}s")
        time.sleep(0.05)


@dataclass
class AnvilNode:
    """A running anvil process and where it listens."""

    process: subprocess.Popen[bytes]
    url: str
    port: int
    state_path: Path | None

    def web3(self) -> Web3:
        return Web3(Web3.HTTPProvider(self.url, request_kwargs={"timeout": 60}, exception_retry_configuration=None))

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (anvil writes its state file then), wait, SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def anvil_start(
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    state_path: Path | None = None,
    chain_id: int | None = None,
    gas_limit: int = DEFAULT_GAS_LIMIT,
    no_mining: bool = False,
    block_time: float | None = None,
    startup_timeout_s: float = 20.0,
    stderr: IO[bytes] | int | None = subprocess.PIPE,
) -> AnvilNode:
    """Start anvil (on `port`, or a free one) and return once it answers JSON-RPC.

    With `state_path`, the chain is loaded from that file if it exists and written back every few
    seconds and on exit. Raises FileNotFoundError without the binary, RuntimeError if it fails to start.
    """
    port = free_port(host) if port is None else port
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    argv = anvil_command(
        port=port,
        host=host,
        state_path=state_path,
        chain_id=chain_id,
        gas_limit=gas_limit,
        no_mining=no_mining,
        block_time=block_time,
    )
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)  # noqa: S603 - fixed binary
    node = AnvilNode(process=process, url=f"http://{host}:{port}", port=port, state_path=state_path)
    try:
        rpc_wait(node.url, timeout_s=startup_timeout_s, process=process)
    except BaseException:
        node.stop()
        raise
    return node


@contextlib.contextmanager
def anvil_running(
    *,
    gas_limit: int = DEFAULT_GAS_LIMIT,
    startup_timeout: float = 20.0,
    no_mining: bool = False,
    chain_id: int | None = None,
    state_path: Path | None = None,
) -> Iterator[Web3]:
    """Start anvil on a free 127.0.0.1 port, yield a Web3 connected to it, and stop it afterwards.

    The node's URL is `w3.provider.endpoint_uri`. Raises FileNotFoundError if the binary is
    missing and RuntimeError if it does not answer in time.
    """
    node = anvil_start(
        gas_limit=gas_limit,
        startup_timeout_s=startup_timeout,
        no_mining=no_mining,
        chain_id=chain_id,
        state_path=state_path,
    )
    try:
        yield node.web3()
    finally:
        node.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m billing.chain.anvil`: run anvil in the foreground until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m billing.chain.anvil", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8545)
    parser.add_argument("--state", type=Path, help="file the chain is loaded from and saved to")
    parser.add_argument("--chain-id", type=int)
    args = parser.parse_args(argv)
    try:
        node = anvil_start(port=args.port, host=args.host, state_path=args.state, chain_id=args.chain_id, stderr=None)
    except (FileNotFoundError, RuntimeError) as error:
        print(f"anvil: {error}", file=sys.stderr)
        return 1
    print(f"anvil listening on {node.url}" + (f", state in {args.state}" if args.state else ""), flush=True)

    def forward(signum: int, frame: FrameType | None) -> None:
        # Only pass the signal on: anvil then writes its state and exits, which ends the wait below.
        # (Waiting on the process here, inside the handler, would deadlock with that wait.)
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = node.process.wait()
    return 0 if status in (0, -signal.SIGTERM) else status


if __name__ == "__main__":
    raise SystemExit(main())
