"""The fleet: providers (GPU owners), their machines and GPUs, when they may be rented, and
what the GPUs reported over time."""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

# Prices are per GPU-hour (core.prices), re-exported here for the apps' models and services.
from core.prices import PRICE_DECIMALS, PRICE_MAX_DIGITS

eth_address_validator = RegexValidator(
    r"^0x[0-9a-fA-F]{40}$", "Enter an Ethereum address: 0x followed by 40 hex digits."
)


def region_key(region: str) -> str:
    """A region as it is stored and compared: a machine's and a job's are matched exactly, and
    "EU-West " names the same region as "eu-west"."""
    return region.strip().lower()


class JobKind(models.TextChoices):
    """The kinds of renter code a machine may accept (its capabilities); jobs.models.Job.Kind."""

    CONTAINER = "container"
    PROCESS = "process"


class Provider(models.Model):
    """A GPU owner's account."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="provider")
    display_name = models.CharField(max_length=100)
    payout_address = models.CharField(max_length=42, blank=True, validators=[eth_address_validator])
    # The floor for any of this provider's GPUs without one of its own, per GPU-hour.
    default_price_floor = models.DecimalField(
        max_digits=PRICE_MAX_DIGITS,
        decimal_places=PRICE_DECIMALS,
        default=Decimal("0.20"),
        validators=[MinValueValidator(Decimal("0"))],
    )
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.display_name


class RegistrationToken(models.Model):
    """A one-time token a provider gives an agent to register a machine."""

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="registration_tokens")
    label = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=12)
    token_digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    machine = models.OneToOneField(
        "Machine", null=True, blank=True, on_delete=models.SET_NULL, related_name="registration_token"
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.provider})"


class Machine(models.Model):
    """A host running the provider agent."""

    class Status(models.TextChoices):
        ONLINE = "online"
        OFFLINE = "offline"
        SUSPENDED = "suspended"

    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="machines")
    hostname = models.CharField(max_length=255)
    # The agent's credential: only its digest is stored.
    credential_digest = models.CharField(max_length=64, unique=True)
    # The agent's signing address (for usage reports; see the agent and billing issues).
    signing_address = models.CharField(max_length=42, blank=True, validators=[eth_address_validator])
    agent_version = models.CharField(max_length=50, blank=True)
    driver_version = models.CharField(max_length=50, blank=True)
    cuda_version = models.CharField(max_length=50, blank=True)
    cpu_cores = models.PositiveIntegerField(null=True, blank=True)
    ram_mb = models.PositiveBigIntegerField(null=True, blank=True)
    disk_gb = models.PositiveBigIntegerField(null=True, blank=True)
    region = models.CharField(max_length=64, blank=True, db_index=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OFFLINE, db_index=True)
    suspended_reason = models.CharField(max_length=255, blank=True)
    # No index: every heartbeat (or the flush of the steady ones' times) moves it, and with an
    # index no such UPDATE could be HOT (written on the row's page, no index touched; the table's
    # fillfactor keeps the room, migration 0010). The liveness sweep reads it for the whole fleet.
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    # What job kinds the machine accepts and how it isolates them, as its agent last reported
    # (the heartbeat's validated `capabilities`; null until it first reports them). The two
    # booleans are what the matcher filters on. A machine that never reported accepts
    # containers only: process jobs need the provider's explicit opt-in.
    capabilities = models.JSONField(null=True, blank=True)
    accepts_container = models.BooleanField(default=True)
    accepts_process = models.BooleanField(default=False)
    capabilities_reported_at = models.DateTimeField(null=True, blank=True)
    # Set when its credential was revoked: it can no longer authenticate and stays offline.
    credential_revoked_at = models.DateTimeField(null=True, blank=True)
    # Set when its provider removed it (machine_remove): out of the fleet for good.
    removed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.hostname} (#{self.pk})"

    def throttle_key(self) -> tuple[str, str]:
        """The rate limit's scope and key for a request this machine's credential authenticated
        (core.throttling): per credential (its digest: a rotated credential, or a row id handed
        out again with a new credential, starts afresh), so that a steady heartbeat
        (providers.heartbeat_steady) knows it before it knows the machine."""
        return self.throttle_key_of(self.credential_digest)

    @staticmethod
    def throttle_key_of(credential_digest: str) -> tuple[str, str]:
        """throttle_key of the machine whose credential has this digest."""
        return "machine", credential_digest[:32]

    @property
    def accepted_kinds(self) -> list[str]:
        return [kind for kind, on in (("container", self.accepts_container), ("process", self.accepts_process)) if on]


class MachineCredentialRevocation(models.Model):
    """A machine credential that no longer authenticates (only its digest, like the live one):
    replaced by a newer one (`rotated`) or revoked outright. A request that presents it is told
    which, and when, rather than "unknown credential". These rows are the credential's audit
    trail: who did it, when and why."""

    class Kind(models.TextChoices):
        ROTATED = "rotated"
        REVOKED = "revoked"

    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="credential_revocations")
    digest = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    reason = models.CharField(max_length=255, blank=True)
    # "provider:3", "machine:7", "operator:1"
    actor = models.CharField(max_length=64)
    revoked_at = models.DateTimeField()

    class Meta:
        ordering = ["-revoked_at", "-id"]

    def __str__(self) -> str:
        return f"credential of machine {self.machine_id} {self.kind} {self.revoked_at:%Y-%m-%d %H:%M}"


class GPU(models.Model):
    class State(models.TextChoices):
        OFFLINE = "offline"
        OWNER_BUSY = "owner_busy"
        IDLE = "idle"
        LEASED = "leased"

    # No index of its own: the unique (machine, index) serves its lookups.
    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="gpus", db_index=False)
    uuid = models.CharField(max_length=96, unique=True)
    index = models.PositiveSmallIntegerField()
    model = models.CharField(max_length=100, db_index=True)
    vram_mb = models.PositiveIntegerField()
    # No index: leases, their ends and the owners' comings and goings move it all the time, and
    # with an index no such UPDATE could be HOT (the new version written on the row's page, no
    # index touched: the table's fillfactor keeps the room, migration 0010); the latest
    # telemetry's UPDATE of every reporting GPU is HOT too. GPUs are read by state with their
    # machine (its unique index) or across the fleet, a scan either way.
    state = models.CharField(max_length=16, choices=State.choices, default=State.OFFLINE)
    # When the agent last saw this GPU become idle (for how long it has been free).
    idle_since = models.DateTimeField(null=True, blank=True)
    # Per GPU-hour; null means the provider's default floor.
    price_floor = models.DecimalField(
        max_digits=PRICE_MAX_DIGITS,
        decimal_places=PRICE_DECIMALS,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal("0"))],
    )
    # The latest telemetry, for listings without a join on the history.
    utilization_pct = models.FloatField(null=True, blank=True)
    memory_used_mb = models.PositiveIntegerField(null=True, blank=True)
    temperature_c = models.FloatField(null=True, blank=True)
    power_w = models.FloatField(null=True, blank=True)
    last_telemetry_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "GPU"
        verbose_name_plural = "GPUs"
        ordering = ["machine_id", "index"]
        constraints = [
            models.UniqueConstraint(fields=["machine", "index"], name="gpu_unique_index_per_machine"),
        ]

    def __str__(self) -> str:
        return f"{self.model} #{self.index} on {self.machine_id}"


class AvailabilityWindow(models.Model):
    """A recurring weekly window in the provider's own time zone, e.g. Mon–Fri 20:00–08:00
    Europe/Paris. A window whose end is at or before its start runs past midnight into the next
    day. `days` is a bitmask, Monday = bit 0 … Sunday = bit 6, of the days the window *starts*.

    A machine with no windows (its own or its provider's) is available at any time it is idle.
    """

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="windows")
    # Null: applies to every machine of the provider.
    machine = models.ForeignKey(Machine, null=True, blank=True, on_delete=models.CASCADE, related_name="windows")
    days = models.PositiveSmallIntegerField(validators=[MinValueValidator(1), MaxValueValidator(127)])
    start_time = models.TimeField()
    end_time = models.TimeField()
    timezone = models.CharField(max_length=64, default="UTC")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"days={self.days:07b} {self.start_time}-{self.end_time} {self.timezone}"


class Blackout(models.Model):
    """A one-off period when the provider's machine (or all of them) must not be rented."""

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="blackouts")
    machine = models.ForeignKey(Machine, null=True, blank=True, on_delete=models.CASCADE, related_name="blackouts")
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    reason = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["starts_at"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(ends_at__gt=models.F("starts_at")), name="blackout_ends_after_start"
            ),
        ]

    def __str__(self) -> str:
        return f"blackout {self.starts_at:%Y-%m-%d %H:%M}–{self.ends_at:%Y-%m-%d %H:%M}"


