"""Typed views of the marketplace's answers. Each model keeps the answer it was read from in
`raw` (what `--json` prints), so a field the server adds later is not lost. Prices and amounts
are Decimal, never float."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

JSON = dict[str, Any]

# A job in one of these states has ended.
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def _dt(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value)


def _dec(value: object) -> Decimal | None:
    if value is None or value == "":
        return None
    return Decimal(str(value))


def _int(value: object) -> int | None:
    return None if value is None else int(str(value))


def _float(value: object) -> float | None:
    return None if value is None else float(str(value))


@dataclass(frozen=True)
class Amount:
    """An amount of the payment token: `tokens` for people, `micro` (10^-6 token) exact."""

    tokens: Decimal
    micro: int

    @classmethod
    def from_json(cls, data: object) -> Amount:
        if not isinstance(data, Mapping):
            return cls(tokens=Decimal(0), micro=0)
        return cls(tokens=Decimal(str(data.get("tokens", "0"))), micro=int(data.get("micro", 0)))


@dataclass(frozen=True)
class Me:
    id: int
    username: str
    roles: list[str]
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: JSON) -> Me:
        return cls(id=int(data["id"]), username=str(data["username"]), roles=list(data.get("roles", [])), raw=data)


@dataclass(frozen=True)
class Offer:
    """A GPU on the market (GET /api/v1/gpus/)."""

    uuid: str
    model: str
    vram_mb: int
    price_per_gpu_hour: Decimal
    region: str
    machine: int
    state: str
    available_now: bool
    available_until: datetime | None
    predicted_idle_s: int | None
    p_finish: float | None
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: JSON) -> Offer:
        return cls(
            uuid=str(data["uuid"]),
            model=str(data["model"]),
            vram_mb=int(data["vram_mb"]),
            price_per_gpu_hour=Decimal(str(data["price_per_gpu_hour"])),
            region=str(data.get("region", "")),
            machine=int(data["machine"]),
            state=str(data.get("state", "")),
            available_now=bool(data.get("available_now", False)),
            available_until=_dt(data.get("available_until")),
            predicted_idle_s=_int(data.get("predicted_idle_s")),
            p_finish=_float(data.get("p_finish")),
            raw=data,
        )


@dataclass(frozen=True)
class Lease:
    id: int
    job: int
    status: str
    machine: int
    region: str
    gpu_count: int
    gpu_models: list[str]
    price_per_gpu_hour: Decimal
    created_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    end_detail: str
    exit_code: int | None
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: JSON) -> Lease:
        return cls(
            id=int(data["id"]),
            job=int(data["job"]),
            status=str(data["status"]),
            machine=int(data["machine"]),
            region=str(data.get("region", "")),
            gpu_count=int(data.get("gpu_count", 0)),
            gpu_models=[str(g.get("model", "")) for g in data.get("gpus", [])],
            price_per_gpu_hour=Decimal(str(data.get("price_per_gpu_hour", "0"))),
            created_at=_dt(data.get("created_at")),
            started_at=_dt(data.get("started_at")),
            ended_at=_dt(data.get("ended_at")),
            end_reason=data.get("end_reason"),
            end_detail=str(data.get("end_detail", "")),
            exit_code=_int(data.get("exit_code")),
            raw=data,
        )


@dataclass(frozen=True)
class JobOffer:
    """A machine a pending job could be placed on now (a job detail's `offers`)."""

    machine: int
    region: str
    gpu_models: list[str]
    price_per_gpu_hour: Decimal
    available_until: datetime | None
    predicted_idle_s: int | None
    p_finish: float | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobOffer:
        return cls(
            machine=int(data["machine"]),
            region=str(data.get("region", "")),
            gpu_models=[str(g.get("model", "")) for g in data.get("gpus", [])],
            price_per_gpu_hour=Decimal(str(data["price_per_gpu_hour"])),
            available_until=_dt(data.get("available_until")),
            predicted_idle_s=_int(data.get("predicted_idle_s")),
            p_finish=_float(data.get("p_finish")),
        )


@dataclass(frozen=True)
class UnplacedReason:
    code: str
    detail: str
    checked_at: datetime | None


@dataclass(frozen=True)
class JobBudget:
    reserved: Decimal
    charged: Decimal
    released: Decimal
    remaining: Decimal


@dataclass(frozen=True)
class Job:
    """A job (the list's rows, or a job's detail: then `current_lease`, `budget` and `offers`)."""

    id: int
    name: str
    kind: str
    status: str
    gpu_count: int
    min_vram_mb: int
    allowed_models: list[str]
    region: str
    max_price_per_gpu_hour: Decimal
    expected_duration_s: int
    max_duration_s: int
    attempts: int
    exit_code: int | None
    failure_reason: str
    unplaced_reason: UnplacedReason | None
    created_at: datetime | None
    finished_at: datetime | None
    current_lease: Lease | None
    budget: JobBudget | None
    offers: list[JobOffer] | None
    raw: JSON = field(repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, data: JSON) -> Job:
        unplaced = data.get("unplaced_reason")
        lease = data.get("current_lease")
        budget = data.get("budget")
        return cls(
            id=int(data["id"]),
            name=str(data.get("name", "")),
            kind=str(data.get("kind", "")),
            status=str(data["status"]),
            gpu_count=int(data.get("gpu_count", 0)),
            min_vram_mb=int(data.get("min_vram_mb", 0)),
            allowed_models=list(data.get("allowed_models", [])),
            region=str(data.get("region", "")),
            max_price_per_gpu_hour=Decimal(str(data.get("max_price_per_gpu_hour", "0"))),
            expected_duration_s=int(data.get("expected_duration_s", 0)),
            max_duration_s=int(data.get("max_duration_s", 0)),
            attempts=int(data.get("attempts", 0)),
            exit_code=_int(data.get("exit_code")),
            failure_reason=str(data.get("failure_reason", "")),
            unplaced_reason=UnplacedReason(
                code=str(unplaced.get("code", "")),
                detail=str(unplaced.get("detail", "")),
                checked_at=_dt(unplaced.get("checked_at")),
            )
            if isinstance(unplaced, Mapping)
            else None,
            created_at=_dt(data.get("created_at")),
            finished_at=_dt(data.get("finished_at")),
            current_lease=Lease.from_json(dict(lease)) if isinstance(lease, Mapping) else None,
            budget=JobBudget(
                reserved=Decimal(str(budget.get("reserved", "0"))),
                charged=Decimal(str(budget.get("charged", "0"))),
                released=Decimal(str(budget.get("released", "0"))),
                remaining=Decimal(str(budget.get("remaining", "0"))),
            )
            if isinstance(budget, Mapping)
            else None,
            offers=[JobOffer.from_json(o) for o in data["offers"]] if isinstance(data.get("offers"), list) else None,
            raw=data,
        )


@dataclass(frozen=True)
class Balance:
    available: Amount
    reserved: Amount
    unsettled: Amount
    settled: Amount
    deposited: Amount
    withdrawn: Amount
    total: Amount
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: JSON) -> Balance:
        return cls(
            available=Amount.from_json(data.get("available")),
            reserved=Amount.from_json(data.get("reserved")),
            unsettled=Amount.from_json(data.get("unsettled")),
            settled=Amount.from_json(data.get("settled")),
            deposited=Amount.from_json(data.get("deposited")),
            withdrawn=Amount.from_json(data.get("withdrawn")),
            total=Amount.from_json(data.get("total")),
            raw=data,
        )


