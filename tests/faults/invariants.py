"""The fault suite's judgements: plain functions over what the kernel showed (workload runs seen
in /proc) and what the marketplace recorded (a tests.faults.probe snapshot). No I/O, no Django,
so tests/faults/test_invariants.py can feed them broken worlds and see each one caught.

A violation is one sentence with the moment it happened (for the table's phase) and the rows
that show it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")

RAN_TWICE = "ran twice"
BILLING = "billing"
LEDGER = "ledger = chain"
STUCK = "stuck"
# A fault the harness could not inject or heal (a server that did not come back).
HARNESS = "harness"
KINDS = (RAN_TWICE, BILLING, LEDGER, STUCK, HARNESS)
# Not a violation, reported beside them: a job run again after its workload had completed on a
# machine that was cut off and could not say so (at least once is all a marketplace can promise
# for a machine it cannot reach).
RERUN = "re-run after a cut-off"


@dataclass(frozen=True)
class Run:
    """One workload process of one lease, as the kernel showed it: started at `start` (its
    start time in /proc), last seen alive at `last_seen`, gone by `end` (None while it runs).
    `complete`: it lived its whole planned duration (its `sleep` returned), so it succeeded."""

    job_id: int
    lease_id: int
    pid: int
    start: float
    last_seen: float
    end: float | None
    planned_s: float
    agent: int | None = None

    @property
    def complete(self) -> bool:
        return self.end is not None and self.last_seen - self.start >= self.planned_s - 0.25

    def seconds(self, now: float) -> float:
        return (self.end if self.end is not None else now) - self.start

    def as_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "lease_id": self.lease_id,
            "pid": self.pid,
            "start": round(self.start, 3),
            "last_seen": round(self.last_seen, 3),
            "end": None if self.end is None else round(self.end, 3),
            "planned_s": self.planned_s,
            "agent": self.agent,
            "complete": self.complete,
        }


@dataclass(frozen=True)
class Violation:
    """One broken invariant: its kind, when it happened, a sentence with the rows that show it,
    and `ident`, what it is about (the same fault found again by a later check has the same)."""

    kind: str
    at: float
    text: str
    ident: str = ""

    @property
    def key(self) -> str:
        return self.ident or self.text

    def __str__(self) -> str:
        return f"[{self.kind}] {self.text}"


@dataclass(frozen=True)
class Bounds:
    """How much the suite tolerates, in seconds."""

    # Billed seconds of a lease beyond the seconds its workload was seen running: the agent
    # reports a start just before the process exists (about 0.05 s) and an exit after polling for
    # it (up to its poll interval, 0.5 s in the suite); billing rounds down to whole seconds.
    bill_tolerance_s: float = 1.0
    # A job not terminal this long after it was submitted is stuck.
    job_stuck_s: float = 120.0
    # A settlement or reservation batch pending or submitted this long is stuck.
    batch_stuck_s: float = 60.0


@dataclass
class Checkpoint:
    """What one check found: the violations, and the figures the table shows."""

    violations: list[Violation] = field(default_factory=list)
    # Findings that break no invariant but are worth reporting (RERUN).
    observations: list[Violation] = field(default_factory=list)
    stuck: int = 0
    ledger_ok: bool | None = None


def _span(start: float | None, end: float | None, now: float) -> tuple[float, float] | None:
    if start is None:
        return None
    return start, end if end is not None else now


def ran_twice(runs: Sequence[Run], snapshot: Mapping[str, Any]) -> list[Violation]:
    """A job's workload running twice at once, or again after it completed, as the kernel saw it;
    and the same as the marketplace recorded it (two leases of one job running at once, a lease
    started after one that succeeded). Lease events recorded twice count too."""
    now = float(snapshot["now"])
    leases_of = {lease["id"]: lease for lease in snapshot["leases"]}
    found: list[Violation] = []
    by_job: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        by_job[run.job_id].append(run)
    for job_id, own in by_job.items():
        own.sort(key=lambda r: r.start)
        for i, first in enumerate(own):
            for later in own[i + 1 :]:
                first_end = first.last_seen if first.end is not None else now
                if later.start < first_end:
                    found.append(
                        Violation(
                            RAN_TWICE,
                            later.start,
                            f"job {job_id} ran twice at once (kernel): lease {first.lease_id} pid {first.pid} "
                            f"[{first.start:.1f}, {first_end:.1f}] and lease {later.lease_id} pid {later.pid} "
                            f"from {later.start:.1f} ({first_end - later.start:.1f} s together)",
                            f"kernel-twice:{first.pid}:{later.pid}",
                        )
                    )
                elif first.complete:
                    cut_off = _cut_off(leases_of.get(first.lease_id), later.start)
                    found.append(
                        Violation(
                            RERUN if cut_off else RAN_TWICE,
                            later.start,
                            f"job {job_id} ran again after its workload completed (kernel): lease "
                            f"{first.lease_id} ran its {first.planned_s:g} s to the end at {first.last_seen:.1f}, "
                            f"lease {later.lease_id} started it again at {later.start:.1f}"
                            + (f" ({cut_off})" if cut_off else ""),
                            f"kernel-again:{first.pid}:{later.pid}",
                        )
                    )

    leases_by_job: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for lease in snapshot["leases"]:
        leases_by_job[lease["job_id"]].append(lease)
        for kind in ("lease.started", "lease.ended"):
            if lease["events"].get(kind, 0) > 1:
                found.append(
                    Violation(
                        RAN_TWICE,
                        lease["started_at"] or lease["created_at"],
                        f"lease {lease['id']} of job {lease['job_id']} has {lease['events'][kind]} {kind} events",
                        f"events:{lease['id']}:{kind}",
                    )
                )
    for job_id, leases in leases_by_job.items():
        leases.sort(key=lambda lease: lease["started_at"] or lease["created_at"])
        for i, before in enumerate(leases):
            a = _span(before["started_at"], before["ended_at"], now)
            if a is None:
                continue
            for after in leases[i + 1 :]:
                b = _span(after["started_at"], after["ended_at"], now)
                if b is None:
                    continue
                if b[0] < a[1]:
                    found.append(
                        Violation(
                            RAN_TWICE,
                            b[0],
                            f"job {job_id} ran twice at once (marketplace): lease {before['id']} "
                            f"[{a[0]:.1f}, {a[1]:.1f}] ({before['end_reason'] or before['status']}) and lease "
                            f"{after['id']} from {b[0]:.1f}",
                            f"server-twice:{before['id']}:{after['id']}",
                        )
                    )
                elif before["end_reason"] == "succeeded":
                    found.append(
                        Violation(
                            RAN_TWICE,
                            b[0],
                            f"job {job_id} ran again after it succeeded (marketplace): lease {before['id']} "
                            f"succeeded at {a[1]:.1f}, lease {after['id']} started at {b[0]:.1f}",
                            f"server-again:{before['id']}:{after['id']}",
                        )
                    )
    return found


def _cut_off(lease: Mapping[str, Any] | None, restarted_at: float) -> str:
    """Why the marketplace could not have known that `lease`'s workload had finished when it started
    the job again at `restarted_at` ("" when it could): the lease ended as lost (its agent was cut
    off) and the agent told how the workload ended only after the job started again, or never."""
    if lease is None or lease["end_reason"] != "lost":
        return ""
    told = lease.get("reported_after_loss_at")
    if told is not None and told <= restarted_at:
        return ""
    when = "never" if told is None else f"only at {told:.1f}"
    return f"its agent was cut off: the lease ended lost at {lease['ended_at'] or 0:.1f} and the exit was told {when}"


def lease_run_seconds(runs: Iterable[Run], now: float) -> dict[int, float]:
    """Seconds each lease's workload was seen running (overlapping processes of one lease once)."""
    spans: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        spans[run.lease_id].append((run.start, run.end if run.end is not None else now))
    total: dict[int, float] = {}
    for lease_id, own in spans.items():
        own.sort()
        seconds, (start, end) = 0.0, own[0]
        for a, b in own[1:]:
            if a > end:
                seconds += end - start
                start, end = a, b
            else:
                end = max(end, b)
        total[lease_id] = seconds + end - start
    return total