class TelemetrySample(models.Model):
    """Raw telemetry, at most one row per GPU per TELEMETRY_SAMPLE_INTERVAL_S, pruned after
    TELEMETRY_RAW_RETENTION_H hours once rolled up."""

    gpu = models.ForeignKey(GPU, on_delete=models.CASCADE, related_name="samples")
    at = models.DateTimeField()
    utilization_pct = models.FloatField(null=True)
    memory_used_mb = models.PositiveIntegerField(null=True)
    temperature_c = models.FloatField(null=True)
    power_w = models.FloatField(null=True)
    state = models.CharField(max_length=16, choices=GPU.State.choices)

    class Meta:
        indexes = [
            models.Index(fields=["gpu", "at"], name="telemetry_gpu_at"),
            models.Index(fields=["at"], name="telemetry_at"),
        ]

    def __str__(self) -> str:
        return f"GPU {self.gpu_id} at {self.at:%Y-%m-%d %H:%M}"


class TelemetryRollup(models.Model):
    """One GPU's telemetry over one hour: what charts of a fleet's history read."""

    gpu = models.ForeignKey(GPU, on_delete=models.CASCADE, related_name="rollups")
    hour = models.DateTimeField()
    samples = models.PositiveIntegerField()
    utilization_avg = models.FloatField(null=True)
    utilization_max = models.FloatField(null=True)
    memory_used_max_mb = models.PositiveIntegerField(null=True)
    temperature_max_c = models.FloatField(null=True)
    power_avg_w = models.FloatField(null=True)
    # Share of the hour's samples in each state, 0..1.
    idle_ratio = models.FloatField(default=0)
    leased_ratio = models.FloatField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["gpu", "hour"], name="rollup_unique_gpu_hour")]
        indexes = [models.Index(fields=["hour"], name="rollup_hour")]

    def __str__(self) -> str:
        return f"GPU {self.gpu_id} hour {self.hour:%Y-%m-%d %H:00}"


