"""Writes for the fleet: providers, registration tokens, machines, GPUs, availability.

GPU state: this module is its one writer. The heartbeat sets what the owner's agent reports
(`idle`, `owner_busy`, `offline` for a GPU it no longer lists); jobs.services moves a GPU into
and out of `leased` through gpus_lease and gpus_release, in the transaction that writes the
lease; suspension, revocation and the liveness sweep take a machine's GPUs `offline`.

Leases live a layer above (jobs): what this module needs of them (end a machine's leases, count
them, the heartbeat's orders) goes through providers.leases, which jobs fills in.

Locks, always taken in this order, so no two of these writers can deadlock:

1. the machine row (_machine_lock; a heartbeat's UPDATE in _heartbeat_machine_lock takes the
   same lock), FOR NO KEY UPDATE: heartbeats, credential changes and the liveness sweep of one
   machine serialise on it, but a transaction inserting a row that references the machine (a
   lease: its foreign key check takes FOR KEY SHARE at commit) never waits for it;
2. lease rows (jobs.services.lease_end, through providers.leases, while leases end);
3. GPU rows, in primary-key order (gpus_lock, _machine_gpus_lock): every GPU state write
   holds them.

The matcher locks GPUs with SKIP LOCKED (marketplace.matching) and never waits for a lock
a heartbeat holds. A heartbeat locks its machine's GPU rows before it reads their active
leases, so an assignment that holds some of them has committed (and its leases are seen) by
the time the heartbeat writes: a heartbeat never writes a leased GPU back to `idle`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import IntegrityError, connection, transaction
from django.db.models import Max, Q
from django.utils import timezone

from core.lookups import int_array
from providers import heartbeat_steady, idle_history
from providers.availability import FOREVER, days_to_mask, mask_to_days, validate_timezone
from providers.columns import field_column as _field_column
from providers.errors import (
    Conflict,
    MachineCredentialRevoked,
    NotFound,
    RegistrationTokenInvalid,
    ValidationFailed,
)
from providers.leases import machine_leases
from providers.models import (
    GPU,
    PRICE_DECIMALS,
    AvailabilityWindow,
    Blackout,
    IdleStretch,
    LivenessState,
    Machine,
    MachineCredentialRevocation,
    Provider,
    RegistrationToken,
    TelemetrySample,
    region_key,
)
from providers.selectors import machine_available_until

logger = logging.getLogger(__name__)

REGISTRATION_TOKEN_PREFIX = "gpreg_"  # noqa: S105 - a public prefix, not a secret
MACHINE_CREDENTIAL_PREFIX = "gpm_"


def secret_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def provider_create(*, user: User, display_name: str, payout_address: str = "") -> Provider:
    return Provider.objects.create(user=user, display_name=display_name, payout_address=payout_address)


def registration_token_create(*, provider: Provider, label: str = "") -> tuple[RegistrationToken, str]:
    """A one-time token for registering one machine; returns the row and the raw token (shown
    once, only its digest is stored). It expires after REGISTRATION_TOKEN_TTL_H hours."""
    raw = REGISTRATION_TOKEN_PREFIX + secrets.token_urlsafe(24)
    token = RegistrationToken.objects.create(
        provider=provider,
        label=label,
        prefix=raw[:12],
        token_digest=secret_digest(raw),
        expires_at=timezone.now() + timedelta(hours=settings.GPGPU["REGISTRATION_TOKEN_TTL_H"]),
    )
    return token, raw


def machine_suspend(*, machine: Machine, reason: str, actor: str) -> Machine:
    """Take a machine off the market (an operator's decision): it gets no new leases, its
    active leases end (interruptible jobs go back to the queue) and its GPUs show offline.
    Only an operator's machine_unsuspend brings it back."""
    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(status=Machine.Status.SUSPENDED, suspended_reason=reason[:255])
        machine_leases().end_for_machine(machine_id=machine.pk, reason="machine_suspended", actor=actor, detail=reason)
        _machine_gpus_offline(machine_id=machine.pk)
    logger.info("machine %s suspended by %s: %s", machine.pk, actor, reason)
    machine.refresh_from_db()
    return machine


def machine_unsuspend(*, machine: Machine, actor: str) -> Machine:
    """Allow a suspended machine back; it shows offline until its next heartbeat."""
    updated = Machine.objects.filter(pk=machine.pk, status=Machine.Status.SUSPENDED).update(
        status=Machine.Status.OFFLINE, suspended_reason=""
    )
    if not updated:
        raise Conflict(f"Machine {machine.pk} is not suspended.")
    logger.info("machine %s unsuspended by %s", machine.pk, actor)
    machine.refresh_from_db()
    return machine


# --- provider settings from the REST API (/api/v1/) -------------------------------------------

# The most a price floor may be, per GPU-hour: the same ceiling as a job's max price.
PRICE_FLOOR_MAX = Decimal("1000")
# Bounds on what one provider may declare, so availability arithmetic stays cheap.
MAX_WINDOWS_PER_PROVIDER = 100
MAX_BLACKOUTS_PER_PROVIDER = 500
PAYOUT_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")


class _Unset:
    """Marks a keyword argument the caller did not give (None is a value for some fields)."""

    def __repr__(self) -> str:
        return "UNSET"


# Typed loosely so that it can be the default of a parameter of any type.
UNSET: Any = _Unset()


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"{field}: {message}", extra={"fields": {field: [message]}})


def _checked_price_floor(value: Decimal, *, field: str) -> Decimal:
    if not isinstance(value, Decimal) or not value.is_finite():
        raise _invalid(field, "must be a decimal number")
    if value < 0 or value > PRICE_FLOOR_MAX:
        raise _invalid(field, f"must be between 0 and {PRICE_FLOOR_MAX}")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -PRICE_DECIMALS:
        raise _invalid(field, f"must have at most {PRICE_DECIMALS} decimal places")
    return value


def provider_update(
    *,
    provider: Provider,
    display_name: str = UNSET,
    payout_address: str = UNSET,
    default_price_floor: Decimal = UNSET,
) -> Provider:
    """Change a provider's own settings; arguments not given stay as they are.

    display_name: 1 to 100 characters (trimmed). payout_address: an Ethereum address
    (0x + 40 hex digits) or "" to clear it. default_price_floor: 0 to PRICE_FLOOR_MAX per GPU-hour,
    at most 6 decimal places. Raises ValidationFailed and changes nothing on bad input.
    """
    changes: dict[str, object] = {}
    if display_name is not UNSET:
        name = (display_name or "").strip()
        if not 1 <= len(name) <= 100:
            raise _invalid("display_name", "must be 1 to 100 characters")
        changes["display_name"] = name
    if payout_address is not UNSET:
        address = (payout_address or "").strip()
        if address and not PAYOUT_ADDRESS_RE.fullmatch(address):
            raise _invalid("payout_address", "must be an Ethereum address: 0x followed by 40 hex digits")
        changes["payout_address"] = address
    if default_price_floor is not UNSET:
        changes["default_price_floor"] = _checked_price_floor(default_price_floor, field="default_price_floor")
    if changes:
        Provider.objects.filter(pk=provider.pk).update(**changes)
        provider.refresh_from_db()
    return provider


def gpu_price_floor_set(*, gpu: GPU, price_floor: Decimal | None) -> GPU:
    """Set a GPU's own price floor per GPU-hour (0 to PRICE_FLOOR_MAX), or None to fall back to
    its provider's default floor. The caller has checked the GPU is the provider's."""
    if price_floor is not None:
        price_floor = _checked_price_floor(price_floor, field="price_floor")
    GPU.objects.filter(pk=gpu.pk).update(price_floor=price_floor)
    gpu.refresh_from_db()
    return gpu


def _provider_machine(*, provider: Provider, machine_id: int | None) -> Machine | None:
    if machine_id is None:
        return None
    machine = Machine.objects.filter(pk=machine_id, provider=provider).first()
    if machine is None:
        # Another provider's machine reads the same as a missing one.
        raise _invalid("machine", f"you have no machine {machine_id}")
    return machine


def _window_fields(
    *, days: Iterable[str | int], start_time: time, end_time: time, timezone_name: str
) -> dict[str, object]:
    try:
        mask = days_to_mask(days)
    except (TypeError, ValueError) as exc:
        raise _invalid("days", str(exc)) from None
    try:
        validate_timezone(timezone_name)
    except ValueError as exc:
        raise _invalid("timezone", str(exc)) from None
    for field, value in (("start_time", start_time), ("end_time", end_time)):
        if not isinstance(value, time) or value.tzinfo is not None:
            raise _invalid(field, "must be a local time of day such as 20:00")
    return {"days": mask, "start_time": start_time, "end_time": end_time, "timezone": timezone_name}