def billing(
    runs: Sequence[Run], snapshot: Mapping[str, Any], bounds: Bounds, *, only_final: bool = True
) -> list[Violation]:
    """Every second of signed usage inside a lease billed, once, and no second outside it:

    - the ledger's charge entries of a lease sum to its charge, and the charge is its billed
      seconds at its price (an extra or a repeated charge shows here);
    - billed seconds ≥ the seconds its signed usage covers inside the lease (unless the job's
      budget capped it);
    - billed seconds ≤ the lease's own span, and ≤ the seconds its workload was seen running
      plus `bill_tolerance_s` (a lease billed while nothing ran, or after its workload ended).

    Only leases whose charge is final (`only_final`), since a running lease's charge grows."""
    now = float(snapshot["now"])
    ran = lease_run_seconds(runs, now)
    found: list[Violation] = []
    for lease in snapshot["leases"]:
        charge = lease["charge"]
        if charge is None or (only_final and not charge["final"]):
            continue
        at = lease["ended_at"] or lease["created_at"]
        tag = f"lease {lease['id']} of job {lease['job_id']} ({lease['end_reason'] or lease['status']})"
        billed = charge["billable_seconds"]
        if lease["ledger_charged_micro"] != charge["cumulative_micro"]:
            found.append(
                Violation(
                    BILLING,
                    at,
                    f"{tag}: the ledger charged {lease['ledger_charged_micro']} micro in "
                    f"{lease['charge_entries']} entries, its charge is {charge['cumulative_micro']}",
                    f"ledger-charge:{lease['id']}",
                )
            )
        if not charge["capped"] and charge["cumulative_micro"] != charge["expected_micro"]:
            found.append(
                Violation(
                    BILLING,
                    at,
                    f"{tag}: charged {charge['cumulative_micro']} micro for {billed} s, "
                    f"which at its price is {charge['expected_micro']}",
                    f"price:{lease['id']}",
                )
            )
        if not charge["capped"] and billed < lease["usage_signed_s"]:
            found.append(
                Violation(
                    BILLING,
                    at,
                    f"{tag}: {lease['usage_signed_s']} s of signed usage inside the lease, {billed} s billed",
                    f"underbilled:{lease['id']}",
                )
            )
        span = _span(lease["started_at"], lease["ended_at"], now)
        wall = 0.0 if span is None else span[1] - span[0]
        if billed > wall + 1:
            found.append(
                Violation(BILLING, at, f"{tag}: {billed} s billed for a lease {wall:.1f} s long", f"wall:{lease['id']}")
            )
        seen = ran.get(lease["id"], 0.0)
        if billed > seen + bounds.bill_tolerance_s:
            found.append(
                Violation(
                    BILLING,
                    at,
                    f"{tag}: {billed} s billed, its workload was seen running {seen:.1f} s "
                    f"(lease [{lease['started_at'] or 0:.1f}, {lease['ended_at'] or 0:.1f}])",
                    f"overbilled:{lease['id']}",
                )
            )
    return found