class LivenessState(models.Model):
    """What the liveness sweep (providers.services.machines_liveness_sweep) remembers between
    runs, one row: when it last ran, until when the marketplace itself could not see its fleet
    (its database, worker or beat down, or no heartbeat reaching it at all), and since when a
    large share of the fleet has been silent at once. Silence is counted from the later of a
    machine's last heartbeat and `blind_until`, so an outage of the marketplace is not blamed on
    the machines."""

    last_sweep_at = models.DateTimeField(null=True, blank=True)
    blind_until = models.DateTimeField(null=True, blank=True)
    # The first sweep of the current stretch with no heartbeat from anyone (None: heartbeats flow).
    quiet_since = models.DateTimeField(null=True, blank=True)
    # The first sweep of the current disruption (None: no disruption).
    disrupted_since = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"liveness (last sweep {self.last_sweep_at})"


class IdleStretch(models.Model):
    """One GPU's stretch of its owner's absence (idle or leased, providers.idle_history) that the
    marketplace saw end: the owner came back (`ended`) or what we know of it stopped (the GPU
    went offline, its machine went silent or its agent started the stretch afresh: censored).
    Written by the heartbeat, in one bulk insert; folded into the machine's MachineIdleProfile
    and the FleetIdleProfile by providers.tasks.fold_idle_stretches, then deleted."""

    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="+")
    # Not indexed: rows live minutes (folded, then deleted), and a GPU is deleted only with its machine.
    gpu = models.ForeignKey(GPU, on_delete=models.CASCADE, related_name="+", db_index=False)
    began_at = models.DateTimeField()
    length_s = models.FloatField()
    ended = models.BooleanField()
    # Counted in the fleet prior already; the machine's own profile takes it next, then deletes it.
    in_fleet = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"GPU {self.gpu_id} idle {self.length_s:.0f} s from {self.began_at:%Y-%m-%d %H:%M}"


class MachineIdleProfile(models.Model):
    """What a machine's idle stretches were like: providers.forecasting.StretchCounts as JSON
    (bounded: at most 168 hours × 22 bins × 2 numbers), decayed to `decayed_at` with a half-life
    of IDLE_FORECAST_HALF_LIFE_D days, and its latest stretches (`analogs`). Deleted with the
    machine, and once its provider removed it."""

    machine = models.OneToOneField(Machine, on_delete=models.CASCADE, primary_key=True, related_name="idle_profile")
    counts = models.JSONField(default=dict)
    decayed_at = models.DateTimeField()
    # Stretches folded in so far, not decayed (for the console).
    stretches = models.PositiveIntegerField(default=0)
    # providers.forecasting.Analogs as JSON: its latest ended stretches (at most
    # ANALOG_MAX_STRETCHES over ANALOG_KEEP_S) and their calibration, for reading the days before.
    analogs = models.JSONField(default=dict)

    def __str__(self) -> str:
        return f"idle profile of machine {self.machine_id}"


class FleetIdleProfile(models.Model):
    """The whole fleet's idle stretches, one row (pk 1): the prior of every machine's forecast,
    and the forecast of a machine with no history. As MachineIdleProfile."""

    counts = models.JSONField(default=dict)
    decayed_at = models.DateTimeField()
    stretches = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return "idle profile of the fleet"
