"""Run a simulated provider fleet against a marketplace.

    python -m simulator --api http://127.0.0.1:8000 --provider-token gpg_… --machines 4

The provider token (a provider's API token) may also come from GPGPU_PROVIDER_TOKEN or from the
credentials file `manage.py demo_seed` writes (--credentials var/demo/credentials.json).
SIGINT or SIGTERM stops every machine (their running jobs are killed) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import requests

from simulator.fleet import ApiError, fleet_register


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", default=os.environ.get("GPGPU_API", "http://127.0.0.1:8000"), help="marketplace URL")
    parser.add_argument("--provider-token", default=os.environ.get("GPGPU_PROVIDER_TOKEN"), help="provider API token")
    parser.add_argument("--credentials", type=Path, help="read the provider token from demo_seed's credentials.json")
    parser.add_argument("--machines", type=int, default=4, help="how many machines to simulate (1-64)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="compress owner patterns (10: ten times faster)")
    parser.add_argument("--container-seconds", type=float, default=5.0, help="how long a simulated container job runs")
    parser.add_argument("--owners-never-busy", action="store_true", help="owners never use their GPUs")
    parser.add_argument("--seed", type=int, default=None, help="random seed (machines, GPUs, owner patterns)")
    parser.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the marketplace to be up")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    if not 1 <= args.machines <= 64:
        parser.error("--machines must be between 1 and 64")
    if not args.time_scale > 0 or not args.container_seconds >= 0:
        parser.error("--time-scale must be positive and --container-seconds not negative")
    return args


def _provider_token(args: argparse.Namespace, deadline: float) -> str:
    if args.provider_token:
        return str(args.provider_token)
    if args.credentials is None:
        raise SystemExit("error: pass --provider-token, GPGPU_PROVIDER_TOKEN or --credentials")
    # In docker-compose the seed service may still be writing the file: wait for it.
    while not args.credentials.is_file():
        if time.monotonic() > deadline:
            raise SystemExit(f"error: {args.credentials} not found")
        time.sleep(1)
    return str(json.loads(args.credentials.read_text())["provider"]["token"])


def _wait_until_up(api: str, deadline: float) -> None:
    while True:
        try:
            if requests.get(f"{api.rstrip('/')}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"error: the marketplace at {api} is not up (GET /healthz)")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    deadline = time.monotonic() + args.wait_s
    token = _provider_token(args, deadline)
    _wait_until_up(args.api, deadline)
    try:
        fleet = fleet_register(
            args.api,
            provider_token=token,
            count=args.machines,
            rng=random.Random(args.seed),
            time_scale=args.time_scale,
            container_seconds=args.container_seconds,
            owners_never_busy=args.owners_never_busy,
        )
    except ApiError as exc:
        print(f"error: registration refused: {exc}", file=sys.stderr)
        return 1

    def _stop(signum: int, frame: FrameType | None) -> None:
        fleet.stop_event.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    fleet.start()
    while not fleet.stop_event.wait(1.0):
        pass
    fleet.stop()
    logging.getLogger("simulator").info("fleet stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