def ledger_equals_chain(snapshot: Mapping[str, Any], *, settled: bool) -> list[Violation]:
    """What the ledger says the escrow paid equals what the escrow holds: each provider's
    payable = its earnings on chain, platform fees = the fees accrued. While a batch is in flight
    (or one moved while the probe read), the chain may be ahead of the ledger but never behind.
    `settled` (after the final drain): also each renter's available balance on chain = the
    ledger's renter_available."""
    money = snapshot["money"]
    now = float(snapshot["now"])
    chain, ledger = money["chain"], money["ledger"]
    if chain.get("error"):
        return [Violation(LEDGER, now, f"the escrow could not be read: {chain['error']}", "chain-unreadable")]
    found = [
        Violation(
            LEDGER,
            now,
            f"{m['what']} is confirmed in the ledger (tx {m['tx_hash'][:12]}…, block {m['block_number']}) but the "
            + (
                "chain does not have it"
                if m["on_chain_block"] is None
                else f"chain has it in block {m['on_chain_block']}"
            ),
            f"missing:{m['what']}",
        )
        for m in chain.get("missing", [])
    ]
    exact = money["consistent"] and not money["in_flight"]
    pairs = [
        (f"provider {address} payable", payable, chain["earnings"].get(address, 0))
        for address, payable in ledger["provider_payable"].items()
        if address
    ]
    pairs.append(("platform fees", ledger["by_kind"].get("platform_fees", 0), chain["fees_accrued"]))
    if settled:
        available = sum(chain["available"].values())
        pairs.append(("renters' available", ledger["by_kind"].get("renter_available", 0), available))
    for what, in_ledger, on_chain in pairs:
        if in_ledger > on_chain or (exact and in_ledger != on_chain):
            found.append(
                Violation(
                    LEDGER,
                    now,
                    f"{what}: ledger {in_ledger} micro, escrow {on_chain} at block {chain.get('block')}"
                    + ("" if exact else f" (settlements in flight: {money['in_flight']})"),
                    f"chain:{what}",
                )
            )
    return found


