"""The real agent (gpgpu_agent, in simulation mode: the fake NVIDIA driver beneath pynvml, real
processes in the real process sandbox) against a live marketplace over HTTP: the whole path, the
owner coming back, checkpoints, an agent restart, the machine's secrets (tests/agent_market.py
says how a test drives them; the marketplace's minute-long outage is tests/test_agent_outage.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from django.utils import timezone

from gpgpu_agent import cli
from gpgpu_agent.credentials import load_credential
from gpgpu_agent.protocol import usage_signature_valid, wire_usage_struct
from jobs import checkpoints
from jobs.models import Checkpoint, Event, Lease, LogChunk, UsageReport
from marketplace.matching import match_cycle
from providers.models import Machine
from tests.agent_market import DEADLINE_S, OWNER_PID, SANDBOX_PYTHON, Market, alive, host_pid, job_command, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]


# --- (a) the whole path -----------------------------------------------------------------------


def test_registered_agent_runs_a_process_job_and_reports_it_succeeded(market: Market, tmp_path: Path) -> None:
    market.register()
    market.start_agent()

    job = market.submit(job_command("agent-e2e-success", 1.5), key="agent-e2e-success")
    job = market.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))

    assert job["status"] == "succeeded", job
    assert job["exit_code"] == 0
    leases = market.call("GET", f"/api/v1/jobs/{job['id']}/leases/").json()["results"]
    assert [lease["end_reason"] for lease in leases] == ["succeeded"]
    lease = market.call("GET", f"/api/v1/leases/{leases[0]['id']}/").json()
    # The command really ran, on the leased GPU only, and its output came back.
    assert "training 0" in lease["log_tail"]
    market.stop_agent()
    # Usage arrived, signed by the key the agent registered, never more than the lease's time.
    machine = Machine.objects.get(pk=load_credential(market.state_dir / "credential.json").machine_id)
    reports = list(UsageReport.objects.filter(lease_id=lease["id"]))
    assert reports
    for report in reports:
        struct = wire_usage_struct(lease["id"], report.payload)
        assert usage_signature_valid(struct, report.signature, address=machine.signing_address)
        assert report.gpu_seconds <= (report.period_end - report.period_start).total_seconds()


def test_cancelling_a_running_job_stops_its_process_on_the_machine(market: Market, tmp_path: Path) -> None:
    market.register()
    market.start_agent()
    job = market.submit(job_command("agent-e2e-cancel", 300), key="agent-e2e-cancel")
    market.wait_for(job["id"], lambda j: j["status"] == "running" and host_pid("agent-e2e-cancel") is not None)
    pid = host_pid("agent-e2e-cancel")
    assert pid is not None

    response = market.call("POST", f"/api/v1/jobs/{job['id']}/cancel/")

    assert response.status_code == 200, response.text
    # The agent hears of it on its next heartbeat and stops the process.
    wait_until(lambda: not alive(pid), DEADLINE_S, "the cancelled job's process being stopped")
    market.wait_for(job["id"], lambda j: j["status"] == "cancelled")
    leases = market.call("GET", f"/api/v1/jobs/{job['id']}/leases/").json()["results"]
    wait_until(
        lambda: market.call("GET", f"/api/v1/leases/{leases[0]['id']}/").json()["status"] == "ended",
        DEADLINE_S,
        "the cancelled lease ending",
    )
    assert market.call("GET", f"/api/v1/leases/{leases[0]['id']}/").json()["end_reason"] == "cancelled"
    market.stop_agent()


# --- (b) the owner comes back -----------------------------------------------------------------


def test_owner_process_on_the_leased_gpu_stops_the_rental_within_ten_seconds(market: Market, tmp_path: Path) -> None:
    market.register()
    market.start_agent()
    job = market.submit(job_command("agent-e2e-reclaim", 300), key="agent-e2e-reclaim")
    market.wait_for(job["id"], lambda j: j["status"] == "running" and host_pid("agent-e2e-reclaim") is not None)
    pid = host_pid("agent-e2e-reclaim")
    assert pid is not None

    # Given a running rental, when the owner's process appears on its GPU …
    appeared = timezone.now()
    market.fake.add_process(0, OWNER_PID, 2000, kind="graphics")
    seconds = wait_until(lambda: not alive(pid), 15, "the rental being stopped")
    print(f"owner reclaim: rental stopped {seconds:.2f} s after the owner's process appeared")

    # … then the rental is gone within the bound, and billing ends when the owner came back.
    assert seconds <= 10, f"the rental ran {seconds:.1f} s after the owner came back"
    wait_until(lambda: market.lease_of(job["id"]).status == Lease.Status.ENDED, 15, "the lease ending")
    lease = market.lease_of(job["id"])
    assert lease.end_reason == "preempted_by_owner"
    assert abs((lease.ended_at - appeared).total_seconds()) <= 2.0
    job = market.call("GET", f"/api/v1/jobs/{job['id']}/").json()
    assert job["status"] == "pending"  # interruptible: back in the queue
    # And the GPU is not offered again while the owner is on it.
    with market.turn:
        match_cycle()
    assert market.call("GET", f"/api/v1/jobs/{job['id']}/").json()["status"] == "pending"


# --- (b2) a preempted job resumes from its checkpoint on another machine --------------------------

# A training loop as the README shows it: resumes from its checkpoint, saves it every few steps
# and on SIGTERM (within GPGPU_STOP_GRACE_S), and sums 1..STEPS however often it was interrupted.
CHECKPOINTED_JOB = """
import json, os, signal, sys, time
ckpt = os.environ["GPGPU_CHECKPOINT_DIR"]
state_path = os.path.join(ckpt, "state.json")
os.makedirs(ckpt, exist_ok=True)
state = {"step": 0, "total": 0}
if os.path.exists(state_path):
    with open(state_path) as f:
        state = json.load(f)