def availability_window_create(
    *,
    provider: Provider,
    machine_id: int | None,
    days: Iterable[str | int],
    start_time: time,
    end_time: time,
    timezone_name: str,
) -> AvailabilityWindow:
    """Declare a weekly window when the provider's machine (or, with machine_id None, every
    machine of the provider without windows of its own) may be rented. An end at or before the
    start runs past midnight. Raises ValidationFailed for an unknown day or time zone, or a
    machine that is not the provider's."""
    fields = _window_fields(days=days, start_time=start_time, end_time=end_time, timezone_name=timezone_name)
    machine = _provider_machine(provider=provider, machine_id=machine_id)
    with transaction.atomic():
        # The provider row lock serialises concurrent creates, so the cap holds.
        Provider.objects.select_for_update().filter(pk=provider.pk).first()
        if AvailabilityWindow.objects.filter(provider=provider).count() >= MAX_WINDOWS_PER_PROVIDER:
            raise _invalid("days", f"a provider may declare at most {MAX_WINDOWS_PER_PROVIDER} windows")
        heartbeat_steady.forget_provider(provider.pk)
        return AvailabilityWindow.objects.create(provider=provider, machine=machine, **fields)


def availability_window_update(
    *,
    window: AvailabilityWindow,
    machine_id: int | None = UNSET,
    days: Iterable[str | int] = UNSET,
    start_time: time = UNSET,
    end_time: time = UNSET,
    timezone_name: str = UNSET,
) -> AvailabilityWindow:
    """Change a window; arguments not given stay as they are. Same checks as create."""
    provider = window.provider
    fields = _window_fields(
        days=mask_to_days(window.days) if days is UNSET else days,
        start_time=window.start_time if start_time is UNSET else start_time,
        end_time=window.end_time if end_time is UNSET else end_time,
        timezone_name=window.timezone if timezone_name is UNSET else timezone_name,
    )
    if machine_id is not UNSET:
        machine = _provider_machine(provider=provider, machine_id=machine_id)
        fields["machine"] = machine
    for name, value in fields.items():
        setattr(window, name, value)
    with transaction.atomic():
        window.save(update_fields=[*fields])
        heartbeat_steady.forget_provider(provider.pk)
    return window


def availability_window_delete(*, window: AvailabilityWindow) -> None:
    with transaction.atomic():
        AvailabilityWindow.objects.filter(pk=window.pk).delete()
        heartbeat_steady.forget_provider(window.provider_id)


def blackout_create(
    *,
    provider: Provider,
    machine_id: int | None,
    starts_at: datetime,
    ends_at: datetime,
    reason: str = "",
) -> Blackout:
    """A one-off period when the provider's machine (or all of its machines, machine_id None)
    must not be rented. Raises ValidationFailed unless ends_at is after starts_at (both
    timezone-aware) and the machine is the provider's."""
    for field, value in (("starts_at", starts_at), ("ends_at", ends_at)):
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise _invalid(field, "must be a date and time with a time zone")
    if ends_at <= starts_at:
        raise _invalid("ends_at", "must be after starts_at")
    if len(reason) > 255:
        raise _invalid("reason", "must be at most 255 characters")
    machine = _provider_machine(provider=provider, machine_id=machine_id)
    with transaction.atomic():
        Provider.objects.select_for_update().filter(pk=provider.pk).first()
        if Blackout.objects.filter(provider=provider).count() >= MAX_BLACKOUTS_PER_PROVIDER:
            raise _invalid("starts_at", f"a provider may keep at most {MAX_BLACKOUTS_PER_PROVIDER} blackouts")
        heartbeat_steady.forget_provider(provider.pk)
        return Blackout.objects.create(
            provider=provider, machine=machine, starts_at=starts_at, ends_at=ends_at, reason=reason
        )


def blackout_delete(*, blackout: Blackout) -> None:
    with transaction.atomic():
        Blackout.objects.filter(pk=blackout.pk).delete()
        heartbeat_steady.forget_provider(blackout.provider_id)


# --- agent: registration, heartbeats, liveness ------------------------------------------------


def machine_register(
    *, raw_token: str, hostname: str, agent_version: str, signing_address: str = "", region: str = ""
) -> tuple[Machine, str]:
    """Trade a one-time registration token for a new machine of the token's provider; returns
    the machine and its raw credential (shown once, only its digest is stored).

    The token is claimed with one conditional UPDATE (`… WHERE used_at IS NULL AND expires_at >
    now`), so of two concurrent registrations with the same token exactly one succeeds.
    Raises RegistrationTokenInvalid for an unknown, used or expired token. The machine shows
    offline until its first heartbeat.
    """
    now = timezone.now()
    digest = secret_digest(raw_token)
    with transaction.atomic():
        claimed = RegistrationToken.objects.filter(
            token_digest=digest, used_at__isnull=True, expires_at__gt=now
        ).update(used_at=now)
        if not claimed:
            token = RegistrationToken.objects.filter(token_digest=digest).first()
            if token is None:
                raise RegistrationTokenInvalid("Unknown registration token.")
            if token.used_at is not None:
                raise RegistrationTokenInvalid("This registration token has already been used; create a new one.")
            raise RegistrationTokenInvalid("This registration token has expired; create a new one.")
        token = RegistrationToken.objects.get(token_digest=digest)
        raw_credential = MACHINE_CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
        machine = Machine.objects.create(
            provider_id=token.provider_id,
            hostname=hostname,
            credential_digest=secret_digest(raw_credential),
            signing_address=signing_address,
            agent_version=agent_version,
            region=region_key(region),
            status=Machine.Status.OFFLINE,
        )
        RegistrationToken.objects.filter(pk=token.pk).update(machine=machine)
    logger.info("machine %s registered for provider %s with token %s…", machine.pk, token.provider_id, token.prefix)
    return machine, raw_credential


def usage_signing_chain_id() -> int:
    """The EIP-712 domain's chainId for usage reports a machine signs (GPGPU["USAGE_SIGNING_CHAIN_ID"], default
    the local development chain's id)."""
    return int(settings.GPGPU["USAGE_SIGNING_CHAIN_ID"])


def machine_authenticate(*, raw_credential: str) -> Machine | None:
    """The machine whose credential this is, or None for a credential never issued. Raises
    MachineCredentialRevoked (401 `credential_revoked`) for one that was rotated or revoked,
    saying which and when. Callers refuse a suspended machine."""
    digest = secret_digest(raw_credential)
    machine = Machine.objects.filter(credential_digest=digest).first()
    if machine is None:
        revocation = MachineCredentialRevocation.objects.filter(digest=digest).first()
        if revocation is not None:
            raise _credential_revoked_error(revocation)
    return machine


def _credential_revoked_error(revocation: MachineCredentialRevocation | None) -> MachineCredentialRevoked:
    if revocation is None:
        return MachineCredentialRevoked("This machine's credential was replaced; it no longer authenticates.")
    when = revocation.revoked_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if revocation.kind == MachineCredentialRevocation.Kind.ROTATED:
        return MachineCredentialRevoked(
            f"This machine's credential was replaced by a newer credential on {when}; install the newer one "
            "(gpgpu-agent rotate-credential --credential-stdin) or register the machine again with a new "
            "registration token."
        )
    return MachineCredentialRevoked(
        f"This machine's credential was revoked on {when} ({revocation.reason}); register the machine again "
        "with a new registration token."
    )


def _machine_lock(*, machine_id: int) -> Machine | None:
    """Lock one machine's row until the caller's transaction ends and return it as it is now
    (None if it does not exist). The one place a machine row is locked, but for the heartbeat,
    whose UPDATE takes the same lock (_heartbeat_machine_lock): heartbeats and credential
    rotation and revocation serialise on it, and the liveness sweep's conditional update waits
    for it. The caller holds a transaction.

    FOR NO KEY UPDATE rather than FOR UPDATE: nothing here changes the machine's key, and a
    FOR UPDATE lock would make every transaction that inserts a lease on the machine wait for it
    at commit (the deferred foreign key check), while that transaction holds GPU rows this one
    goes on to lock: the heartbeat/matcher deadlock."""
    return Machine.objects.select_for_update(no_key=True).filter(pk=machine_id).first()


# --- GPU state (see the module docstring) -----------------------------------------------------

# Ids per locking query, so an IN list stays short.
_GPU_LOCK_CHUNK = 1000


def _gpu_table() -> str:
    return connection.ops.quote_name(GPU._meta.db_table)