def _examples(items: Sequence[str], limit: int = 6) -> str:
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def stuck(snapshot: Mapping[str, Any], bounds: Bounds) -> tuple[list[Violation], int]:
    """Jobs not terminal `job_stuck_s` after they were submitted (one violation for them all);
    settlement and reservation batches pending or submitted for longer than `batch_stuck_s`.
    Returns the violations and how many jobs and batches are stuck."""
    now = float(snapshot["now"])
    found = []
    jobs = [j for j in snapshot["jobs"] if j["status"] not in TERMINAL and now - j["created_at"] > bounds.job_stuck_s]
    if jobs:
        by_status = Counter(
            j["status"]
            + (f" ({j['unplaced_code']})" if j["unplaced_code"] else "")
            + (f", budget {j['budget']['status']}" if j.get("budget") else ", no budget")
            for j in jobs
        )
        found.append(
            Violation(
                STUCK,
                now,
                f"{len(jobs)} job(s) not terminal {bounds.job_stuck_s:g} s after they were submitted: "
                + ", ".join(f"{n} {what}" for what, n in by_status.most_common())
                + " — "
                + _examples([f"job {j['id']} {j['status']} for {now - j['created_at']:.0f} s" for j in jobs]),
                "stuck-jobs",
            )
        )
    count = len(jobs)
    for kind in ("settlements", "reservations"):
        for batch in snapshot[kind]:
            if batch["status"] in ("pending", "submitted") and now - batch["created_at"] > bounds.batch_stuck_s:
                count += 1
                found.append(
                    Violation(
                        STUCK,
                        now,
                        f"{kind[:-1]} {batch['id']} is {batch['status']} {now - batch['created_at']:.0f} s after "
                        f"it was created (tx {batch['tx_hash'] or '-'}, {batch['attempts']} attempts"
                        + (f", last error: {batch['last_error'][:120]}" if batch["last_error"] else "")
                        + ")",
                        f"stuck-{kind}:{batch['id']}",
                    )
                )
    return found, count


def checkpoint(
    runs: Sequence[Run],
    snapshot: Mapping[str, Any],
    bounds: Bounds,
    *,
    ledger_check_ok: bool,
    ledger_check_output: str,
    final: bool = False,
) -> Checkpoint:
    """Every invariant at one moment. `final`: after the drain, when every lease should be
    finally metered and every batch settled (the ledger must then equal the chain exactly)."""
    result = Checkpoint(ledger_ok=ledger_check_ok)
    for found in ran_twice(runs, snapshot):
        (result.observations if found.kind == RERUN else result.violations).append(found)
    result.violations += billing(runs, snapshot, bounds)
    if not ledger_check_ok:
        lines = [line.strip() for line in ledger_check_output.splitlines() if line.strip().startswith("-")]
        detail = "; ".join(lines[:5]) or ledger_check_output.strip()[-300:]
        result.violations.append(
            Violation(LEDGER, float(snapshot["now"]), f"manage.py ledger_check failed: {detail}", "ledger_check")
        )
    chain = ledger_equals_chain(snapshot, settled=final)
    result.violations += chain
    result.ledger_ok = ledger_check_ok and not chain
    stuck_now, result.stuck = stuck(snapshot, bounds)
    if final:
        unsettled, count = _unsettled(snapshot)
        stuck_now += unsettled
        result.stuck += count
    result.violations += stuck_now
    return result


