"""`gpgpu`: the renter's command line, built on gpgpu_client.Client.

Exit codes: 0 success; 1 the server refused or could not be reached (one line on stderr); 2 bad
usage, a bad search term or a bad job file (one line on stderr); `run --follow` exits with the
job's own exit code when it failed with one, 1 for any other end but succeeded, 130 when
interrupted (the job goes on; so does `logs --follow`, interrupted).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import requests

from gpgpu_client import __version__
from gpgpu_client.client import Client
from gpgpu_client.config import Config, config_load, config_save
from gpgpu_client.errors import ApiError, ClientError
from gpgpu_client.jobfile import JobFileError, job_file_read, job_spec
from gpgpu_client.models import JSON, Job, Offer
from gpgpu_client.query import QueryError, parse_query
from gpgpu_client.units import parse_price
from gpgpu_client.windows import WindowError, parse_window

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

# The wallet and the chain (gpgpu_client.wallet, gpgpu_client.chain) are imported by the commands
# that sign, not here: eth-account takes about half a second to import (its keystore support
# computes BLS pairing tables), three quarters of what every other command would take to start.

PROG = "gpgpu"
COMMANDS = (
    "login",
    "search",
    "run",
    "ls",
    "status",
    "cancel",
    "checkpoint",
    "leases",
    "logs",
    "why",
    "balance",
    "statement",
    "authorize",
    "deposit",
    "wallet",
    "provider",
    "completion",
)
# The budget's token counts in micro (10^-6 token), as the API's amounts do.
MICRO_PER_TOKEN = 10**6


_MONTH_RE = re.compile(r"[0-9]{4}-(?:0[1-9]|1[0-2])")
# Terminal controls: C0 but tab, newline and carriage return (progress bars), DEL, and C1. A job's
# output and its end's detail come from the provider's machine: written as they came, a hostile
# one could set the renter's clipboard (OSC 52), retitle or clear the terminal, hide lines.
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """`text` with every terminal control shown as its escape (\\x1b) instead of acted on."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class UsageError(Exception):
    """Bad input on the command line or in a file it names: exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as for every other usage error (argparse would print the usage first).
        self.exit(2, f"{PROG}: {message} (see {PROG} --help)\n")


# --- output ---------------------------------------------------------------------------------


def _print_json(data: object, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], out: TextIO) -> None:
    cells = [[str(c) for c in headers], *([_cell(c) for c in row] for row in rows)]
    if len(cells) == 1:
        out.write("(none)\n")
        return
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _gb(mb: int) -> str:
    return f"{mb / 1024:.0f} GB" if mb else "-"


# --- commands -------------------------------------------------------------------------------


def _client(session: requests.Session | None) -> Client:
    """A client for the saved (or GPGPU_API_URL / GPGPU_TOKEN) marketplace and token."""
    config = config_load()
    if not config.api_url or not config.token:
        raise ClientError(
            f"not logged in: run `{PROG} login --url URL --token TOKEN` (or set GPGPU_API_URL and GPGPU_TOKEN)"
        )
    return Client(config.api_url, config.token, session=session)


def cmd_login(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    me = client.me()
    path = config_save(Config(api_url=client.url.rstrip("/"), token=client.token))
    if args.json:
        _print_json({"api_url": client.url.rstrip("/"), "config": str(path), "me": me.raw}, out)
    else:
        roles = ", ".join(me.roles) or "no role"
        out.write(f"Logged in to {client.url.rstrip('/')} as {me.username} ({roles}); saved to {path}\n")
    return 0


def cmd_search(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    params = _search_params(args)
    offers = list(itertools.islice(client.gpus(**params), args.limit))
    if args.json:
        _print_json([o.raw for o in offers], out)
        return 0
    _table(
        ("MODEL", "VRAM", "PRICE/H", "REGION", "MACHINE", "AVAILABLE", "IDLE FOR", "P(FINISH)"),
        (
            (
                o.model,
                _gb(o.vram_mb),
                o.price_per_gpu_hour,
                o.region or "-",
                o.machine,
                _available(o),
                _duration(o.predicted_idle_s),
                f"{o.p_finish:.0%}" if o.p_finish is not None else "-",
            )
            for o in offers
        ),
        out,
    )
    return 0


def _available(offer: Offer) -> str:
    if not offer.available_now:
        return "no"
    return f"until {_cell(offer.available_until)}" if offer.available_until else "now"


def _search_params(args: argparse.Namespace) -> dict[str, str]:
    try:
        return parse_query(args.query)
    except QueryError as exc:
        raise UsageError(str(exc)) from None


def _run_values(args: argparse.Namespace) -> dict[str, Any]:
    """The job file's values with the flags over them."""
    values: dict[str, Any] = {}
    if args.file:
        try:
            values = job_file_read(Path(args.file))
        except JobFileError as exc:
            raise UsageError(f"bad job file {args.file!r}: {exc}") from None
    flags = {
        "name": args.name,
        "kind": args.kind,
        "image": args.image,
        "command": args.command,
        "gpus": args.gpus,
        "vram": args.vram,
        "models": args.model,
        "region": args.region,
        "max_price": args.max_price,
        "duration": args.duration,
        "max_duration": args.max_duration,
        "checkpoint_interval": args.checkpoint_interval,
        "checkpoint_dir": args.checkpoint_dir,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.env:
        env = dict(values.get("env") or {})
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"bad --env {item!r}: expected NAME=VALUE")
            env[name] = value
        values["env"] = env
    if args.no_interruptible:
        values["interruptible"] = False
    return values