def gpus_lock(*, gpu_ids: Iterable[int], skip_locked: bool = False) -> list[tuple[int, str, int]]:
    """Lock the given GPU rows until the caller's transaction ends, in primary-key order, and
    return (id, state, machine_id) of each as it is now, in that order; ids that do not exist
    are left out. With skip_locked, rows another transaction holds are left out rather than
    waited for (the matcher). The one place GPU rows are locked by id. The caller holds a
    transaction."""
    ids = sorted(set(gpu_ids))
    if connection.vendor == "postgresql":
        # One statement, the ids as one array, without the ORM's making: the matcher locks
        # 500 GPUs a chunk this way while its policy shares the GIL (a fifth of a chunk's Python
        # went to the ORM here).
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id, state, machine_id FROM {_gpu_table()} WHERE id = ANY(%s::bigint[]) "  # noqa: S608
                f"ORDER BY id FOR UPDATE{' SKIP LOCKED' if skip_locked else ''}",
                [int_array(ids)],
            )
            return [tuple(row) for row in cursor.fetchall()]
    rows: list[tuple[int, str, int]] = []
    for start in range(0, len(ids), _GPU_LOCK_CHUNK):
        rows.extend(
            GPU.objects.filter(pk__any=ids[start : start + _GPU_LOCK_CHUNK])
            .order_by("pk")
            .select_for_update(skip_locked=skip_locked)
            .values_list("pk", "state", "machine_id")
        )
    return rows


def _machine_gpus_lock(*, machine_id: int) -> list[GPU]:
    """Lock every GPU row of the machine until the caller's transaction ends, in primary-key
    order (as gpus_lock does), and return them as they are now. The caller holds a
    transaction and the machine's row lock."""
    return list(GPU.objects.filter(machine_id=machine_id).order_by("pk").select_for_update())


def gpus_lease(*, gpu_ids: Sequence[int], held_on: Iterable[int] | None = None) -> None:
    """Show the GPUs as `leased`. For jobs.services.leases_assign, in the transaction that
    writes their active LeaseGPU rows; the rows are locked here (primary-key order) if the
    caller does not hold them already. `held_on`: the caller holds every one of the GPUs
    locked (gpus_lock, in this transaction), and these are their machines."""
    if not gpu_ids:
        return
    if held_on is None:
        with transaction.atomic():  # a savepoint in the caller's transaction
            held_on = [machine_id for _, _, machine_id in gpus_lock(gpu_ids=gpu_ids)]
            _gpus_show_leased(gpu_ids)
    else:
        _gpus_show_leased(gpu_ids)
    # Their machines' next heartbeats are full ones (with the start orders), before the
    # doorbell (registered after this) rings their agents.
    heartbeat_steady.forget(held_on)


def _gpus_show_leased(gpu_ids: Sequence[int]) -> None:
    if connection.vendor == "postgresql":  # as gpus_lock: one statement without the ORM's making
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {_gpu_table()} SET state = %s WHERE id = ANY(%s::bigint[])",  # noqa: S608
                [GPU.State.LEASED.value, int_array(gpu_ids)],
            )
        return
    for start in range(0, len(gpu_ids), _GPU_LOCK_CHUNK):
        GPU.objects.filter(pk__any=gpu_ids[start : start + _GPU_LOCK_CHUNK]).update(state=GPU.State.LEASED)


def gpus_release(*, gpu_ids: Sequence[int], state: str) -> None:
    """Show the GPUs still `leased` as `state` (idle, owner_busy or offline): their lease
    ended. For jobs.services.lease_end, in the transaction that ends the lease; a GPU that
    meanwhile went offline or owner_busy keeps that state. The rows are locked here, in
    primary-key order."""
    if state == GPU.State.LEASED or state not in GPU.State.values:
        raise ValueError(f"a released GPU cannot be shown {state!r}")
    if not gpu_ids:
        return
    with transaction.atomic():  # a savepoint in the caller's transaction
        gpus_lock(gpu_ids=gpu_ids)
        for start in range(0, len(gpu_ids), _GPU_LOCK_CHUNK):
            GPU.objects.filter(pk__any=gpu_ids[start : start + _GPU_LOCK_CHUNK], state=GPU.State.LEASED).update(
                state=state
            )


def _machine_gpus_offline(*, machine_id: int) -> None:
    """Show every GPU of the machine `offline` (it was suspended, revoked or went silent).
    The caller holds a transaction and has ended the machine's leases (locks: machine, leases,
    then GPUs). Its next heartbeat is a full one."""
    heartbeat_steady.forget([machine_id])
    gpus = _machine_gpus_lock(machine_id=machine_id)
    GPU.objects.filter(machine_id=machine_id).update(state=GPU.State.OFFLINE, idle_since=None)
    away = [g for g in gpus if g.idle_since is not None]
    if away:
        # What we know of their stretches ends at the machine's last heartbeat (censored).
        last = Machine.objects.filter(pk=machine_id).values_list("last_heartbeat_at", flat=True).first()
        over_at = last or timezone.now()
        idle_history.idle_stretches_record(
            idle_history.idle_stretch_over(
                machine_id=machine_id,
                gpu_id=g.pk,
                began_at=g.idle_since,
                over_at=max(over_at, g.idle_since),
                ended=False,
            )
            for g in away
            if g.idle_since is not None
        )


# Why a revocation was made, when its caller gives none.
DEFAULT_REVOKE_REASON = "revoked"
# The end reason of the leases of a machine whose credential is revoked (jobs.models.Lease.EndReason).
LEASE_END_CREDENTIAL_REVOKED = "credential_revoked"


def machine_credential_rotate(
    *,
    machine: Machine,
    actor: str,
    signing_address: str | None = None,
    only_if_digest: str | None = None,
) -> str:
    """Give the machine a new credential; returns it raw (shown once, only its digest is
    stored). The old credential is recorded as revoked (`rotated`): from now on it answers 401
    `credential_revoked`. Leases, GPUs and status are untouched: the agent goes on with the new
    credential.

    signing_address: also replace the machine's usage-signing address (0x + 40 hex digits; it
    cannot be cleared here). only_if_digest: the digest of the credential the caller
    authenticated with (an agent rotating its own); if another rotation replaced it meanwhile,
    raises MachineCredentialRevoked and changes nothing, so one credential rotates once.
    Raises Conflict `machine_revoked` for a machine whose credential was revoked (it must be
    registered again) and NotFound for a machine that does not exist.
    """
    if signing_address is not None and not PAYOUT_ADDRESS_RE.fullmatch(signing_address):
        raise _invalid("signing_address", "must be an Ethereum address: 0x followed by 40 hex digits")
    raw = MACHINE_CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        locked = _machine_lock(machine_id=machine.pk)
        if locked is None:
            raise NotFound(f"Machine {machine.pk} not found.")
        if only_if_digest is not None and locked.credential_digest != only_if_digest:
            raise _credential_revoked_error(MachineCredentialRevocation.objects.filter(digest=only_if_digest).first())
        if locked.credential_revoked_at is not None:
            raise Conflict(
                f"Machine {machine.pk}'s credential was revoked; register the machine again with a new "
                "registration token.",
                code="machine_revoked",
            )
        MachineCredentialRevocation.objects.create(
            machine_id=machine.pk,
            digest=locked.credential_digest,
            kind=MachineCredentialRevocation.Kind.ROTATED,
            reason="rotated",
            actor=actor[:64],
            revoked_at=timezone.now(),
        )
        changes = {"credential_digest": secret_digest(raw)}
        if signing_address is not None:
            changes["signing_address"] = signing_address
        Machine.objects.filter(pk=machine.pk).update(**changes)
        heartbeat_steady.forget([machine.pk])
    logger.info("machine %s credential rotated by %s", machine.pk, actor)
    machine.refresh_from_db()
    return raw