@dataclass(frozen=True)
class StatementMovement:
    kind: str
    count: int
    amount: Amount


@dataclass(frozen=True)
class Statement:
    """A renter's monthly statement."""

    month: str
    opening_balance: Amount
    movements: list[StatementMovement]
    closing_balance: Amount
    charged: Amount
    settled: Amount
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: JSON) -> Statement:
        return cls(
            month=str(data["month"]),
            opening_balance=Amount.from_json(data.get("opening_balance")),
            movements=[
                StatementMovement(kind=str(m["kind"]), count=int(m["count"]), amount=Amount.from_json(m.get("amount")))
                for m in data.get("movements", [])
            ],
            closing_balance=Amount.from_json(data.get("closing_balance")),
            charged=Amount.from_json(data.get("charged")),
            settled=Amount.from_json(data.get("settled")),
            raw=data,
        )


@dataclass(frozen=True)
class LogChunk:
    """A piece of a job's output (GET /api/v1/jobs/{id}/logs/); `id` is the cursor after it."""

    id: int
    lease: int
    seq: int
    text: str
    truncated: bool
    at: datetime | None
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: JSON) -> LogChunk:
        return cls(
            id=int(data["id"]),
            lease=int(data["lease"]),
            seq=int(data["seq"]),
            text=str(data.get("text", "")),
            truncated=bool(data.get("truncated", False)),
            at=_dt(data.get("at")),
            raw=data,
        )


@dataclass(frozen=True)
class JobLogs:
    """One read of a job's output: the chunks after the cursor asked for, the cursor to ask next,
    and whether the output is complete (the job is over and nothing more will come)."""

    chunks: list[LogChunk]
    next_cursor: int
    finished: bool
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: JSON) -> JobLogs:
        return cls(
            chunks=[LogChunk.from_json(c) for c in data.get("chunks", [])],
            next_cursor=int(data.get("next_cursor", 0)),
            finished=bool(data.get("finished", False)),
            raw=data,
        )