def _run_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The submit API's body for `run`'s file and flags; UsageError naming the bad key."""
    try:
        return job_spec(_run_values(args))
    except JobFileError as exc:
        where = f"bad job file {args.file!r}" if args.file else "bad job"
        raise UsageError(f"{where}: {exc}") from None


def cmd_run(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    # args.spec and args.account: checked and loaded by main before the client was made.
    job = client.job_submit(args.spec, idempotency_key=args.idempotency_key)
    if args.authorize:
        authorization = job_authorize(client, args.account, job.id, confirm=None if args.yes else _confirm)
        if authorization is None:
            # The job exists: its id is still the output, and the exit says it cannot run yet.
            if args.json:
                _print_json(job.raw, out)
            else:
                out.write(f"{job.id}\n")
            sys.stderr.write(f"{PROG}: job {job.id} submitted but its budget not signed: {PROG} authorize {job.id}\n")
            return 1
        if not args.json:
            sys.stderr.write(f"{PROG}: {_authorization_line(job.id, authorization)}\n")
    if not args.follow:
        if args.json:
            _print_json(job.raw, out)
        else:
            out.write(f"{job.id}\n")
        return 0
    if not args.json:
        out.write(f"Submitted job {job.id}\n")
    job = follow(
        client, job.id, interval_s=args.poll_interval, status_out=sys.stderr, log_out=None if args.json else out
    )
    if args.json:
        _print_json(job.raw, out)
    else:
        out.write(f"Job {job.id} {job.status}{_end_note(job)}\n")
    return job_exit_code(job)


def follow(
    client: Client,
    job_id: int,
    *,
    interval_s: float = 2.0,
    status_out: TextIO | None = None,
    log_out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Job:
    """Poll the job until it ends, writing its status line to `status_out`: rewritten in place at
    every poll on a terminal, else a new line whenever its state, lease or reason for waiting
    changes. With `log_out`, the job's output is written there as it arrives, and all of it
    before this returns (the last chunks can arrive just after the job ended: read for up to
    LOG_DRAIN_POLLS more polls). Returns the ended job."""
    last: tuple[object, ...] = ()
    tty = bool(status_out and status_out.isatty())
    cursor = 0
    while True:
        job = client.job(job_id)
        lease = job.current_lease
        reason = job.unplaced_reason
        # The reason's words, not when the matcher last checked it: a new line only when they change.
        key = (job.status, lease.id if lease else None, (reason.code, reason.detail) if reason else None)
        if log_out is not None:
            if tty and status_out is not None:
                status_out.write("\r\x1b[2K")  # the output goes above the status line
                status_out.flush()
            cursor, _complete = _logs_read(client, job_id, cursor, log_out)
        if status_out is not None and (tty or key != last):
            line = status_line(job)
            status_out.write(f"\r\x1b[2K{line}" if tty else f"{line}\n")
            status_out.flush()
            last = key
        if job.finished:
            if tty and status_out is not None:
                status_out.write("\n")
            if log_out is not None:
                for _ in range(LOG_DRAIN_POLLS):
                    cursor, complete = _logs_read(client, job_id, cursor, log_out)
                    if complete:
                        break
                    sleep(interval_s)
            return job
        sleep(interval_s)


# After the job ended, how many polls `run --follow` waits for the rest of its output.
LOG_DRAIN_POLLS = 5


def _logs_read(client: Client, job_id: int, cursor: int, out: TextIO, *, as_json: bool = False) -> tuple[int, bool]:
    """Write the job's output after `cursor` to `out` (each chunk's text as it came; with
    `as_json`, one JSON object per chunk and line), reading on while pages come full; returns the
    new cursor and whether the output is complete (the job is over and all of it was read)."""
    while True:
        logs = client.job_logs(job_id, cursor=cursor)
        # On a terminal the text is made safe to show; elsewhere (a file, a pipe) it is as it came.
        shown = terminal_safe if _is_terminal(out) else str
        for chunk in logs.chunks:
            out.write(json.dumps(chunk.raw, sort_keys=True) + "\n" if as_json else shown(chunk.text))
        out.flush()
        cursor = logs.next_cursor
        if logs.finished or not logs.chunks:
            return cursor, logs.finished


def _is_terminal(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


def status_line(job: Job, *, now: datetime | None = None) -> str:
    """`job 12  running  machine 3  00:01:20  charged 0.0123` (what the API shows)."""
    parts = [f"job {job.id}", job.status]
    lease = job.current_lease
    if lease is not None:
        parts.append(f"machine {lease.machine}")
        if lease.started_at is not None:
            end = lease.ended_at or now or datetime.now(UTC)
            parts.append(_duration((end - lease.started_at).total_seconds()))
    elif job.status == "pending" and job.unplaced_reason is not None:
        parts.append(f"waiting: {terminal_safe(job.unplaced_reason.detail)}")
    if job.budget is not None and job.budget.charged:
        parts.append(f"charged {job.budget.charged}")
    return "  ".join(parts)


def job_exit_code(job: Job) -> int:
    if job.status == "succeeded":
        return 0
    if job.exit_code is not None and 0 < job.exit_code < 256:
        return job.exit_code
    return 1


def _end_note(job: Job) -> str:
    notes = []
    if job.exit_code is not None:
        notes.append(f"exit code {job.exit_code}")
    if job.failure_reason:
        notes.append(terminal_safe(job.failure_reason))  # from the machine that ran it
    return f" ({'; '.join(notes)})" if notes else ""


def cmd_ls(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    jobs = list(itertools.islice(client.jobs(status=args.status), args.limit))
    if args.json:
        _print_json([j.raw for j in jobs], out)
        return 0
    _table(
        ("ID", "NAME", "STATUS", "GPUS", "MAX PRICE/H", "ATTEMPTS", "CREATED"),
        (
            (j.id, j.name or "-", j.status, j.gpu_count, j.max_price_per_gpu_hour, j.attempts, j.created_at)
            for j in jobs
        ),
        out,
    )
    return 0


def cmd_status(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    job = client.job(args.id)
    if args.json:
        _print_json(job.raw, out)
        return 0
    _print_job(job, out)
    return 0


def _print_job(job: Job, out: TextIO) -> None:
    rows: list[tuple[str, object]] = [
        ("id", job.id),
        ("name", job.name or "-"),
        ("status", job.status + _end_note(job)),
        ("kind", job.kind),
        ("gpus", job.gpu_count),
        ("vram", _gb(job.min_vram_mb)),
        ("models", ", ".join(job.allowed_models) or "any"),
        ("region", job.region or "any"),
        ("max price/h", job.max_price_per_gpu_hour),
        ("duration", f"{_duration(job.expected_duration_s)} (at most {_duration(job.max_duration_s)})"),
        ("attempts", job.attempts),
        ("created", _cell(job.created_at)),
        ("finished", _cell(job.finished_at)),
    ]
    if job.current_lease is not None:
        rows.append(("lease", f"{job.current_lease.id} on machine {job.current_lease.machine}"))
    if job.budget is not None:
        rows.append(("budget", f"reserved {job.budget.reserved}, charged {job.budget.charged}"))
    if job.unplaced_reason is not None:
        rows.append(("waiting", job.unplaced_reason.detail))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        out.write(f"{key.ljust(width)}  {value}\n")


def cmd_cancel(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    job = client.job_cancel(args.id, keep_checkpoint=args.keep_checkpoint)
    if args.json:
        _print_json(job.raw, out)
        return 0
    out.write(f"Job {job.id} {job.status}\n")
    if args.keep_checkpoint:
        checkpoint = job.raw.get("checkpoint")
        until = checkpoint.get("kept_until") if isinstance(checkpoint, dict) else None
        saved = f"its checkpoint is kept until {until}" if until else "its checkpoint is saved as it stops"
        out.write(f"{saved}: {PROG} checkpoint {job.id} -o FILE downloads it\n")
    return 0


def cmd_checkpoint(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    dest = args.output or f"job-{args.id}-checkpoint.tar"
    size, sha256 = client.job_checkpoint_download(args.id, dest)
    if args.json:
        _print_json({"job": args.id, "path": str(dest), "size": size, "sha256": sha256}, out)
    else:
        out.write(f"Saved job {args.id}'s checkpoint to {dest} ({size} bytes, sha256 {sha256})\n")
    return 0


def cmd_leases(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    leases = list(client.job_leases(args.id))
    if args.json:
        _print_json([lease.raw for lease in leases], out)
        return 0
    _table(
        ("ID", "STATUS", "MACHINE", "REGION", "GPUS", "PRICE/H", "STARTED", "ENDED", "END", "EXIT"),
        (
            (
                lease.id,
                lease.status,
                lease.machine,
                lease.region or "-",
                f"{lease.gpu_count}× {', '.join(sorted(set(lease.gpu_models)))}",
                lease.price_per_gpu_hour,
                lease.started_at,
                lease.ended_at,
                lease.end_reason,
                lease.exit_code,
            )
            for lease in leases
        ),
        out,
    )
    return 0


def cmd_logs(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    return job_logs_print(
        client, args.id, out=out, follow=args.follow, as_json=args.json, interval_s=args.poll_interval
    )


def job_logs_print(
    client: Client,
    job_id: int,
    *,
    out: TextIO,
    follow: bool = False,
    as_json: bool = False,
    interval_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Write the job's output so far to `out` (each chunk's text as it came; with `as_json`, one
    JSON object per chunk and line). With `follow`, keep reading from the last cursor every
    `interval_s` until the output is complete (the job is over). Returns the exit code, 0."""
    cursor = 0
    while True:
        cursor, complete = _logs_read(client, job_id, cursor, out, as_json=as_json)
        if complete or not follow:
            return 0
        sleep(interval_s)