def machine_credential_revoke(
    *,
    machine: Machine,
    actor: str,
    reason: str = DEFAULT_REVOKE_REASON,
    leases_end_as: str | None = None,
    leases_end_at: datetime | None = None,
) -> None:
    """Revoke the machine's credential for good: the current credential is recorded as revoked
    (a request with it answers 401 `credential_revoked` with the time and `reason`), and the
    machine's digest becomes one nobody holds the credential of, so nothing authenticates as
    it any more. It goes offline (a suspended machine stays suspended), its GPUs show offline,
    and its active leases end as `credential_revoked`: interruptible jobs go back to the
    queue, others fail (as for a suspension). To come back, the machine registers again with a
    new registration token, as a new machine.

    Revoking a revoked machine changes nothing. reason: at most 255 characters (trimmed).
    `leases_end_as` / `leases_end_at`: another end reason and time for its leases (a machine
    replaced by a new registration of the same rig: `lost`, at its last heartbeat).
    """
    reason = reason.strip()[:255] or DEFAULT_REVOKE_REASON
    with transaction.atomic():
        locked = _machine_lock(machine_id=machine.pk)
        if locked is None or locked.credential_revoked_at is not None:
            return
        now = timezone.now()
        MachineCredentialRevocation.objects.create(
            machine_id=machine.pk,
            digest=locked.credential_digest,
            kind=MachineCredentialRevocation.Kind.REVOKED,
            reason=reason,
            actor=actor[:64],
            revoked_at=now,
        )
        # A random digest: no credential hashes to it that anyone could know.
        Machine.objects.filter(pk=machine.pk).update(credential_digest=secrets.token_hex(32), credential_revoked_at=now)
        Machine.objects.filter(pk=machine.pk).exclude(status=Machine.Status.SUSPENDED).update(
            status=Machine.Status.OFFLINE
        )
        ended = machine_leases().end_for_machine(
            machine_id=machine.pk,
            reason=leases_end_as or LEASE_END_CREDENTIAL_REVOKED,
            actor=actor,
            detail=f"the machine's credential was revoked ({reason})",
            at=leases_end_at,
        )
        _machine_gpus_offline(machine_id=machine.pk)
    logger.info("machine %s credential revoked by %s (%s): %d lease(s) ended", machine.pk, actor, reason, ended)
    machine.refresh_from_db()


def machine_remove(*, machine: Machine, actor: str) -> Machine:
    """Take a machine out of the provider's fleet for good: refused (Conflict `machine_busy`)
    while it holds an active lease; otherwise its credential is revoked, it goes offline, and it
    is marked removed (hidden from the provider's lists; its history stays for statements).
    Its GPUs may then be registered by a new machine of any provider (the rig changed hands).
    Removing a removed machine changes nothing."""
    with transaction.atomic():
        locked = _machine_lock(machine_id=machine.pk)
        if locked is None or locked.removed_at is not None:
            machine.refresh_from_db()
            return machine
        active = machine_leases().active_count(machine_ids=[machine.pk])
        if active:
            raise Conflict(
                f"Machine {machine.pk} is running {active} lease(s); remove it once they have ended "
                "(or suspend it to end them now).",
                code="machine_busy",
            )
        machine_credential_revoke(machine=locked, actor=actor, reason="the machine was removed by its provider")
        Machine.objects.filter(pk=machine.pk).update(removed_at=timezone.now(), status=Machine.Status.OFFLINE)
    logger.info("machine %s removed by %s", machine.pk, actor)
    machine.refresh_from_db()
    return machine


@dataclass(frozen=True)
class GpuReport:
    """One GPU as the agent saw it. Telemetry fields are None where the agent could not read them."""

    uuid: str
    index: int
    model: str
    vram_mb: int
    idle: bool
    owner_busy: bool = False
    idle_since: datetime | None = None
    memory_used_mb: int | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None


@dataclass(frozen=True)
class LeaseReport:
    """A lease the agent is handling, and in what state ("starting", "running", "stopping")."""

    lease_id: int
    state: str


@dataclass(frozen=True)
class HeartbeatReport:
    """A heartbeat's content. Machine facts left as None keep their stored value."""

    gpus: Sequence[GpuReport]
    leases: Sequence[LeaseReport] = ()
    agent_version: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    cpu_cores: int | None = None
    ram_mb: int | None = None
    disk_gb: int | None = None
    region: str | None = None
    # The validated `capabilities` object (see providers.agent_apis.CapabilitiesSerializer);
    # None keeps what is stored.
    capabilities: Mapping[str, Any] | None = None  # JSON values, checked by that serializer


@dataclass(frozen=True)
class LeaseCheckpoint:
    """A start order's checkpoint (jobs.checkpoints): where the job keeps it, the most it may be,
    where the agent uploads it, the archive to restore first (restore_url None: none yet) and
    how many times the job was resumed. A URL without a scheme is the agent API's own.
    `upload_direct`: the agent uploads to the store itself (POST `{upload_url}/upload` for a
    pre-signed PUT, then `{upload_url}/commit`) rather than PUT `upload_url`."""

    dir: str
    max_bytes: int
    upload_url: str
    restore_url: str | None
    restore_sha256: str
    restore_size: int
    resume_count: int
    upload_direct: bool = False


@dataclass(frozen=True)
class LeaseStart:
    lease_id: int
    job_id: int
    kind: str
    image: str
    command: list[str]
    env: dict[str, str]
    gpu_uuids: list[str]
    max_duration_s: int
    price_per_gpu_hour: str
    # The job's promised checkpoint interval, seconds (None: none promised).
    checkpoint_interval_s: int | None = None
    checkpoint: LeaseCheckpoint | None = None


@dataclass(frozen=True)
class LeaseStop:
    lease_id: int
    reason: str
    # Upload the job's checkpoint as it stops (protocol.STOP_SAVE_CHECKPOINT).
    save_checkpoint: bool = False


@dataclass(frozen=True)
class HeartbeatReply:
    heartbeat_interval_s: int
    server_time: datetime
    start: list[LeaseStart]
    stop: list[LeaseStop]
    # How long the agent's workloads may outlive its last successful heartbeat (LEASE_FENCE_S).
    lease_fence_s: int = 120
    # The owner's schedule for this machine now (see machine_schedule); None only in replies
    # built before it was computed.
    schedule: MachineSchedule | None = None
    # How much longer the machine's idle stretch is likely to last (its forecast's median),
    # seconds; None when it runs no lease or no stretch is running. Passed on to the jobs.
    predicted_idle_s: int | None = None
    # The same report again would change nothing but the machine's last heartbeat and its GPUs'
    # telemetry, and get this reply (providers.heartbeat_steady), until the prediction below is
    # computed again. Not sent to the agent.
    steady: bool = False
    # What predicted_idle_s was counted down from, and when it is due again (see _predicted_idle);
    # None when no lease runs here. Not sent to the agent.
    predicted_basis: heartbeat_steady.Prediction | None = None
    # The reported GPUs' (id, state) as written, in the report's order (for the steady record).
    gpus: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class MachineSchedule:
    """Whether the owner's schedule lets this machine be rented now, and until when.

    available_now=False: outside every window or inside a blackout; the agent offers nothing
    and reclaims running rentals. indefinitely=True: no end in sight (no windows, or windows
    covering the horizon); available_until is then None."""

    available_now: bool
    available_until: datetime | None
    indefinitely: bool


# A machine with no window (its own or its provider's) and no blackout ending later.
ALWAYS_AVAILABLE = MachineSchedule(available_now=True, available_until=None, indefinitely=True)


def machine_schedule(*, machine: Machine, now: datetime) -> MachineSchedule:
    """The owner's schedule for `machine` at `now`, from its windows and blackouts."""
    until = machine_available_until(machine=machine, now=now)
    if until is None:
        return MachineSchedule(available_now=False, available_until=None, indefinitely=False)
    if until == FOREVER:
        return ALWAYS_AVAILABLE
    return MachineSchedule(available_now=True, available_until=until, indefinitely=False)


# A lease the agent lists that the marketplace does not know for this machine.
STOP_REASON_UNKNOWN_LEASE = "unknown_lease"
# Where GPUs that must give up their index (reordered, or fallen off while another took their
# slot) are parked: above any index a heartbeat may report.
_GPU_PARKING_INDEX = 1000
_MACHINE_FACTS = ("agent_version", "driver_version", "cuda_version", "cpu_cores", "ram_mb", "disk_gb", "region")
JOB_KINDS = ("container", "process")


