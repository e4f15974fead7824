"""The wire contract between the agent and the marketplace (docs/agent-api.md), shared by both.

Pure Python over the standard library and eth-account: the marketplace imports this module to
verify the agent's signed usage reports, so it must stay free of the agent's other modules.

Signed usage reports are EIP-712 typed data:

    domain  {name: "GPGPU Usage", version: "1", chainId: <configurable, default 31337>}
    UsageReport(uint256 leaseId,string reportId,uint64 periodStart,uint64 periodEnd,
                uint256 gpuMilliSeconds,uint32 meanUtilizationBp,uint32 peakMemoryMb)

Every number in the struct is derived from the JSON body by one exact rule (UsageStruct.from_wire),
and the rule refuses a body it cannot map exactly, so the struct signed is the report stored:

- periodStart / periodEnd: the period's times as unix seconds; a signed report's times are whole
  seconds (no fraction).
- gpuMilliSeconds: `gpu_seconds` (a decimal string, at most 3 places) × 1000.
- meanUtilizationBp: `mean_utilization_pct` × 100 (basis points of the percentage, 0–10000), so
  the percentage has at most 2 decimal places; `null` is NOT_MEASURED.
- peakMemoryMb: `peak_memory_mb`; `null` is NOT_MEASURED.

The agent builds reports with UsageStruct.measure, which rounds its measurements so they map
exactly: gpu-seconds rounded DOWN to the millisecond, utilisation to the nearest basis point, the
period widened to whole seconds (start floored, end ceiled) so the GPU-seconds never exceed the
period times the GPUs.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TypedDict

from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_keys.exceptions import BadSignature

# eth_keys raises this one too: eth_keys.exceptions.ValidationError is eth_utils' class.
from eth_utils.exceptions import ValidationError

# --- HTTP -------------------------------------------------------------------------------------

API_PREFIX = "/api/agent/v1/"
AUTHORIZATION_HEADER = "Authorization"
# `Authorization: Machine <credential>` (the credential `register` returned).
AUTH_SCHEME = "Machine"
RETRY_AFTER_HEADER = "Retry-After"

# --- lease events -----------------------------------------------------------------------------

EVENT_STARTED = "started"
EVENT_EXITED = "exited"
EVENT_PREEMPTED_BY_OWNER = "preempted_by_owner"
EVENT_FAILED_TO_START = "failed_to_start"
EVENT_TYPES = (EVENT_STARTED, EVENT_EXITED, EVENT_PREEMPTED_BY_OWNER, EVENT_FAILED_TO_START)

# Error codes the marketplace answers with that the agent acts on.
CODE_INVALID_TRANSITION = "invalid_transition"
CODE_USAGE_SIGNATURE_INVALID = "usage_signature_invalid"
CODE_MACHINE_CREDENTIAL_INVALID = "machine_credential_invalid"
CODE_MACHINE_SUSPENDED = "machine_suspended"

# --- heartbeat orders -------------------------------------------------------------------------

# A stop order's flag: true when the job's checkpoint directory is to be packed and uploaded
# before the exit is reported although the job will not run again (its renter cancelled it and
# asked to keep its checkpoint). Absent or false: the stop reason decides. An agent that does not
# know the flag still stops the lease, and uploads nothing.
STOP_SAVE_CHECKPOINT = "save_checkpoint"

# --- what a container job may ask for ---------------------------------------------------------

# The container runner refuses a lease whose job breaks these (failed_to_start), and the
# marketplace refuses such a job when it is submitted (jobs.services), rather than placing it on
# providers' GPUs again and again to have it refused.
# An image reference: repository, optional tag, optional digest. It may not start with "-" (it
# would be read as an option).
IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,499}$")
# The NVIDIA container runtime's feature flags that, "enabled", add the host's InfiniBand,
# NVSwitch, GPUDirect Storage or GDRCopy device nodes to a container: the agent sets each to
# "disabled", over an image's own ENV.
NVIDIA_FEATURES_OFF = ("NVIDIA_MOFED", "NVIDIA_NVSWITCH", "NVIDIA_GDS", "NVIDIA_GDRCOPY")
# Registry hosts an image may not name: the engine pulls from the owner's machine, outside the
# rentals' firewall, so a registry on the owner's own network (its router, a service on
# localhost, a cloud's metadata address) would let a job's image reach it, and the pull's error
# would tell the renter what answered there.
_LOCAL_NAMES = ("localhost", "metadata")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_LOCAL_SUFFIXES = (".localhost", ".local", ".localdomain", ".internal", ".lan", ".home.arpa")


def image_registry_refusal(image: str) -> str | None:
    """Why the registry an image reference names may not be pulled from (an address of a private,
    loopback or link-local network, or a name of the local network), or None. The registry is the
    reference's first part when it has a '.', a ':' or an upper-case letter, or is `localhost`
    (Docker's and Podman's rule, distribution/reference's splitDockerDomain: `LOCALHOST/x` pulls
    from localhost)."""
    first, slash, _ = image.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return None  # Docker Hub
    host = first.rsplit(":", 1)[0] if first.count(":") == 1 else first
    host = host.lower().rstrip(".")
    if host in _LOCAL_NAMES or host.endswith(_LOCAL_SUFFIXES):
        return f"the registry {host!r} is a name of the local network"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if "." not in host:  # one label: the local network's search domain resolves it
            return f"the registry {host!r} is a name of the local network"
        if all(_NUMERIC_LABEL.match(label) for label in host.split(".")):
            # 127.1, 0x7f.0.0.1: not a name, an address the resolver reads in inet_aton's forms
            return f"the registry {host!r} is an address written in a numeric form"
        return None
    if not address.is_global:
        return f"the registry {host!r} is an address of a private, loopback or link-local network"
    return None


# Variables that would ask the NVIDIA container runtime for more than the leased GPUs.
REFUSED_ENV = ("NVIDIA_MIG_CONFIG_DEVICES", "NVIDIA_MIG_MONITOR_DEVICES", "NVIDIA_IMEX_CHANNELS", *NVIDIA_FEATURES_OFF)

# --- signed usage reports ---------------------------------------------------------------------

DOMAIN_NAME = "GPGPU Usage"
DOMAIN_VERSION = "1"
# The local development chain's id (Hardhat, Anvil); deployments configure theirs.
DEFAULT_CHAIN_ID = 31337

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
UINT256_MAX = 2**256 - 1
# meanUtilizationBp / peakMemoryMb when the agent could not measure them (JSON null).
NOT_MEASURED = UINT32_MAX
MAX_UTILIZATION_BP = 10_000
MAX_REPORT_ID_CHARS = 128

USAGE_REPORT_FIELDS: tuple[tuple[str, str], ...] = (
    ("leaseId", "uint256"),
    ("reportId", "string"),
    ("periodStart", "uint64"),
    ("periodEnd", "uint64"),
    ("gpuMilliSeconds", "uint256"),
    ("meanUtilizationBp", "uint32"),
    ("peakMemoryMb", "uint32"),
)
# The EIP-712 encodeType string, for verifiers written in other languages (e.g. Solidity).
USAGE_REPORT_TYPE = "UsageReport(" + ",".join(f"{t} {n}" for n, t in USAGE_REPORT_FIELDS) + ")"

_DOMAIN_FIELDS = (("name", "string"), ("version", "string"), ("chainId", "uint256"))
_MS = Decimal(1000)
_HUNDRED = Decimal(100)


class UnsignableReport(ValueError):
    """A usage report whose values the signed struct cannot carry exactly (a fraction of a
    second, a fourth decimal place…). The message says which value and why."""


def _unix_seconds(value: datetime, name: str) -> int:
    if value.tzinfo is None:
        raise UnsignableReport(f"{name} has no time zone; send times with a zone (UTC recommended).")
    if value.microsecond:
        raise UnsignableReport(f"{name} has a fraction of a second; a signed report's times are whole seconds.")
    seconds = int(value.timestamp())
    if not 0 <= seconds <= UINT64_MAX:
        raise UnsignableReport(f"{name} is before 1970 or too far in the future.")
    return seconds


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class UsageWire(TypedDict):
    """The JSON body of `POST leases/{lease_id}/usage`, without `signature` (UsageStruct.to_wire)."""

    report_id: str
    period_start: str
    period_end: str
    gpu_seconds: str
    mean_utilization_pct: float | None
    peak_memory_mb: int | None


@dataclass(frozen=True, slots=True)
class UsageStruct:
    """The signed content of one usage report: exactly the EIP-712 UsageReport struct.

    None for mean_utilization_bp / peak_memory_mb means not measured (JSON null; NOT_MEASURED
    in the struct)."""

    lease_id: int
    report_id: str
    period_start: int  # unix seconds
    period_end: int  # unix seconds
    gpu_milliseconds: int
    mean_utilization_bp: int | None
    peak_memory_mb: int | None

    def __post_init__(self) -> None:
        if not 0 < self.lease_id <= UINT256_MAX:
            raise UnsignableReport("lease_id must be a positive integer.")
        if not self.report_id or len(self.report_id) > MAX_REPORT_ID_CHARS:
            raise UnsignableReport(f"report_id must be 1 to {MAX_REPORT_ID_CHARS} characters.")
        if not 0 <= self.period_start < self.period_end <= UINT64_MAX:
            raise UnsignableReport("period_end must be after period_start (unix seconds).")
        if not 0 <= self.gpu_milliseconds <= UINT256_MAX:
            raise UnsignableReport("gpu_milliseconds must be a non-negative integer.")
        if self.mean_utilization_bp is not None and not 0 <= self.mean_utilization_bp <= MAX_UTILIZATION_BP:
            raise UnsignableReport("mean_utilization_pct must be between 0 and 100.")
        if self.peak_memory_mb is not None and not 0 <= self.peak_memory_mb < NOT_MEASURED:
            raise UnsignableReport(f"peak_memory_mb must be between 0 and {NOT_MEASURED - 1}.")

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def measure(
        cls,
        *,
        lease_id: int,
        report_id: str,
        period_start: datetime,
        period_end: datetime,
        gpu_seconds: float | Decimal,
        mean_utilization_pct: float | None,
        peak_memory_mb: int | None,
        gpu_count: int | None = None,
    ) -> UsageStruct:
        """The agent's side: round measurements into a struct that maps exactly onto the wire.

        The period is widened to whole seconds (start floored, end ceiled); gpu-seconds are
        rounded down to the millisecond and, given gpu_count, capped at the period's length
        times the GPUs (the marketplace refuses more); utilisation is rounded to the nearest
        basis point and clamped to 0–100 %. Non-finite measurements count as not measured
        (utilisation, memory) or as zero (gpu-seconds)."""
        start = math.floor(period_start.timestamp())
        end = math.ceil(period_end.timestamp())
        if end <= start:
            end = start + 1
        seconds = Decimal(str(gpu_seconds)) if not isinstance(gpu_seconds, Decimal) else gpu_seconds
        if not seconds.is_finite() or seconds < 0:
            seconds = Decimal(0)
        gpu_ms = int((seconds * _MS).to_integral_value(rounding="ROUND_FLOOR"))
        if gpu_count is not None:
            gpu_ms = min(gpu_ms, (end - start) * gpu_count * 1000)
        bp: int | None = None
        if mean_utilization_pct is not None and math.isfinite(mean_utilization_pct):
            bp = min(MAX_UTILIZATION_BP, max(0, round(mean_utilization_pct * 100)))
        memory = peak_memory_mb if peak_memory_mb is not None and 0 <= peak_memory_mb < NOT_MEASURED else None
        return cls(
            lease_id=lease_id,
            report_id=report_id,
            period_start=start,
            period_end=end,
            gpu_milliseconds=gpu_ms,
            mean_utilization_bp=bp,
            peak_memory_mb=memory,
        )

    @classmethod
    def from_wire(
        cls,
        *,
        lease_id: int,
        report_id: str,
        period_start: datetime,
        period_end: datetime,
        gpu_seconds: Decimal | str,
        mean_utilization_pct: object,
        peak_memory_mb: object,
    ) -> UsageStruct:
        """The marketplace's side: the struct a report's (parsed) JSON fields stand for.
        `mean_utilization_pct` is a number or None, `peak_memory_mb` an integer or None; they
        are taken as parsed and checked here.

        Raises UnsignableReport when a value does not map exactly (see the module docstring):
        a signature over such a report cannot be checked against what would be stored."""
        try:
            seconds = Decimal(gpu_seconds)
        except (InvalidOperation, TypeError, ValueError):
            raise UnsignableReport("gpu_seconds is not a decimal number.") from None
        if not seconds.is_finite() or seconds < 0:
            raise UnsignableReport("gpu_seconds must be a non-negative decimal.")
        gpu_ms = seconds * _MS
        if gpu_ms != gpu_ms.to_integral_value():
            raise UnsignableReport("gpu_seconds has more than 3 decimal places.")
        bp: int | None = None
        if mean_utilization_pct is not None:
            if (
                isinstance(mean_utilization_pct, bool)
                or not isinstance(mean_utilization_pct, int | float)
                or not math.isfinite(mean_utilization_pct)
            ):
                raise UnsignableReport("mean_utilization_pct must be a finite number.")
            # repr() is the shortest text that reads back as the same float: the number the
            # agent wrote (bp / 100), not its binary approximation.
            scaled = Decimal(repr(float(mean_utilization_pct))) * _HUNDRED
            if scaled != scaled.to_integral_value():
                raise UnsignableReport("mean_utilization_pct has more than 2 decimal places.")
            bp = int(scaled)
        if peak_memory_mb is not None and (isinstance(peak_memory_mb, bool) or not isinstance(peak_memory_mb, int)):
            raise UnsignableReport("peak_memory_mb must be an integer.")
        return cls(
            lease_id=lease_id,
            report_id=report_id,
            period_start=_unix_seconds(period_start, "period_start"),
            period_end=_unix_seconds(period_end, "period_end"),
            gpu_milliseconds=int(gpu_ms),
            mean_utilization_bp=bp,
            peak_memory_mb=peak_memory_mb,
        )

    # -- encoding ------------------------------------------------------------------------------

    def to_wire(self) -> UsageWire:
        """The JSON body of `POST leases/{lease_id}/usage`, without `signature`."""
        return {
            "report_id": self.report_id,
            "period_start": _iso(self.period_start),
            "period_end": _iso(self.period_end),
            "gpu_seconds": str(Decimal(self.gpu_milliseconds).scaleb(-3)),
            "mean_utilization_pct": None if self.mean_utilization_bp is None else self.mean_utilization_bp / 100,
            "peak_memory_mb": self.peak_memory_mb,
        }

    def message(self) -> dict[str, int | str]:
        """The EIP-712 message (struct values, camelCase)."""
        return {
            "leaseId": self.lease_id,
            "reportId": self.report_id,
            "periodStart": self.period_start,
            "periodEnd": self.period_end,
            "gpuMilliSeconds": self.gpu_milliseconds,
            "meanUtilizationBp": NOT_MEASURED if self.mean_utilization_bp is None else self.mean_utilization_bp,
            "peakMemoryMb": NOT_MEASURED if self.peak_memory_mb is None else self.peak_memory_mb,
        }

    def typed_data(self, *, chain_id: int = DEFAULT_CHAIN_ID) -> dict[str, object]:
        """The full EIP-712 typed data (domain, types, primary type, message)."""
        return {
            "types": {
                "EIP712Domain": [{"name": n, "type": t} for n, t in _DOMAIN_FIELDS],
                "UsageReport": [{"name": n, "type": t} for n, t in USAGE_REPORT_FIELDS],
            },
            "primaryType": "UsageReport",
            "domain": usage_domain(chain_id=chain_id),
            "message": self.message(),
        }


def usage_domain(*, chain_id: int = DEFAULT_CHAIN_ID) -> dict[str, int | str]:
    return {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": chain_id}


def recover_signer(message: SignableMessage, signature: str) -> str | None:
    """The checksummed address that signed `message` (EIP-191 or EIP-712, as encoded by
    eth_account.messages), or None when `signature` is not a well-formed 65-byte secp256k1
    signature ("0x" and 130 hex digits, or the digits alone). A valid signature by another key
    recovers another address: compare the result with the expected signer. The one signature
    check of the project: usage reports here, wallets and budgets in billing.authorizations."""
    text = signature[2:] if signature[:2] in ("0x", "0X") else signature
    if len(text) != 130:
        return None
    try:
        return str(Account.recover_message(message, signature=bytes.fromhex(text)))
    except (ValueError, TypeError, BadSignature, ValidationError):
        # Not hex, or r, s or v out of range.
        return None


def recover_usage_signer(report: UsageStruct, signature: str, *, chain_id: int = DEFAULT_CHAIN_ID) -> str | None:
    """The checksummed address that signed `report` (recover_signer over its EIP-712 form)."""
    return recover_signer(encode_typed_data(full_message=report.typed_data(chain_id=chain_id)), signature)


def usage_signature_valid(
    report: UsageStruct, signature: str, *, address: str, chain_id: int = DEFAULT_CHAIN_ID
) -> bool:
    """True when `signature` over `report` is by `address` (compared case-insensitively)."""
    signer = recover_usage_signer(report, signature, chain_id=chain_id)
    return signer is not None and signer.lower() == address.lower()


def wire_usage_struct(lease_id: int, body: Mapping[str, object]) -> UsageStruct:
    """The struct a raw JSON usage body stands for (times parsed from ISO 8601 text)."""

    def when(name: str) -> datetime:
        try:
            return datetime.fromisoformat(str(body[name]).replace("Z", "+00:00"))
        except (KeyError, ValueError):
            raise UnsignableReport(f"{name} is missing or not an ISO 8601 time.") from None

    return UsageStruct.from_wire(
        lease_id=lease_id,
        report_id=str(body.get("report_id", "")),
        period_start=when("period_start"),
        period_end=when("period_end"),
        gpu_seconds=str(body.get("gpu_seconds", "")),
        mean_utilization_pct=body.get("mean_utilization_pct"),
        peak_memory_mb=body.get("peak_memory_mb"),
    )
