"""`gpgpu-agent`: register this machine, run the daemon, show its status, check its setup.

    gpgpu-agent setup                      (as root, once: rental user, directories, firewall)
    gpgpu-agent register --url https://market.example --token gpreg_…
    gpgpu-agent run [--simulate] [--config agent.toml] [--poll-interval-s 1 …]
    gpgpu-agent status
    gpgpu-agent doctor
    gpgpu-agent rotate-credential [--new-signing-key | --credential-stdin]

Every setting (see gpgpu_agent.config) can be given as a flag, as GPGPU_AGENT_<KEY> in the
environment, or in the TOML file, in that order of precedence. A bad setting is one line on
stderr and exit status 2; an agent error (no driver, no credential, marketplace refusal) is one
line and exit status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import NotRequired, TypedDict

from gpgpu_agent import __version__
from gpgpu_agent.config import KEYS, AgentConfig, ConfigError, load_config
from gpgpu_agent.credentials import (
    CredentialError,
    MachineCredential,
    load_credential,
    rotation_mark_path,
    save_credential,
)
from gpgpu_agent.protocols import AgentError, Rejected, TransportUnavailable
from gpgpu_agent.types import json_int

logger = logging.getLogger("gpgpu_agent")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
# The marketplace revoked this machine's credential: restarting cannot help (the systemd unit
# lists it in RestartPreventExitStatus).
EXIT_REVOKED = 3

# Settings that are plain switches on the command line (--simulate, not --simulate true).
_SWITCHES = ("simulate", "offer_mig", "simulate_owners_idle", "allow_process_jobs", "stop_rentals_on_exit")


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest="config_file", metavar="FILE", help="TOML config file")
    group = parser.add_argument_group("settings (also GPGPU_AGENT_<KEY> or the config file)")
    for key in KEYS:
        flag = "--" + key.replace("_", "-")
        if key in _SWITCHES:
            group.add_argument(flag, dest=key, action="store_const", const=True, default=None)
        else:
            group.add_argument(flag, dest=key, default=None, metavar=key.split("_")[-1].upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpgpu-agent", description="GPGPU provider agent.")
    parser.add_argument("--version", action="version", version=f"gpgpu-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    register = sub.add_parser("register", help="trade a registration token for this machine's credential")
    register.add_argument("--url", dest="marketplace_url", help="the marketplace's address")
    register.add_argument("--token", help="the one-time registration token (gpreg_…)")
    register.add_argument(
        "--provider-token",
        help="a provider API token: create a registration token with it first (demos, scripted installs)",
    )
    register.add_argument("--force", action="store_true", help="register again even if a credential exists")
    _add_settings(register)

    run = sub.add_parser("run", help="run the daemon (Ctrl-C stops it; rentals run on, unless --stop-rentals-on-exit)")
    _add_settings(run)
    status = sub.add_parser("status", help="machine, leases, spool and last heartbeat")
    _add_settings(status)
    doctor = sub.add_parser("doctor", help="check the driver, the sandboxes, the marketplace and the files")
    _add_settings(doctor)
    setup = sub.add_parser("setup", help="as root: create the rental user, the directories and the firewall rules")
    _add_settings(setup)
    rotate = sub.add_parser("rotate-credential", help="replace this machine's credential (and signing key)")
    rotate.add_argument(
        "--new-signing-key", action="store_true", help="also replace the usage-signing key (if it may have leaked)"
    )
    rotate.add_argument(
        "--credential-stdin",
        action="store_true",
        help="install a credential the provider rotated in the marketplace (read from standard input)",
    )
    _add_settings(rotate)
    return parser


def _config(args: argparse.Namespace) -> AgentConfig:
    flags = {key: getattr(args, key, None) for key in KEYS}
    return load_config(flags, config_file=args.config_file)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"gpgpu-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    try:
        if args.command == "register":
            return cmd_register(config, args)
        if args.command == "run":
            return cmd_run(config)
        if args.command == "status":
            return cmd_status(config)
        if args.command == "doctor":
            from gpgpu_agent.doctor import run_doctor

            return run_doctor(config)
        if args.command == "setup":
            from gpgpu_agent.setup import run_setup

            return run_setup(config)
        if args.command == "rotate-credential":
            return cmd_rotate_credential(config, args)
    except AgentError as exc:
        print(f"gpgpu-agent: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
    parser.error(f"unknown command {args.command}")


# --- register ---------------------------------------------------------------------------------


def cmd_register(config: AgentConfig, args: argparse.Namespace) -> int:
    """Register: a fresh signing key (its address is sent), the credential written 0600."""
    from gpgpu_agent.signing import create_key_file, load_key_file
    from gpgpu_agent.transport import HttpTransport

    if not config.marketplace_url:
        print("gpgpu-agent: register needs --url (the marketplace's address)", file=sys.stderr)
        return EXIT_CONFIG
    if config.credential_path.exists() and not args.force:
        existing = load_credential(config.credential_path)
        print(f"already registered as machine {existing.machine_id} ({config.credential_path}); --force to redo")
        return EXIT_OK
    hostname = config.hostname or socket.gethostname()
    token = args.token
    if not token and args.provider_token:
        token = _registration_token_create(config.marketplace_url, args.provider_token, label=hostname)
    if not token:
        print("gpgpu-agent: register needs --token (or --provider-token)", file=sys.stderr)
        return EXIT_CONFIG
    key = load_key_file(config.key_path) if config.key_path.exists() else create_key_file(config.key_path)
    transport = HttpTransport(config.marketplace_url)
    try:
        reply = transport.register(
            {
                "token": token,
                "hostname": hostname[:255],
                "agent_version": __version__,
                "signing_address": key.address,
                "region": config.region,
            }
        )
    except Rejected as exc:
        raise AgentError(f"the marketplace refused the registration: {exc.detail or exc.code}") from None
    except TransportUnavailable as exc:
        raise AgentError(f"cannot register: {exc}") from None
    finally:
        transport.close()
    save_credential(
        config.credential_path,
        MachineCredential(
            machine_id=json_int(reply["machine_id"]),
            credential=str(reply["credential"]),
            marketplace_url=config.marketplace_url,
        ),
    )
    print(f"registered as machine {reply['machine_id']}; credential in {config.credential_path}")
    return EXIT_OK


def _registration_token_create(url: str, provider_token: str, *, label: str) -> str:
    """A one-time registration token from the provider API (POST /api/v1/registration-tokens/)."""
    import requests

    try:
        response = requests.post(
            f"{url.rstrip('/')}/api/v1/registration-tokens/",
            json={"label": label[:100]},
            headers={"Authorization": f"Token {provider_token}"},
            timeout=10,
        )
    except requests.RequestException as exc:
        raise AgentError(f"cannot reach {url}: {type(exc).__name__}") from None
    if response.status_code != 201:
        raise AgentError(f"the marketplace refused to create a registration token ({response.status_code})")
    return str(response.json()["token"])


# --- run --------------------------------------------------------------------------------------


def cmd_run(config: AgentConfig) -> int:
    from gpgpu_agent.daemon import build_agent

    credential = load_credential(config.credential_path)
    agent = build_agent(config, credential)

    def stop(signum: int, frame: FrameType | None) -> None:
        kept = "rentals are stopped" if config.stop_rentals_on_exit else "rentals keep running"
        logger.info("signal %s: stopping (%s)", signal.Signals(signum).name, kept)
        agent.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()
    if agent.revoked is not None:
        print(f"gpgpu-agent: this machine's credential was revoked: {agent.revoked}", file=sys.stderr)
        return EXIT_REVOKED
    return EXIT_OK


# --- rotate-credential ------------------------------------------------------------------------


def cmd_rotate_credential(config: AgentConfig, args: argparse.Namespace) -> int:
    """Replace the machine credential: ask the marketplace for a new one (the old one stops
    working at once), or, with --credential-stdin, install one the provider rotated in the
    marketplace. A running daemon picks the new file up at its next refused call."""
    from gpgpu_agent.signing import create_key_file
    from gpgpu_agent.transport import HttpTransport

    current = load_credential(config.credential_path)
    url = config.marketplace_url or current.marketplace_url
    if args.credential_stdin:
        fresh = sys.stdin.readline().strip()
        if not fresh.startswith("gpm_") or len(fresh) > 200 or not fresh.isprintable():
            print("gpgpu-agent: standard input holds no machine credential (gpm_…)", file=sys.stderr)
            return EXIT_CONFIG
        save_credential(config.credential_path, MachineCredential(current.machine_id, fresh, url))
        print(f"installed the new credential of machine {current.machine_id} in {config.credential_path}")
        return EXIT_OK
    body: dict[str, str] = {}
    new_key_path = config.key_path.with_name(config.key_path.name + ".new")
    if args.new_signing_key:
        new_key_path.unlink(missing_ok=True)
        body["signing_address"] = create_key_file(new_key_path).address
    transport = HttpTransport(url, credential=current.credential)
    # A running daemon refused meanwhile waits for the new credential instead of exiting.
    mark = rotation_mark_path(config.credential_path)
    mark.touch()
    try:
        reply = transport.rotate_credential(body)
    except Rejected as exc:
        new_key_path.unlink(missing_ok=True)
        mark.unlink(missing_ok=True)
        raise AgentError(f"the marketplace refused to rotate the credential: {exc.detail or exc.code}") from None
    except TransportUnavailable as exc:
        new_key_path.unlink(missing_ok=True)
        mark.unlink(missing_ok=True)
        raise AgentError(f"cannot rotate the credential: {exc}") from None
    finally:
        transport.close()
    # The marketplace now knows only the new credential (and key): write them before anything else.
    if args.new_signing_key:
        new_key_path.replace(config.key_path)
    save_credential(
        config.credential_path, MachineCredential(json_int(reply["machine_id"]), str(reply["credential"]), url)
    )
    mark.unlink(missing_ok=True)
    what = "credential and signing key" if args.new_signing_key else "credential"
    print(f"rotated the {what} of machine {reply['machine_id']}; the old credential no longer works")
    return EXIT_OK


# --- status -----------------------------------------------------------------------------------


class AgentStatus(TypedDict):
    """What `status` prints. The last three are the daemon's status file's, as it wrote them."""

    state_dir: str
    machine_id: int | None
    marketplace_url: str
    credential_problem: NotRequired[str]
    leases_running: list[int]
    spool_depth: object
    last_heartbeat: object
    status_updated_at: object


def read_status(config: AgentConfig) -> AgentStatus:
    """What `status` prints, as a dict: machine, marketplace, running leases, spool depth and
    the last heartbeat's outcome (from the daemon's status file)."""
    try:
        cred = load_credential(config.credential_path)
        machine_id: int | None = cred.machine_id
        marketplace_url = config.marketplace_url or cred.marketplace_url
        problem = None
    except CredentialError as exc:
        machine_id = None
        marketplace_url = config.marketplace_url
        problem = str(exc)
    runs = config.runs_dir
    running = []
    if runs.is_dir():
        for record in sorted(runs.glob("lease-*.json")):
            if record.name.endswith(".exit.json"):
                continue
            lease = record.name.removeprefix("lease-").removesuffix(".json")
            if lease.isdigit() and not (runs / f"lease-{lease}.exit.json").exists():
                running.append(int(lease))
    try:
        daemon_status = json.loads(config.status_path.read_text())
    except (OSError, ValueError):
        daemon_status = {}
    out: AgentStatus = {
        "state_dir": str(config.state_dir),
        "machine_id": machine_id,
        "marketplace_url": marketplace_url,
        "leases_running": running,
        "spool_depth": daemon_status.get("spool_depth"),
        "last_heartbeat": daemon_status.get("last_heartbeat"),
        "status_updated_at": daemon_status.get("updated_at"),
    }
    if problem is not None:
        out["credential_problem"] = problem
    return out


def cmd_status(config: AgentConfig) -> int:
    status = read_status(config)
    last = status["last_heartbeat"]
    hb: Mapping[str, object] = last if isinstance(last, Mapping) else {}
    if hb.get("ok") is None:
        beat = "none yet (is `gpgpu-agent run` running?)"
    elif hb.get("ok"):
        beat = f"OK at {hb.get('at')}"
    else:
        beat = f"FAILED at {hb.get('at')}: {hb.get('error')}"
    print(f"machine:        {status['machine_id'] if status['machine_id'] is not None else 'not registered'}")
    print(f"marketplace:    {status['marketplace_url'] or '(not set)'}")
    print(f"state dir:      {status['state_dir']}")
    print(f"leases running: {', '.join(map(str, status['leases_running'])) or 'none'}")
    depth = status.get("spool_depth")
    print(f"spool:          {'unknown' if depth is None else f'{depth} report(s) waiting to be sent'}")
    print(f"last heartbeat: {beat}")
    if status.get("credential_problem"):
        print(f"problem:        {status['credential_problem']}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