def machine_heartbeat(*, machine: Machine, report: HeartbeatReport) -> HeartbeatReply:
    """Record a heartbeat: machine facts, GPU inventory and telemetry, and the machine online
    (unless suspended); answer which leases the agent should start and stop.

    - GPUs are upserted by uuid. A uuid registered to a former machine of the same rig (same
      provider, or a removed machine) is taken over (_gpus_claim: the old machine's credential is
      revoked, its leases end as lost); one of another provider's machine in service raises
      Conflict `gpu_uuid_taken` and nothing is written. Known GPUs missing from the report go
      offline.
    - A GPU's state: `leased` while in an active lease, else `owner_busy` if the owner is using
      it or the agent does not call it idle, else `idle`. The machine's GPU rows are locked
      (primary-key order) before the active leases are read, so a concurrent assignment is
      never written back to `idle` (see the module docstring).
    - One TelemetrySample per GPU per TELEMETRY_SAMPLE_INTERVAL_S bucket (the first heartbeat in
      each bucket writes it), so heartbeats every few seconds do not grow the history. A
      machine's buckets are shifted by an offset of its own (heartbeat_steady.bucket).
    - A GPU whose `idle_since` the report clears or moves had its owner's stretch end: it is
      recorded for the idle forecasts (providers.idle_history), all of them in one insert, and
      nothing is written when none ended.
    - `capabilities`, when reported, replace the stored ones and set which job kinds the
      machine accepts (`accepts_container`, `accepts_process`); absent, they stay as they are.
    - An assigned lease of a kind the machine no longer accepts ends as `failed_to_start` (its
      job goes back to the queue) and is never sent.
    - `start`: assigned leases of this machine, without a stop request, that the agent did not
      list, of a kind the machine accepts.
    - `stop`: leases the agent listed that are ended, have a stop request, or are not this
      machine's (reason `unknown_lease`).

    `machine` is the row as the request authenticated it. The row is locked for the
    transaction, so heartbeats of one machine, credential rotation and revocation and the
    liveness sweep's conditional update serialise; if the credential was rotated or revoked
    while this request waited, raises MachineCredentialRevoked and records nothing.
    """
    now = timezone.now()
    reported = {g.uuid: g for g in report.gpus}
    try:
        with transaction.atomic():
            lock = _heartbeat_machine_lock(machine=machine, report=report, now=now)
            locked = lock.machine
            if lock.foreign_gpus:
                _gpus_claim(machine=locked, uuids=list(reported))
            kinds = _machine_facts_record(machine=locked, report=report, now=now)
            if lock.assigned:  # else no lease of a refused kind to end
                machine_leases().end_refused_kinds(machine_id=machine.pk, kinds=kinds)
            leased, gpus = _gpus_record(machine_id=machine.pk, report=report, now=now)
            # An assigned lease holds active GPUs, and the lock's statement saw it: without both
            # there is none to start (one assigned since is left to the next heartbeat, which its
            # generation bump makes a full one).
            reply = _heartbeat_reply(
                machine_id=machine.pk,
                report=report,
                kinds=kinds,
                may_have_assigned=leased and lock.assigned,
                now=now,
            )
            # Without a window or a coming blackout (the lock's statement says) it is available
            # at any time: what machine_schedule answers then, without reading either table.
            schedule = machine_schedule(machine=machine, now=now) if lock.scheduled else ALWAYS_AVAILABLE
            steady = (
                locked.status == Machine.Status.ONLINE
                and not (lock.assigned or lock.scheduled or reply.start or reply.stop)
                # A reply that tells running jobs a prediction: only with it cached (the record
                # then answers until the prediction is due again).
                and (PREDICTED_IDLE_CACHE_S > 0 or reply.predicted_basis is None)
                and all(g.idle_since is None or g.idle_since <= now for g in report.gpus)
            )
            reply = replace(reply, schedule=schedule, steady=steady, gpus=gpus)
    except IntegrityError:
        # Another machine claimed one of these uuids between the check and the insert.
        taken = sorted(
            GPU.objects.filter(uuid__in=list(reported)).exclude(machine_id=machine.pk).values_list("uuid", flat=True)
        )
        if taken:
            raise Conflict(
                f"GPU {taken[0]} is registered to another machine; nothing was recorded.",
                code="gpu_uuid_taken",
                extra={"uuids": taken},
            ) from None
        raise
    return reply


@dataclass(frozen=True, slots=True)
class _HeartbeatLock:
    """What the heartbeat's UPDATE … RETURNING of the machine row answers."""

    machine: Machine  # the row as it is now
    foreign_gpus: bool  # a reported GPU uuid is registered to another machine
    # The machine has an availability window (its own or its provider's) or a blackout ending
    # later; else machine_schedule has nothing to read (most owners declare neither).
    scheduled: bool
    # The machine holds an assigned lease; else none can be of a kind it now refuses. One
    # assigned after this statement began is left to the next heartbeat (the reply never asks
    # the agent to start a lease of a kind it refuses).
    assigned: bool


def _heartbeat_machine_lock(*, machine: Machine, report: HeartbeatReport, now: datetime) -> _HeartbeatLock:
    """Lock the machine's row for the heartbeat's transaction and write its heartbeat, in one
    UPDATE … RETURNING (the row lock a non-key UPDATE takes is _machine_lock's, FOR NO KEY
    UPDATE): `last_heartbeat_at`, online unless suspended, and `capabilities_reported_at` when
    the report has capabilities. Returns the row and what the same statement found out (see
    _HeartbeatLock).

    Raises MachineCredentialRevoked if the credential was rotated or revoked since the request
    authenticated `machine` (the caller's transaction then rolls the write back)."""
    qn = connection.ops.quote_name
    table = qn(Machine._meta.db_table)
    heartbeat_field, heartbeat_at = _field_column(Machine, "last_heartbeat_at")
    at = heartbeat_field.get_db_prep_save(now, connection)
    status = _field_column(Machine, "status")[1]
    assignments = [f"{heartbeat_at} = %s", f"{status} = CASE WHEN {status} = %s THEN {status} ELSE %s END"]
    params: list[Any] = [at, Machine.Status.SUSPENDED, Machine.Status.ONLINE]
    if report.capabilities is not None:
        assignments.append(f"{_field_column(Machine, 'capabilities_reported_at')[1]} = %s")
        params.append(at)
    uuids = [g.uuid for g in report.gpus]
    gpu_table = qn(GPU._meta.db_table)
    # Any reported uuid on another machine; uuid IN (…): the same text on SQLite and PostgreSQL.
    foreign = "FALSE"
    if uuids:
        listed = ", ".join(["%s"] * len(uuids))
        gpu_uuid = f"{gpu_table}.{_field_column(GPU, 'uuid')[1]}"
        gpu_machine = f"{gpu_table}.{_field_column(GPU, 'machine')[1]}"
        foreign = f"EXISTS (SELECT 1 FROM {gpu_table} WHERE {gpu_uuid} IN ({listed}) "  # noqa: S608
        foreign += f"AND {gpu_machine} <> {table}.{_field_column(Machine, 'id')[1]})"
    # What machines_available_until reads: the provider's windows and the machine's own, and
    # the blackouts of either that end after now.
    machine_id = f"{table}.{_field_column(Machine, 'id')[1]}"
    provider_id = f"{table}.{_field_column(Machine, 'provider')[1]}"
    scheduled = []
    for model in (AvailabilityWindow, Blackout):
        t = qn(model._meta.db_table)
        own = f"{t}.{_field_column(model, 'machine')[1]}"
        rows = f"{t}.{_field_column(model, 'provider')[1]} = {provider_id} AND ({own} IS NULL OR {own} = {machine_id})"
        if model is Blackout:
            rows += f" AND {t}.{_field_column(Blackout, 'ends_at')[1]} > %s"
        scheduled.append(f"EXISTS (SELECT 1 FROM {t} WHERE {rows})")  # noqa: S608
    columns = ", ".join(f"{table}.{_field_column(Machine, f.name)[1]}" for f in Machine._meta.concrete_fields)
    # Only the models' own (quoted) table and column names go into the text; values are parameters.
    sql = f"UPDATE {table} SET {', '.join(assignments)} WHERE {machine_id} = %s "  # noqa: S608
    assigned, assigned_params = machine_leases().assigned_exists_sql(machine_id_sql=machine_id)
    sql += f"RETURNING {columns}, {foreign} AS foreign_gpus, ({' OR '.join(scheduled)}) AS scheduled, "
    sql += f"{assigned} AS assigned"
    blackout_end = _field_column(Blackout, "ends_at")[0].get_db_prep_value(now, connection)
    params += [machine.pk, *uuids, blackout_end, *assigned_params]
    locked = next(iter(Machine.objects.raw(sql, params)), None)
    if locked is None or locked.credential_digest != machine.credential_digest:
        raise _credential_revoked_error(
            MachineCredentialRevocation.objects.filter(digest=machine.credential_digest).first()
        )
    # Columns of the raw query.
    return _HeartbeatLock(
        machine=locked,
        foreign_gpus=bool(getattr(locked, "foreign_gpus")),  # noqa: B009
        scheduled=bool(getattr(locked, "scheduled")),  # noqa: B009
        assigned=bool(getattr(locked, "assigned")),  # noqa: B009
    )