with open(os.environ["GPGPU_LEASE_INFO"]) as f:
    info = json.load(f)
print("resume", os.environ["GPGPU_RESUME_COUNT"], "from step", state["step"], "grace",
      os.environ["GPGPU_STOP_GRACE_S"], "interval", info["suggested_checkpoint_interval_s"], flush=True)
stopping = False
def on_term(signum, frame):
    global stopping
    stopping = True
signal.signal(signal.SIGTERM, on_term)
def save():
    tmp = state_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, state_path)
while state["step"] < 60:
    state["step"] += 1
    state["total"] += state["step"]
    print("step", state["step"], flush=True)
    if stopping or state["step"] % 5 == 0:
        save()
    if stopping:
        print("checkpointed at step", state["step"], flush=True)
        sys.exit(143)
    time.sleep(0.2)
print("result", state["total"], flush=True)
"""


@pytest.mark.parametrize("store", ["files", "s3"])
def test_a_job_preempted_by_its_owner_resumes_from_its_checkpoint_on_another_machine_and_finishes(
    market: Market, live_server: Any, settings: Any, tmp_path: Path, store: str, request: Any, monkeypatch: Any
) -> None:
    """With local files the archive goes through the marketplace; with an S3 store (a real S3
    endpoint) straight from agent to store and back, by pre-signed URLs: the marketplace's own
    upload path is closed for that run, so a checkpoint that reached it would fail the test."""
    bucket = None
    if store == "s3":
        bucket = request.getfixturevalue("s3_store")

        def through_the_marketplace(**kwargs: Any) -> None:
            raise AssertionError("the agent uploaded through the marketplace, not to the store")

        monkeypatch.setattr(checkpoints, "checkpoint_upload", through_the_marketplace)
    else:
        settings.STORAGES = {
            **settings.STORAGES,
            "checkpoints": {
                "BACKEND": "django.core.files.storage.FileSystemStorage",
                "OPTIONS": {"location": str(tmp_path / "checkpoints")},
            },
        }
    # Machine B, another provider's, online before A is preempted.
    other = Market(live_server.url, tmp_path / "b")
    other.turn = market.turn
    try:
        market.register()
        market.start_agent()
        job = market.submit(
            [SANDBOX_PYTHON, "-c", CHECKPOINTED_JOB, "agent-e2e-checkpoint"],
            key="agent-e2e-checkpoint",
            checkpoint_dir="/work/ckpt",
        )
        market.wait_for(job["id"], lambda j: j["status"] == "running")
        first = market.lease_of(job["id"])
        wait_until(lambda: _job_output(job["id"]).count("step ") >= 12, DEADLINE_S, "the job's first steps")
        other.register()

        # The owner of machine A comes back: the job gets SIGTERM, writes its checkpoint, and the
        # agent uploads it before the lease's end is reported.
        owner_back = timezone.now()
        market.fake.add_process(0, OWNER_PID, 2000, kind="graphics")
        wait_until(lambda: market.lease_of(job["id"]).status == Lease.Status.ENDED, DEADLINE_S, "the lease ending")
        with market.turn:
            first.refresh_from_db()
            assert first.end_reason == "preempted_by_owner", first.end_detail
            stored = Event.objects.filter(job_id=job["id"], kind="checkpoint.stored").get()
            kept = Checkpoint.objects.get(job_id=job["id"])
        assert stored.lease_id == first.pk
        if bucket is not None:
            assert bucket.keys() == [kept.storage_key]
        # (One simulated driver per process: A's agent makes way for B's, another provider's machine.)
        market.stop_agent()
        other.start_agent()

        done = market.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        assert done["status"] == "succeeded", done
        second = market.lease_of(job["id"])
        assert second.machine_id != first.machine_id
        assert second.started_at is not None
        # The figures (pytest -s): the archive, owner back -> stored (the job's SIGTERM grace,
        # packing, upload), placed -> started on B (the fetch and the restore before it runs).
        print(
            f"checkpoint via {store}: {stored.detail['size']} bytes; owner back -> stored "
            f"{(stored.created_at - owner_back).total_seconds():.2f} s; placed -> started on B "
            f"{(second.started_at - second.created_at).total_seconds():.2f} s"
        )
        output = _job_output(job["id"])
        print(*(line for line in output.splitlines() if not line.startswith("step ")), sep="\n")
        # It ran on, from the step it had saved, and got the right answer: 1 + 2 + … + 60.
        assert "resume 0 from step 0" in output
        saved = int(output.split("checkpointed at step ")[1].split()[0])
        assert f"resume 1 from step {saved}" in output
        assert saved >= 12
        assert "result 1830" in output
        # Its checkpoint is gone with the job.
        with market.turn:
            assert not Checkpoint.objects.filter(job_id=job["id"]).exists()
        assert not any(p.is_file() for p in (tmp_path / "checkpoints").rglob("*"))
        if bucket is not None:
            assert bucket.keys() == []
    finally:
        other.stop_agent()
        other.session.close()
        shutil.rmtree(other.rentals_dir, ignore_errors=True)


def test_a_job_cancelled_keeping_its_checkpoint_leaves_its_renter_the_archive_of_its_state(
    market: Market, settings: Any, tmp_path: Path
) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "checkpoints": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "checkpoints")},
        },
    }
    market.register()
    market.start_agent()
    job = market.submit(
        [SANDBOX_PYTHON, "-c", CHECKPOINTED_JOB, "agent-e2e-keep"], key="agent-e2e-keep", checkpoint_dir="/work/ckpt"
    )
    market.wait_for(job["id"], lambda j: j["status"] == "running")
    wait_until(lambda: _job_output(job["id"]).count("step ") >= 8, DEADLINE_S, "the job's first steps")

    # The renter stops it, keeping its state: SIGTERM, the job saves, the agent uploads.
    cancelled = market.call("POST", f"/api/v1/jobs/{job['id']}/cancel/", json={"keep_checkpoint": True})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    wait_until(lambda: market.lease_of(job["id"]).status == Lease.Status.ENDED, DEADLINE_S, "the lease ending")
    assert market.lease_of(job["id"]).end_reason == "cancelled"

    archive = market.call("GET", f"/api/v1/jobs/{job['id']}/checkpoint/")
    assert archive.status_code == 200, archive.text
    assert archive.headers["X-Checkpoint-SHA256"] == hashlib.sha256(archive.content).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        member = tar.extractfile("state.json")
        assert member is not None
        state = json.load(member)
    saved = int(_job_output(job["id"]).split("checkpointed at step ")[1].split()[0])
    assert state["step"] == saved >= 8
    assert state["total"] == saved * (saved + 1) // 2
    assert market.call("GET", f"/api/v1/jobs/{job['id']}/").json()["checkpoint"]["kept_until"] is not None


def _job_output(job_id: int) -> str:
    return "".join(chunk.text for chunk in LogChunk.objects.filter(job_id=job_id).order_by("pk"))


# --- (d) the agent restarts mid-lease --------------------------------------------------------------


def test_lease_keeps_running_through_an_agent_restart_and_succeeds(market: Market, tmp_path: Path) -> None:
    market.register()
    market.start_agent()
    job = market.submit(job_command("agent-e2e-restart", 8, message="still here"), key="agent-e2e-restart")
    market.wait_for(job["id"], lambda j: j["status"] == "running" and host_pid("agent-e2e-restart") is not None)
    pid = host_pid("agent-e2e-restart")
    assert pid is not None

    market.stop_agent()
    assert alive(pid), "stopping the agent killed the rental"
    time.sleep(1.0)
    market.start_agent()

    job = market.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled", "pending"))
    assert job["status"] == "succeeded", job
    lease = market.lease_of(job["id"])
    assert lease.end_reason == "succeeded"
    assert "still here 0" in lease.log_tail


# --- (e) a renter's job against the machine's secrets; the provider rotates and revokes -----------


def test_a_job_cannot_steal_the_machine_credential_or_signing_key(market: Market) -> None:
    market.register()
    market.start_agent()
    credential = load_credential(market.state_dir / "credential.json").credential
    key_text = (market.state_dir / "signing.key").read_text()
    script = (
        "import os\n"
        "for path in ('../../credential.json', '../../signing.key', '../credential.json', "
        f"{str(market.state_dir / 'credential.json')!r}, {str(market.state_dir / 'signing.key')!r}):\n"
        "    try:\n"
        "        print('READ', open(path).read())\n"
        "    except OSError as exc:\n"
        "        print('refused', path, type(exc).__name__)\n"
    )
    job = market.submit([SANDBOX_PYTHON, "-c", script], key="agent-e2e-steal")

    job = market.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))

    lease = market.lease_of(job["id"])
    assert lease.log_tail.count("refused") == 5, lease.log_tail
    assert "READ" not in lease.log_tail
    assert credential not in lease.log_tail and key_text not in lease.log_tail
    shipped = "".join(LogChunk.objects.filter(lease=lease).values_list("text", flat=True))
    assert shipped.count("refused") == 5 and "READ" not in shipped, shipped


def test_a_credential_rotated_on_the_machine_keeps_it_renting(market: Market) -> None:
    market.register()
    market.start_agent()
    old = load_credential(market.state_dir / "credential.json").credential

    code = cli.main(["rotate-credential", "--state-dir", str(market.state_dir), "--new-signing-key"])

    assert code == 0
    new = load_credential(market.state_dir / "credential.json").credential
    assert new != old
    refused = requests.post(
        f"{market.url}/api/agent/v1/heartbeat",
        json={"gpus": []},
        headers={"Authorization": f"Machine {old}"},
        timeout=10,
    )
    assert refused.status_code == 401 and refused.json()["code"] == "credential_revoked"
    # The running agent takes the new credential (and signs with the new key) and keeps renting.
    job = market.submit(job_command("agent-e2e-rotated", 0.5), key="agent-e2e-rotated")
    job = market.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job
    assert market.agent is not None and market.agent.revoked is None


def test_a_machine_revoked_by_its_provider_stops_its_rental_and_its_agent_exits(market: Market) -> None:
    market.register()
    agent = market.start_agent()
    machine_id = load_credential(market.state_dir / "credential.json").machine_id
    job = market.submit(job_command("agent-e2e-revoked", 300), key="agent-e2e-revoked")
    market.wait_for(job["id"], lambda j: j["status"] == "running" and host_pid("agent-e2e-revoked") is not None)
    pid = host_pid("agent-e2e-revoked")
    assert pid is not None
    provider = requests.Session()
    provider.headers["Authorization"] = f"Token {market.provider_token}"

    response = provider.post(
        f"{market.url}/api/v1/machines/{machine_id}/credential/revoke/", json={"reason": "stolen"}, timeout=10
    )

    assert response.status_code == 200, response.text
    # The agent hears 401 credential_revoked, stops the rental and exits, saying why.
    wait_until(lambda: not alive(pid), DEADLINE_S, "the revoked machine's rental being stopped")
    assert market.thread is not None
    market.thread.join(30)
    assert not market.thread.is_alive()
    assert agent.revoked is not None and "revoked" in agent.revoked
    market.agent = market.thread = None
    # The marketplace ended the lease and the job waits for another machine.
    assert market.lease_of(job["id"]).status == Lease.Status.ENDED
    assert market.call("GET", f"/api/v1/jobs/{job['id']}/").json()["status"] == "pending"
