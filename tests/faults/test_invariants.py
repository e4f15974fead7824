"""The fault suite's judge on made-up worlds: each broken invariant is caught, a healthy world
passes. Fast (no servers): it runs in every test run, so the suite's checks cannot quietly stop
being able to fail."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.faults import invariants
from tests.faults.invariants import BILLING, LEDGER, RAN_TWICE, RERUN, STUCK, Bounds, Phase, Run

T0 = 1_800_000_000.0
PRICE = 2_000_000  # micro per GPU-hour
BOUNDS = Bounds(bill_tolerance_s=2, job_stuck_s=120, batch_stuck_s=60)


def _lease(lease_id: int, job_id: int, start: float, end: float | None, *, reason: str = "succeeded") -> dict:
    billed = int(end - start) if end is not None else 0
    micro = PRICE * billed // 3600
    return {
        "id": lease_id,
        "job_id": job_id,
        "machine_id": 1,
        "status": "ended" if end is not None else "running",
        "end_reason": reason if end is not None else "",
        "exit_code": 0,
        "created_at": start - 1,
        "started_at": start,
        "ended_at": end,
        "gpu_count": 1,
        "price_micro_per_gpu_hour": PRICE,
        "reports": 3,
        "usage_signed_s": billed,
        "usage_unsigned_s": 0,
        "usage_outside_s": 0,
        "events": {"lease.started": 1, "lease.ended": 1},
        "reported_after_loss_at": None,
        "ledger_charged_micro": micro,
        "charge_entries": 1,
        "charge": {
            "billable_seconds": billed,
            "cumulative_micro": micro,
            "uncapped_micro": micro,
            "capped": False,
            "final": end is not None,
            "expected_micro": micro,
        },
    }


def _world() -> tuple[list[Run], dict[str, Any]]:
    """Two jobs of 3 s, each run once on its own lease, billed, settled, the chain in step."""
    runs = [
        Run(job_id=1, lease_id=10, pid=100, start=T0 + 0.2, last_seen=T0 + 3.2, end=T0 + 3.3, planned_s=3),
        Run(job_id=2, lease_id=20, pid=200, start=T0 + 5.2, last_seen=T0 + 8.2, end=T0 + 8.3, planned_s=3),
    ]
    snapshot = {
        "now": T0 + 30,
        "jobs": [
            {"id": 1, "key": "k1", "status": "succeeded", "created_at": T0 - 2, "finished_at": T0 + 4,
             "attempts": 1, "exit_code": 0, "failure_reason": "", "unplaced_code": "",
             "budget": {"status": "reserved", "released_on_chain": True}},
            {"id": 2, "key": "k2", "status": "succeeded", "created_at": T0 + 3, "finished_at": T0 + 9,
             "attempts": 1, "exit_code": 0, "failure_reason": "", "unplaced_code": "",
             "budget": {"status": "reserved", "released_on_chain": True}},
        ],
        "leases": [_lease(10, 1, T0, T0 + 3.6), _lease(20, 2, T0 + 5, T0 + 8.6)],
        "machines": [],
        "settlements": [{"id": 1, "status": "confirmed", "created_at": T0 + 10, "submitted_at": T0 + 10,
                         "confirmed_at": T0 + 11, "updated_at": T0 + 11, "tx_hash": "0xab", "block_number": 9,
                         "attempts": 1, "last_error": "", "total_micro": 3332, "item_count": 2}],
        "reservations": [],
        "money": {
            "ledger": {"by_kind": {"platform_fees": 332, "renter_available": 1000}, "provider_payable": {"0xp": 3000}},
            "chain": {"error": None, "block": 12, "earnings": {"0xp": 3000}, "fees_accrued": 332,
                      "available": {"0xr": 1000}, "escrow_tokens": 4332, "missing": []},
            "in_flight": [],
            "consistent": True,
        },
    }  # fmt: skip
    return runs, snapshot


def _check(
    runs: list[Run], snapshot: dict[str, Any], *, final: bool = True, ledger_ok: bool = True, output: str = ""
) -> invariants.Checkpoint:
    return invariants.checkpoint(
        runs, snapshot, BOUNDS, ledger_check_ok=ledger_ok, ledger_check_output=output, final=final
    )


def _kinds(result: invariants.Checkpoint) -> list[str]:
    return [violation.kind for violation in result.violations]


def test_a_healthy_world_breaks_nothing() -> None:
    runs, snapshot = _world()

    result = _check(runs, snapshot)

    assert result.violations == [] and result.observations == []
    assert result.ledger_ok is True and result.stuck == 0


def test_a_job_running_on_two_leases_at_once_is_caught_from_the_kernel_and_the_marketplace() -> None:
    runs, snapshot = _world()
    # Job 1 is placed again (lease 11) while its first workload still runs.
    runs.append(Run(job_id=1, lease_id=11, pid=101, start=T0 + 2.0, last_seen=T0 + 5.0, end=T0 + 5.1, planned_s=3))
    snapshot["leases"].append(_lease(11, 1, T0 + 1.9, T0 + 5.4))

    texts = [str(v) for v in _check(runs, snapshot).violations]

    assert any("ran twice at once (kernel)" in t for t in texts)
    assert any("ran twice at once (marketplace)" in t for t in texts)


def test_a_job_run_again_after_it_succeeded_is_caught() -> None:
    runs, snapshot = _world()
    runs.append(Run(job_id=1, lease_id=11, pid=101, start=T0 + 10, last_seen=T0 + 13, end=T0 + 13.1, planned_s=3))
    snapshot["leases"].append(_lease(11, 1, T0 + 9.8, T0 + 13.4))

    result = _check(runs, snapshot)

    assert RAN_TWICE in _kinds(result)
    assert any("ran again after its workload completed" in str(v) for v in result.violations)
    assert any("ran again after it succeeded (marketplace)" in str(v) for v in result.violations)


def test_a_rerun_after_a_cut_off_machine_finished_unheard_is_reported_but_breaks_nothing() -> None:
    runs, snapshot = _world()
    # Lease 10's machine went silent; its workload completed; the lease was declared lost and the
    # job ran again on lease 11 before the machine came back to say it had exited 0.
    lost = snapshot["leases"][0]
    lost.update(end_reason="lost", reported_after_loss_at=T0 + 20)
    runs.append(Run(job_id=1, lease_id=11, pid=101, start=T0 + 10, last_seen=T0 + 13, end=T0 + 13.1, planned_s=3))
    snapshot["leases"].append(_lease(11, 1, T0 + 9.8, T0 + 13.4))

    result = _check(runs, snapshot)

    assert RAN_TWICE not in _kinds(result)
    assert [o.kind for o in result.observations] == [RERUN]
    # Had the machine said so before the job was started again, it is a violation.
    lost["reported_after_loss_at"] = T0 + 5
    assert RAN_TWICE in _kinds(_check(runs, snapshot))


def test_an_extra_charge_in_the_ledger_is_caught() -> None:
    runs, snapshot = _world()
    snapshot["leases"][0]["ledger_charged_micro"] += 555
    snapshot["leases"][0]["charge_entries"] += 1

    result = _check(runs, snapshot)

    assert _kinds(result) == [BILLING]
    assert "the ledger charged" in str(result.violations[0])


def test_a_charge_that_is_not_its_seconds_at_its_price_is_caught() -> None:
    runs, snapshot = _world()
    charge = snapshot["leases"][1]["charge"]
    charge["cumulative_micro"] += 1
    snapshot["leases"][1]["ledger_charged_micro"] += 1

    assert _kinds(_check(runs, snapshot)) == [BILLING]


def test_seconds_billed_while_no_workload_ran_are_caught() -> None:
    runs, snapshot = _world()
    lease = snapshot["leases"][0]
    # The lease ran on, as the marketplace saw it, 20 s after its workload was gone.
    lease["ended_at"] = T0 + 23.6
    lease["charge"]["billable_seconds"] = 23
    for key in ("cumulative_micro", "uncapped_micro", "expected_micro"):
        lease["charge"][key] = PRICE * 23 // 3600
    lease["ledger_charged_micro"] = PRICE * 23 // 3600

    result = _check(runs, snapshot)

    assert _kinds(result) == [BILLING]
    assert "its workload was seen running 3.1 s" in str(result.violations[0])


def test_signed_usage_left_unbilled_is_caught() -> None:
    runs, snapshot = _world()
    snapshot["leases"][1]["usage_signed_s"] = 5

    assert _kinds(_check(runs, snapshot)) == [BILLING]


def test_a_charge_not_yet_final_is_not_judged() -> None:
    runs, snapshot = _world()
    snapshot["leases"][0]["ledger_charged_micro"] += 555
    snapshot["leases"][0]["charge"]["final"] = False

    assert BILLING not in _kinds(_check(runs, snapshot, final=False))


def test_a_failing_ledger_check_is_a_violation() -> None:
    runs, snapshot = _world()

    result = _check(runs, snapshot, ledger_ok=False, output="1 violation(s):\n  - entry 7 sums to 5, not zero")

    assert _kinds(result) == [LEDGER] and result.ledger_ok is False
    assert "entry 7 sums to 5" in str(result.violations[0])


@pytest.mark.parametrize(
    ("change", "in_flight", "caught"),
    [
        # The ledger says a provider earned more than the escrow credited: caught, in flight or not.
        (lambda s: s["money"]["ledger"]["provider_payable"].update({"0xp": 3500}), [], True),
        (lambda s: s["money"]["ledger"]["provider_payable"].update({"0xp": 3500}), [2], True),
        # The chain ahead of the ledger: a batch confirming as the probe read is fine, a quiet one not.
        (lambda s: s["money"]["chain"]["earnings"].update({"0xp": 3500}), [2], False),
        (lambda s: s["money"]["chain"]["earnings"].update({"0xp": 3500}), [], True),
        (lambda s: s["money"]["chain"].update(fees_accrued=1), [], True),
        # A settlement the ledger holds confirmed that the chain lost (a rollback).
        (
            lambda s: s["money"]["chain"]["missing"].append(
                {"what": "settlement 1", "tx_hash": "0xab", "block_number": 9, "on_chain_block": None}
            ),
            [],
            True,
        ),
    ],
)
def test_the_ledger_against_the_chain(
    change: Callable[[dict[str, Any]], object], in_flight: list[int], caught: bool
) -> None:
    runs, snapshot = _world()
    change(snapshot)
    snapshot["money"]["in_flight"] = in_flight

    assert (LEDGER in _kinds(_check(runs, snapshot, final=False))) is caught


def test_renters_balances_are_compared_only_once_everything_is_released() -> None:
    runs, snapshot = _world()
    snapshot["money"]["chain"]["available"]["0xr"] = 900  # a budget still reserved on chain

    assert LEDGER not in _kinds(_check(runs, snapshot, final=False))
    assert LEDGER in _kinds(_check(runs, snapshot, final=True))


def test_stuck_jobs_and_batches_are_counted() -> None:
    runs, snapshot = _world()
    late = copy.deepcopy(snapshot["jobs"][1])
    late.update(id=3, status="pending", created_at=T0 - 200, unplaced_code="budget_not_reserved")
    snapshot["jobs"].append(late)
    batch = dict(snapshot["settlements"][0], id=2, status="submitted", created_at=T0 - 100)
    snapshot["settlements"].append(batch)

    result = _check(runs, snapshot, final=False)

    assert _kinds(result) == [STUCK, STUCK] and result.stuck == 2
    assert "1 job(s) not terminal" in str(result.violations[0])
    assert "settlement 2 is submitted" in str(result.violations[1])


def test_after_the_drain_an_open_lease_is_stuck() -> None:
    runs, snapshot = _world()
    snapshot["leases"].append(_lease(30, 2, T0 + 20, None))

    assert STUCK in _kinds(_check(runs, snapshot, final=True))
    assert STUCK not in _kinds(_check(runs, snapshot, final=False))


def test_the_table_counts_each_phase_and_totals() -> None:
    runs, snapshot = _world()
    first, second = Phase("baseline", T0 - 5, T0 + 5), Phase("worker-kill", T0 + 5, T0 + 30)
    first.checkpoint = _check(runs, snapshot)
    second.checkpoint = _check(runs, snapshot, ledger_ok=False, output="- x")

    table = invariants.rows([first, second], snapshot, [])
    text = invariants.render(table)

    assert [row[0] for row in table] == ["baseline", "worker-kill", "total"]
    # Jobs count where they were submitted (both in the baseline), leases where they ended.
    assert table[0][1:5] == ["2", "1", "0", "0"] and table[1][1:3] == ["0", "1"] and table[0][8] == "yes"
    assert table[1][8] == "NO" and table[2][8] == "NO"
    assert table[2][5] == "6" and table[2][6] == "6" and table[2][7] == "+0"
    assert text.splitlines()[0].startswith("fault")