def _machine_facts_record(*, machine: Machine, report: HeartbeatReport, now: datetime) -> frozenset[str]:
    """Write what the agent reports of the machine (versions, sizes, region, capabilities) where
    it changed (its heartbeat and status are _heartbeat_machine_lock's); returns the job kinds it
    accepts now. `machine` is the row as locked."""
    facts: dict[str, object] = {
        name: getattr(report, name) for name in _MACHINE_FACTS if getattr(report, name) is not None
    }
    if "region" in facts:
        facts["region"] = region_key(cast(str, facts["region"]))
    if report.capabilities is not None:
        facts.update(_capability_facts(report.capabilities))
    # _heartbeat_machine_lock wrote the heartbeat itself; here only the facts that changed
    # (`machine` is the locked row, as stored), in one UPDATE, and none when none did.
    changed = {name: value for name, value in facts.items() if getattr(machine, name) != value}
    if changed:
        Machine.objects.filter(pk=machine.pk).update(**changed)
    accepts = {
        "container": facts.get("accepts_container", machine.accepts_container),
        "process": facts.get("accepts_process", machine.accepts_process),
    }
    return frozenset(kind for kind, on in accepts.items() if on)


_GPU_REPORTED_FIELDS = [
    "index",
    "model",
    "vram_mb",
    "state",
    "idle_since",
    "utilization_pct",
    "memory_used_mb",
    "temperature_c",
    "power_w",
    "last_telemetry_at",
]


def _gpus_record(
    *, machine_id: int, report: HeartbeatReport, now: datetime
) -> tuple[bool, tuple[tuple[int, str], ...]]:
    """Upsert the reported GPUs with their state and telemetry, take the ones no longer reported
    offline, and sample telemetry once per TELEMETRY_SAMPLE_INTERVAL_S bucket. Returns whether
    any of the machine's GPUs is in an active lease (their rows stay locked: that holds until
    the transaction ends), and the reported GPUs' (id, state) as written, in the report's order.

    A known GPU's row is written (all of them in one statement) only when something it stores
    changed, or once per bucket: `last_telemetry_at` says when the telemetry beside it was
    reported, at most a bucket ago, and a GPU whose report is unchanged costs no row write.

    The GPU rows are locked before their leases are read: an assignment holding some of them
    commits first, and its leases are then read here (each statement reads what is committed
    when it starts), so its GPUs stay `leased`."""
    reported = {g.uuid: g for g in report.gpus}
    existing = {g.uuid: g for g in _machine_gpus_lock(machine_id=machine_id)}
    _gpu_indexes_make_room(existing=existing, reported=reported)
    leased_ids = machine_leases().active_gpu_ids(machine_id=machine_id)
    samples: list[TelemetrySample] = []
    written: list[tuple[int, str]] = []
    to_update: list[GPU] = []
    stretches: list[IdleStretch | None] = []
    moved = False  # a GPU's idle stretch began or ended: the machine's prediction is stale
    for gr in report.gpus:
        gpu = existing.get(gr.uuid) or GPU(machine_id=machine_id, uuid=gr.uuid)
        previous_telemetry_at = gpu.last_telemetry_at
        previous_idle_since = gpu.idle_since
        stored = _gpu_stored(gpu)
        _gpu_reported(gpu, gr, leased=gpu.pk is not None and gpu.pk in leased_ids, now=now)
        if gpu.idle_since != previous_idle_since:
            moved = True
            if previous_idle_since is not None:
                stretches.append(_stretch_over(gpu, previous_idle_since, gr=gr, now=now))
        new_bucket = previous_telemetry_at is None or heartbeat_steady.bucket(
            previous_telemetry_at, machine_id
        ) != heartbeat_steady.bucket(now, machine_id)
        if gpu.pk is None:
            gpu.save()
        elif new_bucket or _gpu_stored(gpu) != stored:
            to_update.append(gpu)
        else:
            gpu.last_telemetry_at = previous_telemetry_at  # as stored: the row is not written
        written.append((gpu.pk, gpu.state))
        if new_bucket:
            samples.append(
                TelemetrySample(
                    gpu=gpu,
                    at=now,
                    utilization_pct=gr.utilization_pct,
                    memory_used_mb=gr.memory_used_mb,
                    temperature_c=gr.temperature_c,
                    power_w=gr.power_w,
                    state=gpu.state,
                )
            )
    _gpus_write(to_update)
    missing = [g for uuid, g in existing.items() if uuid not in reported]
    if missing:
        moved = moved or any(g.idle_since is not None for g in missing)
        GPU.objects.filter(pk__in=[g.pk for g in missing]).update(state=GPU.State.OFFLINE, idle_since=None)
        stretches.extend(
            idle_history.idle_stretch_over(
                machine_id=machine_id, gpu_id=g.pk, began_at=g.idle_since, over_at=now, ended=False
            )
            for g in missing
            if g.idle_since is not None
        )
    if samples:
        TelemetrySample.objects.bulk_create(samples)
    idle_history.idle_stretches_record(stretches)
    if moved and PREDICTED_IDLE_CACHE_S > 0:
        _predicted_idle_forget(machine_id=machine_id)
    return bool(leased_ids), tuple(written)


def _gpu_stored(gpu: GPU) -> tuple[object, ...]:
    """What the heartbeat writes of a GPU row, but the time of its telemetry."""
    return tuple(getattr(gpu, name) for name in _GPU_REPORTED_FIELDS[:-1])


def _gpus_write(gpus: Sequence[GPU]) -> None:
    """Write the heartbeat's fields (_GPU_REPORTED_FIELDS) of `gpus`, rows that exist, in one
    UPDATE … FROM (VALUES …): bulk_update's CASE WHEN per field and row cost most of a
    heartbeat's CPU. The caller holds the rows' locks."""
    if not gpus:
        return
    pk_field, pk_column = _field_column(GPU, "id")
    reported = [_field_column(GPU, name) for name in _GPU_REPORTED_FIELDS]
    fields = [f for f, _ in reported]
    if connection.vendor == "postgresql":
        # VALUES has no column types of its own: each one says its column's.
        row = "(" + ", ".join(f"%s::{f.cast_db_type(connection)}" for f in [pk_field, *fields]) + ")"
    else:
        row = "(" + ", ".join("%s" for _ in range(len(fields) + 1)) + ")"
    table = connection.ops.quote_name(GPU._meta.db_table)
    value_columns = [c for _, c in reported]
    columns = [pk_column, *value_columns]
    values = ", ".join([row] * len(gpus))
    assignments = ", ".join(f"{c} = v.{c}" for c in value_columns)
    # Only the model's own (quoted) table and column names go into the text; values are parameters.
    sql = f"WITH v ({', '.join(columns)}) AS (VALUES {values}) UPDATE {table} SET {assignments} FROM v "  # noqa: S608
    sql += f"WHERE {table}.{pk_column} = v.{pk_column}"
    params: list[Any] = []
    for gpu in gpus:
        params.append(gpu.pk)
        params.extend(f.get_db_prep_save(getattr(gpu, f.attname), connection) for f in fields)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def _stretch_over(gpu: GPU, began_at: datetime, *, gr: GpuReport, now: datetime) -> IdleStretch | None:
    """The stretch since `began_at` that this report of `gpu` closes (its idle_since was cleared
    or moved): ended when the agent says the owner is back; censored otherwise (not idle for
    another reason, or a later idle_since: the agent started the stretch afresh), at the later
    idle_since when there is one."""
    if gpu.idle_since is None:
        return idle_history.idle_stretch_over(
            machine_id=gpu.machine_id, gpu_id=gpu.pk, began_at=began_at, over_at=now, ended=gr.owner_busy
        )
    if gpu.idle_since < began_at:
        return None  # the agent reports an earlier start of the same stretch: nothing is over
    return idle_history.idle_stretch_over(
        machine_id=gpu.machine_id, gpu_id=gpu.pk, began_at=began_at, over_at=gpu.idle_since, ended=False
    )


def _gpu_reported(gpu: GPU, gr: GpuReport, *, leased: bool, now: datetime) -> None:
    """Set a GPU row's inventory, state and telemetry from its report (not saved)."""
    gpu.index = gr.index
    gpu.model = gr.model
    gpu.vram_mb = gr.vram_mb
    if leased:
        gpu.state = GPU.State.LEASED
    elif gr.owner_busy or not gr.idle:
        gpu.state = GPU.State.OWNER_BUSY
    else:
        gpu.state = GPU.State.IDLE
    if gr.idle and not gr.owner_busy:
        # The agent's clock may run ahead; an idle stretch cannot start in the future.
        gpu.idle_since = min(gr.idle_since or gpu.idle_since or now, now)
    else:
        gpu.idle_since = None
    gpu.utilization_pct = gr.utilization_pct
    gpu.memory_used_mb = gr.memory_used_mb
    gpu.temperature_c = gr.temperature_c
    gpu.power_w = gr.power_w
    gpu.last_telemetry_at = now