def why_text(job: Job) -> str:
    """Why the job is where it is, in words."""
    if job.status == "pending":
        if job.unplaced_reason is None:
            text = f"Job {job.id} is waiting; the matcher has not looked at it yet."
        else:
            text = f"Job {job.id} is waiting: {job.unplaced_reason.detail} ({job.unplaced_reason.code})"
        for offer in (job.offers or [])[:3]:
            chance = f", P(finish) {offer.p_finish:.0%}" if offer.p_finish is not None else ""
            text += (
                f"\n  it fits machine {offer.machine} now ({offer.region or 'no region'}, "
                f"{offer.price_per_gpu_hour}/GPU-hour{chance})"
            )
        return text
    if job.status in {"scheduled", "running"}:
        where = f" on machine {job.current_lease.machine}" if job.current_lease is not None else ""
        return f"Job {job.id} is placed{where}: {job.status}."
    return f"Job {job.id} has ended: {job.status}{_end_note(job)}."


def cmd_why(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    job = client.job(args.id)
    if args.json:
        reason = job.raw.get("unplaced_reason")
        _print_json({"id": job.id, "status": job.status, "unplaced_reason": reason, "text": why_text(job)}, out)
    else:
        out.write(why_text(job) + "\n")
    return 0


def cmd_balance(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    balance = client.balance()
    if args.json:
        _print_json(balance.raw, out)
        return 0
    for name in ("available", "reserved", "unsettled", "settled", "deposited", "withdrawn", "total"):
        out.write(f"{name.ljust(10)}  {getattr(balance, name).tokens}\n")
    return 0


def cmd_statement(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    month = args.month or datetime.now(UTC).strftime("%Y-%m")
    statement = client.statement(month)
    if args.json:
        _print_json(statement.raw, out)
        return 0
    out.write(f"Statement for {statement.month}\n")
    out.write(f"opening balance  {statement.opening_balance.tokens}\n")
    for movement in statement.movements:
        out.write(f"  {movement.kind} ×{movement.count}  {movement.amount.tokens}\n")
    out.write(f"closing balance  {statement.closing_balance.tokens}\n")
    out.write(f"charged          {statement.charged.tokens}\n")
    out.write(f"settled          {statement.settled.tokens}\n")
    return 0


# --- the wallet: budgets and linking -------------------------------------------------------


def _account(args: argparse.Namespace) -> LocalAccount | None:
    """The key named by --key-file or --keystore (its password from GPGPU_KEYSTORE_PASSWORD, or
    asked for), or None when neither is given. UsageError when it cannot be used."""
    if not args.key_file and not args.keystore:
        return None
    from gpgpu_client import wallet

    try:
        if args.key_file:
            return wallet.key_file_load(Path(args.key_file))
        password = wallet.keystore_password()
        if password is None:
            password = getpass.getpass(f"Password of {args.keystore}: ")
        return wallet.keystore_load(Path(args.keystore), password)
    except wallet.WalletError as exc:
        raise UsageError(str(exc)) from None


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() in {"y", "yes"}


def budget_question(job_id: int, typed_data: JSON) -> str:
    """What the renter is asked before signing: the amount, the wallet, the escrow, the deadline
    (all read from the typed data to be signed)."""
    message, domain = typed_data["message"], typed_data["domain"]
    tokens = Decimal(int(message["maxAmount"])) / MICRO_PER_TOKEN
    until = datetime.fromtimestamp(int(message["deadline"]), tz=UTC)
    return (
        f"Sign job {job_id}'s budget: at most {tokens} tokens ({int(message['maxAmount'])} micro) from wallet "
        f"{message['renter']}, for the escrow {domain['verifyingContract']} on chain {domain['chainId']}, "
        f"valid until {_cell(until)}?"
    )


def job_authorize(
    client: Client, account: LocalAccount, job_id: int, *, confirm: Callable[[str], bool] | None
) -> JSON | None:
    """Sign job `job_id`'s budget with `account` and store it; returns the stored authorization,
    or None when `confirm` (asked the budget_question; None: do not ask) said no. A budget already
    signed and not refused is left as it is (and returned)."""
    from gpgpu_client.wallet import budget_signature

    address = account.address.lower()
    offer = client.budget_offer(job_id, address=address)
    stored = offer.get("authorization")
    if stored and stored.get("status") != "refused" and not stored.get("rejected_reason"):
        return dict(stored)
    typed = offer["typed_data"]
    if confirm is not None and not confirm(budget_question(job_id, typed)):
        return None
    message = typed["message"]
    return client.budget_authorize(
        job_id,
        renter_address=address,
        max_amount=int(message["maxAmount"]),
        deadline=int(message["deadline"]),
        signature=budget_signature(account, typed),
    )


def _authorization_line(job_id: int, authorization: JSON) -> str:
    micro = int((authorization.get("max_amount") or {}).get("micro", 0))
    return (
        f"job {job_id}'s budget of at most {Decimal(micro) / MICRO_PER_TOKEN} tokens is signed by "
        f"{authorization.get('renter_address')}: {authorization.get('status')}"
    )


def cmd_authorize(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    authorization = job_authorize(client, args.account, args.id, confirm=None if args.yes else _confirm)
    if authorization is None:
        sys.stderr.write(f"{PROG}: not signed\n")
        return 1
    if args.json:
        _print_json(authorization, out)
    else:
        out.write(_authorization_line(args.id, authorization).capitalize() + "\n")
    return 0


def _micro(text: str) -> int:
    """Tokens (at most 6 decimals) to micro, the token's smallest unit."""
    try:
        tokens = parse_price(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of tokens (e.g. 25 or 12.5)") from None
    micro = tokens * MICRO_PER_TOKEN
    if micro != micro.to_integral_value() or micro <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of tokens above 0 with at most 6 decimals")
    return int(micro)


def cmd_deposit(args: argparse.Namespace, out: TextIO, session: requests.Session | None) -> int:
    """Needs the chain node and the key, not the marketplace: its chain watcher credits the deposit."""
    from gpgpu_client.chain import Rpc, escrow_deposit

    environ = os.environ
    rpc_url = args.rpc_url or environ.get("GPGPU_RPC_URL")
    escrow = args.escrow or environ.get("GPGPU_ESCROW_ADDRESS")
    token = args.token or environ.get("GPGPU_TOKEN_ADDRESS") or None
    if not rpc_url:
        raise UsageError("name the chain node: --rpc-url URL or GPGPU_RPC_URL")
    if not escrow:
        raise UsageError("name the escrow: --escrow ADDRESS or GPGPU_ESCROW_ADDRESS")
    account: LocalAccount = args.account
    tokens = Decimal(args.amount) / MICRO_PER_TOKEN
    question = f"Deposit {tokens} tokens ({args.amount} micro) from wallet {account.address} into the escrow {escrow}?"
    if not args.yes and not _confirm(question):
        sys.stderr.write(f"{PROG}: nothing deposited\n")
        return 1
    deposit = escrow_deposit(Rpc(rpc_url, session=session), account, escrow=escrow, amount=args.amount, token=token)
    if args.json:
        _print_json(dataclasses.asdict(deposit), out)
        return 0
    if deposit.approve_tx:
        out.write(f"Approved the escrow on the token {deposit.token}: {deposit.approve_tx}\n")
    out.write(
        f"Deposited {tokens} tokens into the escrow {deposit.escrow} on chain {deposit.chain_id}: "
        f"{deposit.deposit_tx}\n"
        f"Available in the escrow: {Decimal(deposit.available_after) / MICRO_PER_TOKEN} tokens; the marketplace "
        f"credits the deposit once it is confirmed ({PROG} balance), if {deposit.address} is linked ({PROG} wallet).\n"
    )
    return 0


def cmd_wallet(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    account: LocalAccount | None = args.account
    linked = None
    if args.link:
        if account is None:
            raise UsageError("--link needs the wallet's key: --key-file PATH or --keystore PATH")
        me = client.me()
        renter = me.raw.get("renter")
        if not isinstance(renter, dict):
            raise ClientError(f"{me.username} is not a renter: only a renter links wallets")
        from gpgpu_client.wallet import wallet_link_signature

        signature = wallet_link_signature(account, renter_id=int(renter["id"]))
        linked = client.wallet_link(address=account.address.lower(), signature=signature)
    wallets = list(client.wallets())
    key_address = account.address.lower() if account is not None else None
    if args.json:
        _print_json({"key_address": key_address, "linked": linked, "wallets": wallets}, out)
        return 0
    if key_address is not None:
        known = any(w.get("address") == key_address for w in wallets)
        state = "linked" if known else f"not linked: {PROG} wallet --link"
        out.write(f"Key: {account.address if account else ''} ({state})\n")
    _table(("WALLET", "LINKED"), ((w.get("address"), w.get("created_at")) for w in wallets), out)
    return 0


# --- provider commands ----------------------------------------------------------------------


def cmd_provider(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    if args.pcmd == "earnings":
        return _provider_earnings(args, client, out)
    if args.pcmd == "machines":
        return _provider_machines(args, client, out)
    if args.pcmd == "floor":
        return _provider_floor(args, client, out)
    return _provider_windows(args, client, out)


def _tokens(value: object) -> str:
    return str(value.get("tokens")) if isinstance(value, dict) else "-"


def _provider_earnings(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    earnings = client.earnings()
    if args.json:
        _print_json(earnings, out)
        return 0
    for name in ("earned", "pending", "payable", "withdrawn"):
        out.write(f"{name.ljust(12)}  {_tokens(earnings.get(name))}\n")
    on_chain = earnings.get("on_chain") or {}
    withdrawable = _tokens(on_chain.get("withdrawable")) if on_chain.get("reachable") else "unknown"
    out.write(f"{'withdrawable'.ljust(12)}  {withdrawable}\n")
    out.write(f"{'fee'.ljust(12)}  {earnings.get('fee_bps')} bps\n")
    how = (earnings.get("how_to_withdraw") or {}).get("instructions")
    if how:
        out.write(f"\n{how}\n")
    return 0


def _provider_machines(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    machines = list(client.machines())
    if args.json:
        _print_json(machines, out)
        return 0
    _table(
        ("ID", "HOSTNAME", "STATUS", "REGION", "GPUS", "LAST HEARTBEAT"),
        (
            (
                m.get("id"),
                m.get("hostname"),
                m.get("status"),
                m.get("region") or "-",
                m.get("gpu_count"),
                m.get("last_heartbeat_at"),
            )
            for m in machines
        ),
        out,
    )
    return 0


def _provider_floor(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    machine_id = args.machine
    if machine_id is None:
        # The API addresses a GPU under its machine: find the machine that has it.
        for machine in client.machines():
            gpus = client.machine(int(machine["id"])).get("gpus") or []
            if any(gpu.get("id") == args.gpu for gpu in gpus):
                machine_id = int(machine["id"])
                break
        else:
            raise ClientError(f"no GPU {args.gpu} on your machines ({PROG} provider machines --json lists them)")
    gpu = client.gpu_price_floor_set(machine_id, args.gpu, args.floor)
    if args.json:
        _print_json(gpu, out)
    else:
        own = gpu.get("price_floor")
        out.write(
            f"GPU {gpu.get('id')} ({gpu.get('model')}) on machine {machine_id}: floor "
            f"{gpu.get('effective_price_floor')}/GPU-hour{'' if own is not None else ' (your default)'}\n"
        )
    return 0


def _provider_windows(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    if args.wcmd == "add":
        window = client.window_create(args.window)
        if args.json:
            _print_json(window, out)
        else:
            out.write(f"Window {window.get('id')}: {_window_text(window)}\n")
        return 0
    if args.wcmd == "rm":
        client.window_delete(args.id)
        if not args.json:
            out.write(f"Window {args.id} removed\n")
        else:
            _print_json({"id": args.id, "removed": True}, out)
        return 0
    windows = list(client.windows())
    if args.json:
        _print_json(windows, out)
        return 0
    _table(
        ("ID", "MACHINE", "WINDOW"),
        ((w.get("id"), w.get("machine") if w.get("machine") is not None else "all", _window_text(w)) for w in windows),
        out,
    )
    return 0


def _window_text(window: JSON) -> str:
    days = ",".join(window.get("days") or [])
    return f"{days} {window.get('start_time')}-{window.get('end_time')} {window.get('timezone')}"


def _floor(text: str) -> str | None:
    if text == "default":
        return None
    try:
        return str(parse_price(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or 'default')") from None


# --- completion -----------------------------------------------------------------------------

_BASH = """# bash completion for gpgpu: eval "$(gpgpu completion bash)"
_gpgpu() {
  local cur=${COMP_WORDS[COMP_CWORD]}
  if [ "$COMP_CWORD" -eq 1 ]; then
    COMPREPLY=($(compgen -W "%(commands)s" -- "$cur"))
  elif [ "${COMP_WORDS[1]}" = run ]; then
    COMPREPLY=($(compgen -f -X '!*.@(toml|yaml|yml)' -- "$cur") $(compgen -W "%(run)s" -- "$cur"))
  elif [ "${COMP_WORDS[1]}" = completion ]; then
    COMPREPLY=($(compgen -W "bash zsh" -- "$cur"))
  else
    COMPREPLY=($(compgen -W "--json --help" -- "$cur"))
  fi
}
shopt -s extglob
complete -o filenames -F _gpgpu gpgpu
"""

_ZSH = """#compdef gpgpu
# zsh completion for gpgpu: gpgpu completion zsh > "${fpath[1]}/_gpgpu"
_gpgpu() {
  if (( CURRENT == 2 )); then
    compadd %(commands)s
  elif [[ $words[2] == run ]]; then
    _files -g '*.(toml|yaml|yml)'
    compadd -- %(run)s
  elif [[ $words[2] == completion ]]; then
    compadd bash zsh
  else
    compadd -- --json --help
  fi
}
compdef _gpgpu gpgpu
"""

_RUN_FLAGS = (
    "--follow --json --name --kind --image --command --env --gpus --vram --model --region --max-price "
    "--duration --max-duration --checkpoint-interval --checkpoint-dir --no-interruptible --idempotency-key --authorize "
    "--key-file --keystore --yes"
)


def cmd_completion(args: argparse.Namespace, out: TextIO) -> int:
    template = _BASH if args.shell == "bash" else _ZSH
    out.write(template % {"commands": " ".join(COMMANDS), "run": _RUN_FLAGS})
    return 0


# --- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Rent GPUs on the GPGPU marketplace.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name != "completion":
            sub.add_argument("--json", action="store_true", help="print machine-readable JSON")
        return sub

    login = command("login", "check a token against the marketplace and save it")
    login.add_argument("--url", required=True, help="the marketplace's address, e.g. https://market.example")
    login.add_argument("--token", required=True, help="your API token")

    search = command("search", "search the GPUs on the market")
    search.add_argument("query", nargs="*", help="e.g. 'model=RTX-4090 vram>=20 price<=0.5 region=eu available'")
    search.add_argument("--limit", type=_positive, default=20, help="show at most this many (default 20)")

    run = command("run", "submit a job from a TOML/YAML file and/or flags")
    run.add_argument("file", nargs="?", help="a job file (.toml, .yaml)")
    run.add_argument("--follow", "-f", action="store_true", help="show its status until it ends; exit with its result")
    run.add_argument("--name")
    run.add_argument("--kind", choices=("container", "process"))
    run.add_argument("--image")
    run.add_argument("--command", help="the command line, split like a shell's")
    run.add_argument("--env", action="append", metavar="NAME=VALUE")
    run.add_argument("--gpus", type=int)
    run.add_argument("--vram", help="GPU memory at least, GB (or 24gb, 24564mb)")
    run.add_argument("--model", action="append", help="a GPU model it may run on (repeat for several)")
    run.add_argument("--region")
    run.add_argument("--max-price", help="the most it pays per GPU-hour")
    run.add_argument("--duration", help="its expected duration (3600, 90m, 2h)")
    run.add_argument("--max-duration", help="when it is stopped (default: its duration)")
    run.add_argument("--checkpoint-interval", help="how often it saves its progress (10m)")
    run.add_argument("--checkpoint-dir", help="a directory under /work that follows the job (/work/ckpt)")
    run.add_argument("--no-interruptible", action="store_true", help="only on machines that will not take it back")
    run.add_argument("--idempotency-key", help="default: a fresh one")
    run.add_argument("--poll-interval", type=float, default=2.0, help=argparse.SUPPRESS)
    run.add_argument("--authorize", action="store_true", help="sign its budget right after submitting it")
    _key_options(run)

    authorize = command("authorize", "sign a job's budget with your wallet's key, for the escrow")
    authorize.add_argument("id", type=_positive, help="the job's id")
    _key_options(authorize, required=True)

    deposit = command("deposit", "deposit tokens from your wallet into the escrow (approve, then deposit)")
    deposit.add_argument("amount", type=_micro, help="tokens, e.g. 25 or 12.5")
    deposit.add_argument("--rpc-url", help="the chain node's JSON-RPC URL (default: $GPGPU_RPC_URL)")
    deposit.add_argument("--escrow", help="the escrow's address (default: $GPGPU_ESCROW_ADDRESS)")
    deposit.add_argument("--token", help="the token's address (default: $GPGPU_TOKEN_ADDRESS, else the escrow's)")
    _key_options(deposit, required=True)

    wallet = command("wallet", "your linked wallets (and the address of a key)")
    wallet.add_argument("--link", action="store_true", help="link the key's wallet to your account")
    _key_options(wallet, confirm=False)

    ls = command("ls", "list your jobs, newest first")
    ls.add_argument("--status", help="only these statuses (comma-separated)")
    ls.add_argument("--limit", type=_positive, default=50)

    logs = command("logs", "a job's output so far (--follow: until it ends)")
    logs.add_argument("id", type=_positive, help="the job's id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing its output until the job ends")
    logs.add_argument("--poll-interval", type=float, default=2.0, help=argparse.SUPPRESS)

    cancel = command("cancel", "cancel a job")
    cancel.add_argument("id", type=_positive, help="the job's id")
    cancel.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="save its checkpoint_dir as it stops and keep it for download (gpgpu checkpoint)",
    )

    checkpoint = command("checkpoint", "download a job's checkpoint (a tar archive), its SHA-256 checked")
    checkpoint.add_argument("id", type=_positive, help="the job's id")
    checkpoint.add_argument("--output", "-o", help="the file to write (default: job-ID-checkpoint.tar)")

    for name, help_text in (
        ("status", "one job in detail"),
        ("leases", "a job's leases (where and when it ran)"),
        ("why", "why a job is waiting"),
    ):
        command(name, help_text).add_argument("id", type=_positive, help="the job's id")

    command("balance", "your balance")
    statement = command("statement", "your statement for a month")
    statement.add_argument("--month", type=_month, help="YYYY-MM (default: this month, UTC)")

    provider = commands.add_parser("provider", help="a provider's machines, prices, windows and earnings")
    pcommands = provider.add_subparsers(dest="pcmd", required=True, parser_class=_Parser)

    def pcommand(parent: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="print machine-readable JSON")
        return sub

    pcommand(pcommands, "earnings", "your earnings and how to withdraw them")
    pcommand(pcommands, "machines", "your machines")
    floor = pcommand(pcommands, "floor", "set a GPU's price floor per GPU-hour")
    floor.add_argument("gpu", type=_positive, help="the GPU's id (gpgpu provider machines --json)")
    floor.add_argument("floor", type=_floor, help="tokens per GPU-hour, or 'default' for your default floor")
    floor.add_argument("--machine", type=_positive, help="its machine (default: found among yours)")
    windows = pcommands.add_parser("windows", help="your availability windows")
    wcommands = windows.add_subparsers(dest="wcmd", required=True, parser_class=_Parser)
    pcommand(wcommands, "list", "list your availability windows")
    add = pcommand(wcommands, "add", "declare an availability window")
    add.add_argument("text", help="DAYS HH:MM-HH:MM [TIME ZONE], e.g. 'mon-fri 20:00-08:00 Europe/Paris'")
    add.add_argument("--machine", type=_positive, help="one of your machines (default: all)")
    pcommand(wcommands, "rm", "remove an availability window").add_argument("id", type=_positive)

    completion = command("completion", "print a shell completion script")
    completion.add_argument("shell", choices=("bash", "zsh"))
    return parser


def _key_options(parser: argparse.ArgumentParser, *, required: bool = False, confirm: bool = True) -> None:
    keys = parser.add_mutually_exclusive_group(required=required)
    keys.add_argument("--key-file", help="a file holding the wallet's 0x hex private key (mode 0600)")
    keys.add_argument("--keystore", help="an encrypted JSON keystore (password: $GPGPU_KEYSTORE_PASSWORD or asked)")
    if confirm:
        parser.add_argument("--yes", "-y", action="store_true", help="sign without asking")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _month(text: str) -> str:
    if not _MONTH_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a month as YYYY-MM")
    return text


_COMMANDS: dict[str, Callable[[argparse.Namespace, Client, TextIO], int]] = {
    "login": cmd_login,
    "search": cmd_search,
    "run": cmd_run,
    "ls": cmd_ls,
    "status": cmd_status,
    "cancel": cmd_cancel,
    "checkpoint": cmd_checkpoint,
    "leases": cmd_leases,
    "logs": cmd_logs,
    "why": cmd_why,
    "balance": cmd_balance,
    "statement": cmd_statement,
    "authorize": cmd_authorize,
    "wallet": cmd_wallet,
    "provider": cmd_provider,
}


def main(argv: Sequence[str] | None = None, *, session: requests.Session | None = None) -> int:
    """Run one command; returns the exit code. `session` (tests) is the requests session the
    client uses."""
    args = build_parser().parse_args(argv)
    out = sys.stdout
    try:
        if args.cmd == "completion":
            return cmd_completion(args, out)
        # Input is checked before a config or the network is needed.
        if args.cmd == "search":
            _search_params(args)
        if args.cmd == "run":
            args.spec = _run_spec(args)
            if args.authorize and not (args.key_file or args.keystore):
                raise UsageError("--authorize needs the wallet's key: --key-file PATH or --keystore PATH")
        if args.cmd == "provider" and args.pcmd == "windows" and args.wcmd == "add":
            args.window = _window(args)
        # The key is opened before anything is sent, so a bad one leaves no unsigned job behind.
        if args.cmd in {"run", "authorize", "wallet", "deposit"}:
            args.account = _account(args)
        if args.cmd == "deposit":
            return cmd_deposit(args, out, session)
        client = Client(args.url, args.token, session=session) if args.cmd == "login" else _client(session)
        return _COMMANDS[args.cmd](args, client, out)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 2
    except ApiError as exc:
        sys.stderr.write(f"{PROG}: {_api_error_line(exc)}\n")
        return 1
    except ClientError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROG}: interrupted (a submitted job goes on: {PROG} cancel ID stops it)\n")
        return 130


def _window(args: argparse.Namespace) -> JSON:
    try:
        window = parse_window(args.text)
    except WindowError as exc:
        raise UsageError(f"bad window: {exc}") from None
    if args.machine is not None:
        window["machine"] = args.machine
    return window


def _api_error_line(exc: ApiError) -> str:
    line = f"{exc.detail} ({exc.code})"
    others = [f"{name}: {'; '.join(messages)}" for name, messages in exc.fields.items()]
    if len(others) > 1:
        line += " [" + ", ".join(others) + "]"
    return line
