"""Writes for the fleet: providers, registration tokens, machines, GPUs, availability."""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from providers.errors import Conflict
from providers.models import GPU, Machine, Provider, RegistrationToken

logger = logging.getLogger(__name__)

REGISTRATION_TOKEN_PREFIX = "gpreg_"
MACHINE_CREDENTIAL_PREFIX = "gpm_"


def secret_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def provider_create(*, user, display_name: str, payout_address: str = "") -> Provider:  # type: ignore[no-untyped-def]
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
    from jobs.services import leases_end_for_machine

    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(status=Machine.Status.SUSPENDED, suspended_reason=reason[:255])
        leases_end_for_machine(machine_id=machine.pk, reason="machine_suspended", actor=actor, detail=reason)
        GPU.objects.filter(machine_id=machine.pk).update(state=GPU.State.OFFLINE, idle_since=None)
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