# `capabilities`: JSON values, checked by the agent API's serializer.
def _capability_facts(capabilities: Mapping[str, Any]) -> dict[str, object]:
    """The Machine fields a reported `capabilities` object sets. Its shape was validated by the
    agent API; the kinds are checked again here because they decide what may run."""
    kinds = list(capabilities.get("kinds") or [])
    unknown = sorted(set(kinds) - set(JOB_KINDS))
    if unknown:
        raise _invalid("capabilities.kinds", f"unknown job kind {unknown[0]!r}")
    return {
        "capabilities": dict(capabilities),
        "accepts_container": "container" in kinds,
        "accepts_process": "process" in kinds,
    }


def _gpus_claim(*, machine: Machine, uuids: list[str]) -> None:
    """Take over reported GPUs that are registered to another machine, when that machine is a
    former registration of this rig: one of the same provider (the rig registered again, after
    a reinstall or a lost state directory), or one its provider removed (the rig changed hands).
    The old machine's credential is revoked and its active leases end as `lost` at its last
    heartbeat; its GPU rows, with their history, move to this machine. A GPU of another
    provider's machine still in service raises Conflict `gpu_uuid_taken` and nothing is written.
    The caller holds this machine's row lock."""
    owners = (
        GPU.objects.filter(uuid__in=uuids)
        .exclude(machine_id=machine.pk)
        .values_list("uuid", "machine_id", "machine__provider_id", "machine__removed_at")
    )
    taken = sorted(
        uuid for uuid, _, provider_id, removed_at in owners if provider_id != machine.provider_id and removed_at is None
    )
    if taken:
        raise Conflict(
            f"GPU {taken[0]} is registered to a machine of another provider; nothing was recorded. That "
            "provider must remove the machine first.",
            code="gpu_uuid_taken",
            extra={"uuids": taken},
        )
    for old_id in sorted({machine_id for _, machine_id, _, _ in owners}):
        old = Machine.objects.get(pk=old_id)
        if old.credential_revoked_at is None:
            machine_credential_revoke(
                machine=old,
                actor=f"machine:{machine.pk}",
                reason=f"the rig registered again as machine {machine.pk}",
                leases_end_as="lost",
                leases_end_at=old.last_heartbeat_at,
            )
        moving = list(GPU.objects.filter(machine_id=old_id, uuid__in=uuids).order_by("pk"))
        used = set(GPU.objects.filter(machine_id=machine.pk).values_list("index", flat=True))
        parking = _GPU_PARKING_INDEX
        for gpu in moving:
            # Out of the way of this machine's (machine, index) uniqueness; the heartbeat then
            # writes the reported index.
            while parking in used:
                parking += 1
            used.add(parking)
            gpu.machine_id = machine.pk
            gpu.index = parking
        GPU.objects.bulk_update(moving, ["machine_id", "index"])
        logger.info("machine %s took over %d GPU(s) of machine %s", machine.pk, len(moving), old_id)


def _gpu_indexes_make_room(*, existing: dict[str, GPU], reported: dict[str, GpuReport]) -> None:
    """Move aside every stored GPU whose index must change or whose index another reported GPU
    now has, so that writing the reported indexes cannot trip the (machine, index) uniqueness."""
    reported_indexes = {g.index for g in reported.values()}
    used = {g.index for g in existing.values()}
    movers = [
        g
        for uuid, g in sorted(existing.items(), key=lambda item: item[1].index)
        if (reported[uuid].index != g.index if uuid in reported else g.index in reported_indexes)
    ]
    next_free = _GPU_PARKING_INDEX
    for gpu in movers:
        while next_free in used:
            next_free += 1
        GPU.objects.filter(pk=gpu.pk).update(index=next_free)
        used.add(next_free)
        gpu.index = next_free


# A machine's predicted idle time (its running jobs are told it at every heartbeat) is computed
# off the heartbeat for every machine running a lease, after each fold of the forecasts it reads
# (running_predictions_refresh, from the fold-idle-stretches task every 300 s), and kept in Redis,
# where the steady heartbeat reads it (providers.heartbeat_steady): such a machine takes the full
# heartbeat no more often than an idle one. A full heartbeat that finds none stored (no Redis, a
# lease started since the fold, a fold late by more than an interval) computes the machine's
# own (three queries), cached until the end of the machine's interval; a heartbeat in which one
# of its GPUs' idle stretches began or ended drops both (_predicted_idle_forget). Each machine's
# intervals turn at an instant of its own (predicted_idle_due), so that machines whose
# predictions fall due together (the leases of one matching cycle) do not all take the full
# heartbeat at once.
PREDICTED_IDLE_CACHE_S = 300


def predicted_idle_due(*, machine_id: int, computed_at: float) -> float:
    """When a prediction of the machine computed at `computed_at` (Unix time) is due again: the
    end of the machine's PREDICTED_IDLE_CACHE_S interval it was computed in (each machine's
    intervals shifted by an offset of its own, as its telemetry sample intervals are); with the
    cache off, at once."""
    interval = PREDICTED_IDLE_CACHE_S
    if interval <= 0:
        return computed_at
    offset = heartbeat_steady.offset(machine_id, interval)
    return (math.floor((computed_at + offset) / interval) + 1) * interval - offset


def predicted_idle_cache_key(machine_id: int) -> str:
    """Where a full heartbeat caches the machine's own prediction (_predicted_idle)."""
    return f"gpgpu:predicted-idle:{machine_id}"


def _predicted_idle(*, machine_id: int, now: datetime) -> heartbeat_steady.Prediction:
    """idle_history.machine_predicted_idle_s as of when it was computed: the stored one
    (running_predictions_refresh) while it is not due, else the machine's own, cached until the
    end of the machine's current PREDICTED_IDLE_CACHE_S interval (0: computed each time)."""
    at = now.timestamp()
    if PREDICTED_IDLE_CACHE_S <= 0:
        return heartbeat_steady.Prediction(idle_history.machine_predicted_idle_s(machine_id=machine_id, now=at), at, at)
    stored = heartbeat_steady.prediction(machine_id, now=at)
    if stored is not None:
        return stored
    key = predicted_idle_cache_key(machine_id)
    cached = cache.get(key)
    if isinstance(cached, heartbeat_steady.Prediction) and at < cached.due:
        return cached
    due = predicted_idle_due(machine_id=machine_id, computed_at=at)
    seconds = idle_history.machine_predicted_idle_s(machine_id=machine_id, now=at)
    computed = heartbeat_steady.Prediction(seconds, at, due)
    cache.set(key, computed, max(1, math.ceil(due - at)))
    return computed


def _predicted_idle_forget(*, machine_id: int) -> None:
    """Drop the machine's cached and stored predictions: they were made for an idle stretch that
    is over, or before a younger one began (its next heartbeat that needs one computes it)."""
    cache.delete(predicted_idle_cache_key(machine_id))
    heartbeat_steady.prediction_forget(machine_id)


def running_predictions_refresh(*, now: datetime | None = None) -> int:
    """Compute the predicted idle time of every machine with a leased GPU, in a few queries for
    all, and store each where heartbeats read it (heartbeat_steady.predictions_store), due at the
    end of the machine's next PREDICTED_IDLE_CACHE_S interval: the next refresh comes before.
    Returns how many were stored: none without the steady path (no Redis: each full heartbeat
    computes its own) or with the cache off, nor when Redis fails (logged)."""
    if PREDICTED_IDLE_CACHE_S <= 0 or not heartbeat_steady.enabled():
        return 0
    at = (now or timezone.now()).timestamp()
    machine_ids = GPU.objects.filter(state=GPU.State.LEASED).order_by().values_list("machine_id", flat=True).distinct()
    predicted = idle_history.machines_predicted_idle_s(machine_ids=machine_ids, now=at)
    predictions = {
        machine_id: heartbeat_steady.Prediction(
            seconds, at, predicted_idle_due(machine_id=machine_id, computed_at=at) + PREDICTED_IDLE_CACHE_S
        )
        for machine_id, seconds in predicted.items()
    }
    try:
        return heartbeat_steady.predictions_store(predictions, now=at)
    except heartbeat_steady.REDIS_ERRORS:
        logger.warning("could not store %d machines' predicted idle times", len(predictions), exc_info=True)
        return 0


def predicted_idle_countdown(predicted: int | None, computed_at: float, *, now: float) -> int | None:
    """A prediction computed at `computed_at` (Unix time) as the reply at `now` says it: the
    seconds left of it, none below 0."""
    if predicted is None:
        return None
    return max(0, int(predicted - (now - computed_at)))