def _unsettled(snapshot: Mapping[str, Any]) -> tuple[list[Violation], int]:
    """After the drain: every lease ended and finally metered, nothing left unsettled."""
    now = float(snapshot["now"])
    found = []
    open_ = [f"lease {x['id']} (job {x['job_id']}) {x['status']}" for x in snapshot["leases"] if x["status"] != "ended"]
    unfinal = [
        f"lease {x['id']} (job {x['job_id']}, {x['end_reason']})"
        for x in snapshot["leases"]
        if x["status"] == "ended" and x["charge"] is not None and not x["charge"]["final"]
    ]
    if open_:
        found.append(Violation(STUCK, now, f"{len(open_)} lease(s) not ended: {_examples(open_)}", "open-leases"))
    if unfinal:
        found.append(
            Violation(STUCK, now, f"{len(unfinal)} ended lease(s) not finally metered: {_examples(unfinal)}", "unfinal")
        )
    by_kind = snapshot["money"]["ledger"]["by_kind"]
    unsettled = [kind for kind in ("lease_unsettled", "in_settlement") if by_kind.get(kind, 0)]
    for kind in unsettled:
        found.append(Violation(STUCK, now, f"{by_kind[kind]} micro still in {kind}", f"unsettled:{kind}"))
    return found, len(open_) + len(unfinal) + len(unsettled)


# --- the table --------------------------------------------------------------------------------


@dataclass
class Phase:
    """One fault and its recovery: [start, end), what its checkpoint found, and notes."""

    name: str
    start: float
    end: float = 0.0
    checkpoint: Checkpoint | None = None
    notes: list[str] = field(default_factory=list)


COLUMNS = (
    "fault",
    "jobs",
    "leases",
    "lost",
    "ran twice",
    "billed s",
    "usage s",
    "diff",
    "ledger = chain",
    "stuck",
    "s",
)


def rows(phases: Sequence[Phase], snapshot: Mapping[str, Any], violations: Sequence[Violation]) -> list[list[str]]:
    """One row per phase: jobs submitted in it, leases the marketplace ended in it (lost: as lost), ran-twice
    violations that started in it, the billed and signed-usage seconds of its leases, its
    checkpoint's ledger verdict and stuck count, and its length; then a total row."""

    def phase_of(t: float | None) -> int | None:
        if t is None:
            return len(phases) - 1
        for i, phase in enumerate(phases):
            if phase.start <= t < phase.end:
                return i
        return len(phases) - 1 if t >= phases[-1].start else 0

    counts: list[defaultdict[str, int]] = [defaultdict(int) for _ in phases]
    for job in snapshot["jobs"]:
        i = phase_of(job["created_at"])
        if i is not None:
            counts[i]["jobs"] += 1
    for lease in snapshot["leases"]:
        i = phase_of(lease.get("ended_recorded_at") or lease["ended_at"])
        if i is None:
            continue
        counts[i]["leases"] += 1
        counts[i]["lost"] += lease["end_reason"] == "lost"
        if lease["charge"] is not None:
            counts[i]["billed"] += lease["charge"]["billable_seconds"]
        counts[i]["usage"] += lease["usage_signed_s"]
    for violation in violations:
        if violation.kind == RAN_TWICE:
            i = phase_of(violation.at)
            if i is not None:
                counts[i]["twice"] += 1
    table = []
    for phase, c in zip(phases, counts, strict=True):
        cp = phase.checkpoint
        table.append(
            [
                phase.name,
                str(c["jobs"]),
                str(c["leases"]),
                str(c["lost"]),
                str(c["twice"]),
                str(c["billed"]),
                str(c["usage"]),
                f"{c['billed'] - c['usage']:+d}",
                "-" if cp is None or cp.ledger_ok is None else ("yes" if cp.ledger_ok else "NO"),
                "-" if cp is None else str(cp.stuck),
                f"{phase.end - phase.start:.0f}",
            ]
        )
    total: defaultdict[str, int] = defaultdict(int)
    for c in counts:
        for key, value in c.items():
            total[key] += value
    table.append(
        [
            "total",
            str(total["jobs"]),
            str(total["leases"]),
            str(total["lost"]),
            str(total["twice"]),
            str(total["billed"]),
            str(total["usage"]),
            f"{total['billed'] - total['usage']:+d}",
            "yes" if all(p.checkpoint is None or p.checkpoint.ledger_ok for p in phases) else "NO",
            str(sum(p.checkpoint.stuck for p in phases if p.checkpoint is not None)),
            f"{phases[-1].end - phases[0].start:.0f}",
        ]
    )
    return table


def render(table: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [COLUMNS, *table]) for i in range(len(COLUMNS))]
    lines = [
        " | ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [COLUMNS, *table]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