def _heartbeat_reply(
    *, machine_id: int, report: HeartbeatReport, kinds: frozenset[str], may_have_assigned: bool, now: datetime
) -> HeartbeatReply:
    if starting := {lr.lease_id for lr in report.leases if lr.state == "starting"}:
        machine_leases().starting_reported(machine_id=machine_id, lease_ids=starting)
    start, stop = machine_leases().heartbeat_orders(
        machine_id=machine_id,
        listed={lr.lease_id for lr in report.leases},
        kinds=kinds,
        may_have_assigned=may_have_assigned,
    )
    basis = None
    if report.leases or start:  # only the jobs running here read it: nothing for an idle machine
        basis = _predicted_idle(machine_id=machine_id, now=now)
    return HeartbeatReply(
        heartbeat_interval_s=settings.GPGPU["HEARTBEAT_INTERVAL_S"],
        server_time=now,
        start=start,
        stop=stop,
        lease_fence_s=settings.GPGPU["LEASE_FENCE_S"],
        predicted_idle_s=predicted_idle_countdown(basis.seconds, basis.at, now=now.timestamp()) if basis else None,
        predicted_basis=basis,
    )


def machine_orders_changed(*, machine_id: int) -> None:
    """The machine's next heartbeat reply has an order its last one did not (one of its leases
    ended or was asked to stop): that heartbeat is a full one (providers.heartbeat_steady). For
    jobs.services, in the transaction that makes the change, before it rings the doorbell."""
    heartbeat_steady.forget([machine_id])


@dataclass(frozen=True)
class LivenessSweep:
    """What one liveness sweep did and saw."""

    offline: int  # machines that went offline
    leases_lost: int  # leases ended as lost
    blind: bool  # the marketplace could not see its fleet (its own outage): nothing was evicted
    disrupted: bool  # a large share of the fleet went silent at once: no lease was ended
    held: int  # machines silent past LEASE_LOST_AFTER_S whose leases the disruption kept

    def as_dict(self) -> dict[str, int | bool]:
        return {
            "offline": self.offline,
            "leases_lost": self.leases_lost,
            "blind": self.blind,
            "disrupted": self.disrupted,
            "held": self.held,
        }


def machines_liveness_sweep(*, now: datetime | None = None) -> LivenessSweep:
    """Take silent machines offline and, much later, end their leases as lost, without blaming
    the machines for an outage of the marketplace itself.

    - A machine is silent for the time since the later of its last heartbeat and the end of the
      marketplace's own blindness (`LivenessState.blind_until`). The marketplace was blind when
      this sweep had not run for 3 heartbeat intervals (its database, worker or beat was down),
      or while no machine at all has heartbeated for 2 intervals (its web tier or its network
      was down: one agent cannot tell, a whole fleet can), for at most
      LIVENESS_DISRUPTION_HOLD_S (past that, the fleet really is gone).
    - Silent for HEARTBEAT_INTERVAL_S * HEARTBEAT_GRACE_BEATS: the machine goes offline and its
      GPUs show offline (nothing new is placed there); its leases keep running.
    - Silent for LEASE_LOST_AFTER_S (after the agents' LEASE_FENCE_S, when a cut-off agent has
      stopped its workloads): its leases end as `lost` at its last heartbeat, and interruptible
      jobs go back to the queue. A job is thus never run by two machines at once.
    - When at least LIVENESS_DISRUPTION_MIN_MACHINES machines and LIVENESS_DISRUPTION_PCT of
      the machines with a recent heartbeat go silent at once, no lease ends (a disrupted zone, as
      Kubernetes' node controller does) for at most LIVENESS_DISRUPTION_HOLD_S.

    - Steady heartbeats' times are written to the rows first (providers.heartbeat_steady.flush);
      when they cannot be read (Redis unreachable) the marketplace is blind for this sweep.

    Each machine moves in its own transaction, with a conditional UPDATE that re-checks its last
    heartbeat, so a heartbeat landing while the sweep runs keeps its machine.
    """
    now = now or timezone.now()
    cfg = settings.GPGPU
    interval = cfg["HEARTBEAT_INTERVAL_S"]
    grace = timedelta(seconds=interval * cfg["HEARTBEAT_GRACE_BEATS"])
    lost_after = timedelta(seconds=cfg["LEASE_LOST_AFTER_S"])
    hold = timedelta(seconds=cfg["LIVENESS_DISRUPTION_HOLD_S"])
    few = cfg["LIVENESS_DISRUPTION_MIN_MACHINES"]
    in_service = Machine.objects.filter(removed_at__isnull=True).exclude(status=Machine.Status.SUSPENDED)
    grace_cutoff, lost_cutoff = now - grace, now - lost_after
    silent = Q(last_heartbeat_at__lt=grace_cutoff) | Q(last_heartbeat_at__isnull=True)
    # Steady heartbeats' times (providers.heartbeat_steady) into the rows first; unreadable, the
    # sweep cannot tell who is silent and blames no one.
    unseen = heartbeat_steady.flush() is None

    with transaction.atomic():
        state, _ = LivenessState.objects.select_for_update().get_or_create(pk=1)
        # The sweep itself did not run: the database, the worker or beat was down.
        blind = state.last_sweep_at is not None and now - state.last_sweep_at > timedelta(seconds=3 * interval)
        # No heartbeat from a whole fleet: the web tier or the network in front of it is down.
        online = in_service.filter(status=Machine.Status.ONLINE).count()
        newest = in_service.aggregate(newest=Max("last_heartbeat_at"))["newest"]
        quiet = online >= few and newest is not None and now - newest > timedelta(seconds=2 * interval)
        state.quiet_since = (state.quiet_since or now) if quiet else None
        if quiet and now - (state.quiet_since or now) <= hold:
            blind = True
        if blind or unseen:
            state.blind_until = now
        state.last_sweep_at = now
        since = state.blind_until
        # A share of the recently alive fleet silent at once: a disrupted zone (alive as of the
        # disruption's start, so that the zone still counts while it is held).
        alive = in_service.filter(last_heartbeat_at__gte=(state.disrupted_since or now) - lost_after - grace)
        silent_now = alive.filter(silent).count()
        disrupted = silent_now >= few and silent_now * 100 >= cfg["LIVENESS_DISRUPTION_PCT"] * alive.count()
        state.disrupted_since = (state.disrupted_since or now) if disrupted else None
        holding = disrupted and now - (state.disrupted_since or now) <= hold
        state.save()

    if since is not None and now - since <= grace:
        logger.warning("liveness: the marketplace could not see its fleet until %s; no machine is blamed", since)
        return LivenessSweep(offline=0, leases_lost=0, blind=True, disrupted=holding, held=0)

    offline = 0
    candidates = in_service.filter(silent, status=Machine.Status.ONLINE).order_by("pk").values_list("pk", flat=True)
    for machine_id in list(candidates):
        with transaction.atomic():
            moved = Machine.objects.filter(silent, pk=machine_id, status=Machine.Status.ONLINE).update(
                status=Machine.Status.OFFLINE
            )
            if moved:
                _machine_gpus_offline(machine_id=machine_id)
        if moved:
            offline += 1
            logger.info("machine %s went silent: offline (its leases keep running for now)", machine_id)

    if since is not None and now - since <= lost_after:
        # Within LEASE_LOST_AFTER_S of the marketplace's own outage nobody is declared lost.
        return LivenessSweep(offline=offline, leases_lost=0, blind=False, disrupted=holding, held=0)
    gone = Q(last_heartbeat_at__lt=lost_cutoff) | Q(last_heartbeat_at__isnull=True)
    gone_ids = list(in_service.filter(gone, status=Machine.Status.OFFLINE).values_list("pk", flat=True))
    with_leases = sorted(machine_leases().machines_with_active_leases(machine_ids=gone_ids))
    if holding:
        if with_leases:
            logger.warning(
                "liveness: %d machines went silent at once (a disrupted zone); the leases of %d are kept for now",
                silent_now,
                len(with_leases),
            )
        return LivenessSweep(offline=offline, leases_lost=0, blind=False, disrupted=True, held=len(with_leases))
    lost = 0
    for machine_id in with_leases:
        with transaction.atomic():
            machine = _machine_lock(machine_id=machine_id)
            last = machine.last_heartbeat_at if machine is not None else None
            back = machine is None or machine.status != Machine.Status.OFFLINE
            if back or (last is not None and last >= lost_cutoff):
                continue  # it came back meanwhile
            # Leases first, then GPUs: the lock order of the module docstring.
            ended = machine_leases().end_for_machine(
                machine_id=machine_id,
                reason="lost",
                actor="liveness",
                detail=f"no heartbeat for over {cfg['LEASE_LOST_AFTER_S']} seconds",
                at=last,
            )
        lost += ended
        logger.info("machine %s silent for over %s s: %d lease(s) lost", machine_id, cfg["LEASE_LOST_AFTER_S"], ended)
    return LivenessSweep(offline=offline, leases_lost=lost, blind=False, disrupted=disrupted, held=0)
