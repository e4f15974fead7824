"""A job's checkpoint directory packed, restored and described to the job (gpgpu_agent.checkpoint),
and moved over HTTP (HttpTransport.checkpoint_upload/download): each test tries a way a hostile
job, or a hostile archive, could make the agent read, write or fetch what it must not."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gpgpu_agent import checkpoint
from gpgpu_agent.checkpoint import CheckpointError, pack, suggested_interval_s, unpack, write_status
from gpgpu_agent.protocols import Rejected, TransportUnavailable
from gpgpu_agent.transport import HttpTransport

MB = 1024 * 1024


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "lease-1"
    path.mkdir()
    return path


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
        if not p.is_symlink()
    }


# --- pack and unpack ----------------------------------------------------------------------------


def test_a_checkpoint_packed_on_one_machine_is_restored_whole_on_another(work: Path, tmp_path: Path) -> None:
    ckpt = work / "ckpt"
    (ckpt / "epochs").mkdir(parents=True)
    (ckpt / "model.pt").write_bytes(os.urandom(100_000))
    (ckpt / "epochs" / "7.json").write_text('{"epoch": 7}')
    (ckpt / "empty").mkdir()
    packed = pack(work, "/work/ckpt", tmp_path / "out.tar", max_bytes=MB)
    assert packed is not None
    assert packed.files == 2
    assert packed.sha256 == hashlib.sha256((tmp_path / "out.tar").read_bytes()).hexdigest()

    other = tmp_path / "lease-2"
    other.mkdir()
    assert unpack(packed.path, other, "/work/ckpt", max_bytes=MB, owner=None) == 2
    assert _tree(other / "ckpt") == _tree(ckpt)


def test_no_checkpoint_directory_packs_nothing(work: Path, tmp_path: Path) -> None:
    assert pack(work, "/work/ckpt", tmp_path / "out.tar", max_bytes=MB) is None
    assert not (tmp_path / "out.tar").exists()


def test_a_link_in_the_checkpoint_is_left_out_not_followed(work: Path, tmp_path: Path) -> None:
    secret = tmp_path / "agent-secret"
    secret.write_text("the machine's credential")
    ckpt = work / "ckpt"
    ckpt.mkdir()
    (ckpt / "steal").symlink_to(secret)
    (ckpt / "steal-dir").symlink_to(tmp_path)
    (ckpt / "ok").write_text("weights")
    packed = pack(work, "/work/ckpt", tmp_path / "out.tar", max_bytes=MB)
    assert packed is not None
    assert packed.skipped == 2
    with tarfile.open(packed.path) as tar:
        assert tar.getnames() == ["ok"]
        assert b"credential" not in packed.path.read_bytes()


def test_a_file_hard_linked_from_outside_the_checkpoint_is_left_out(work: Path, tmp_path: Path) -> None:
    secret = tmp_path / "agent-secret"
    secret.write_text("the machine's credential")
    ckpt = work / "ckpt"
    ckpt.mkdir()
    os.link(secret, ckpt / "innocent.pt")
    packed = pack(work, "/work/ckpt", tmp_path / "out.tar", max_bytes=MB)
    assert packed is not None
    assert (packed.files, packed.skipped) == (0, 1)
    assert b"credential" not in packed.path.read_bytes()


@pytest.mark.parametrize("where", ["ckpt", "parent"])
def test_a_checkpoint_directory_replaced_by_a_link_is_refused(work: Path, tmp_path: Path, where: str) -> None:
    outside = tmp_path / "agent-state"
    (outside / "ckpt").mkdir(parents=True)
    (outside / "ckpt" / "signing.key").write_text("0xsecret")
    if where == "ckpt":
        (work / "ckpt").symlink_to(outside / "ckpt")
        path = "/work/ckpt"
    else:
        (work / "run").symlink_to(outside)
        path = "/work/run/ckpt"
    with pytest.raises(CheckpointError, match="not a directory"):
        pack(work, path, tmp_path / "out.tar", max_bytes=MB)
    assert not (tmp_path / "out.tar").exists()


def test_a_fifo_or_device_in_the_checkpoint_is_left_out_without_hanging(work: Path, tmp_path: Path) -> None:
    ckpt = work / "ckpt"
    ckpt.mkdir()
    os.mkfifo(ckpt / "pipe")  # opening it to read would block for ever
    (ckpt / "ok").write_text("x")
    packed = pack(work, "/work/ckpt", tmp_path / "out.tar", max_bytes=MB)
    assert packed is not None
    assert packed.skipped == 1


def test_a_checkpoint_over_its_limit_is_refused_and_nothing_is_left(work: Path, tmp_path: Path) -> None:
    ckpt = work / "ckpt"
    ckpt.mkdir()
    (ckpt / "big").write_bytes(b"\0" * (2 * MB))
    with pytest.raises(CheckpointError, match="limit"):
        pack(work, "/work/ckpt", tmp_path / "out.tar", max_bytes=MB)
    assert not (tmp_path / "out.tar").exists()


def test_a_directory_of_too_many_files_is_refused_while_it_is_listed(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that made millions of files in one directory had them all listed and sorted in the
    agent's memory before the count of entries stopped it."""
    monkeypatch.setattr(checkpoint, "MAX_ENTRIES", 100)
    crowded = work / "ckpt"
    crowded.mkdir()
    for i in range(2000):
        (crowded / f"f{i}").touch()
    listed = []
    scandir = os.scandir

    def counted(fd: int) -> Any:
        class Entries:
            def __enter__(self) -> Iterator[os.DirEntry[str]]:
                self.it = scandir(fd)
                return (listed.append(e) or e for e in self.it)

            def __exit__(self, *exc: object) -> None:
                self.it.close()

            def __iter__(self) -> Iterator[os.DirEntry[str]]:
                with self as entries:
                    yield from entries

        return Entries()

    monkeypatch.setattr(checkpoint.os, "scandir", counted)

    with pytest.raises(CheckpointError, match="more than 100 entries"):
        pack(work, "/work/ckpt", tmp_path / "c.tar", max_bytes=MB)
    assert len(listed) <= 101


def test_long_names_cannot_make_the_archive_outgrow_its_limit_before_it_is_refused(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each header was charged three blocks, but a path of long names takes a PAX header of up to
    16 KB: a checkpoint of empty files wrote several times its limit of archive to the agent's
    disk before the last check refused it."""
    deep = work / "ckpt" / Path(*(["d" * 250] * 12))  # as deep as a path may name here
    deep.mkdir(parents=True)
    for i in range(400):
        (deep / f"f{i}").touch()
    written: list[int] = []
    digest = checkpoint.file_digest
    monkeypatch.setattr(checkpoint, "file_digest", lambda path: (written.append(path.stat().st_size), digest(path))[1])

    with pytest.raises(CheckpointError, match="larger than its limit"):
        pack(work, "/work/ckpt", tmp_path / "c.tar", max_bytes=MB)
    assert all(size <= MB for size in written)
    assert not (tmp_path / "c.tar").exists()


def test_set_id_bits_are_not_carried(work: Path, tmp_path: Path) -> None:
    ckpt = work / "ckpt"
    ckpt.mkdir()
    (ckpt / "tool").write_text("#!/bin/sh\n")
    os.chmod(ckpt / "tool", 0o4755)  # noqa: S103 - the set-uid bit the test expects dropped
    packed = pack(work, "/work/ckpt", tmp_path / "out.tar", max_bytes=MB)
    assert packed is not None
    other = tmp_path / "lease-2"
    other.mkdir()
    unpack(packed.path, other, "/work/ckpt", max_bytes=MB, owner=None)
    assert not os.stat(other / "ckpt" / "tool").st_mode & (stat.S_ISUID | stat.S_ISGID)


def _archive(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


@pytest.mark.parametrize(
    "member",
    [
        (_file("/etc/cron.d/evil"), b"* * * * * root sh"),
        (_file("../../outside"), b"x"),
        (_file("a/../../outside"), b"x"),
        (_link("link", "/etc/passwd", tarfile.SYMTYPE), None),
        (_link("hard", "/etc/shadow", tarfile.LNKTYPE), None),
        (_device("null"), None),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink", "hardlink", "device"],
)
def test_a_hostile_archive_is_refused_and_writes_nothing_outside(
    member: tuple[tarfile.TarInfo, bytes | None], work: Path, tmp_path: Path
) -> None:
    archive = _archive(tmp_path / "evil.tar", member)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError):
        unpack(archive, work, "/work/ckpt", max_bytes=MB, owner=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not any(p.is_symlink() for p in work.rglob("*"))


def _jumping_archive(members: int, limit: int) -> bytes:
    """An archive of at most `limit` bytes whose regular members each end in a member of a
    negative size (base-256): Python 3.11's tarfile then reads its next header from earlier bytes,
    so every member's content is the whole archive's, over and over."""

    def header(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
        buf[124:136] = bytes([0o377 if size < 0 else 0o200]) + (size % 256**11).to_bytes(11, "big")
        buf[148:156] = b"        "
        buf[148:156] = b"%06o\x00 " % sum(buf)
        return bytes(buf)

    block = 512
    content = limit - block * (2 * members + 4)
    content -= content % block
    blob = bytearray(2 * block * members + content + 2 * block)
    for j in range(members):
        blob[block * j : block * (j + 1)] = header(f"f{j}", content)
    for j in range(members - 1):
        at = block * (j + 1) + content
        blob[at : at + block] = header(f"hop{j}", block * (j + 1) - (at + block))
    return bytes(blob)


def test_an_archive_whose_members_jump_back_cannot_write_past_its_limit(work: Path, tmp_path: Path) -> None:
    """A forged checkpoint (any machine can store one for a job it holds) is restored on the
    next machine the job goes to: 64 KiB of it wrote 880 KiB there, and more members more."""
    archive = tmp_path / "jumps.tar"
    archive.write_bytes(_jumping_archive(40, 64 * 1024))
    assert archive.stat().st_size <= 64 * 1024

    with pytest.raises(CheckpointError, match="is not where a tar member can be"):
        unpack(archive, work, "/work/ckpt", max_bytes=64 * 1024, owner=None)
    assert sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) <= 64 * 1024


def test_a_pax_header_of_digits_is_refused_before_tarfile_spends_minutes_on_it(work: Path, tmp_path: Path) -> None:
    """tarfile before Python 3.11.10 parses such a header in quadratic time (CVE-2024-6232): a
    forged checkpoint of 200 KB held the restoring agent's poll loop for about 25 s."""
    import time

    info = tarfile.TarInfo("pax")
    info.type = tarfile.XHDTYPE
    records = b"1" * 200_000
    info.size = len(records)
    archive = tmp_path / "digits.tar"
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(records))
        tar.addfile(_file("after"), io.BytesIO(b""))

    started = time.process_time()
    with pytest.raises(CheckpointError, match="not well formed"):
        unpack(archive, work, "/work/ckpt", max_bytes=MB, owner=None)
    assert time.process_time() - started < 1


def test_a_checkpoint_with_the_deepest_longest_names_packs_and_restores(work: Path, tmp_path: Path) -> None:
    deep = work / "ckpt" / Path(*(["d" * 250] * 12))
    deep.mkdir(parents=True)
    (deep / ("f" * 250)).write_bytes(b"kept")
    archive = tmp_path / "deep.tar"
    pack(work, "/work/ckpt", archive, max_bytes=MB)
    other = tmp_path / "other"
    other.mkdir()

    assert unpack(archive, other, "/work/ckpt", max_bytes=MB, owner=None) == 1
    assert (other / "ckpt" / Path(*(["d" * 250] * 12)) / ("f" * 250)).read_bytes() == b"kept"


def test_an_archive_with_a_name_twice_is_refused(work: Path, tmp_path: Path) -> None:
    archive = _archive(tmp_path / "dup.tar", (_file("a"), b"1"), (_file("a"), b"2"))
    with pytest.raises(CheckpointError, match="twice"):
        unpack(archive, work, "/work/ckpt", max_bytes=MB, owner=None)


def test_an_archive_with_more_content_than_the_limit_is_refused(work: Path, tmp_path: Path) -> None:
    archive = _archive(tmp_path / "big.tar", (_file("a"), b"x" * 600), (_file("b"), b"y" * 600))
    with pytest.raises(CheckpointError, match="more than"):
        unpack(archive, work, "/work/ckpt", max_bytes=1000, owner=None)


def test_garbage_instead_of_an_archive_is_refused(work: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        unpack(junk, work, "/work/ckpt", max_bytes=MB, owner=None)


@pytest.mark.parametrize("path", ["/work", "/etc", "/work/../etc", "/work/a/../../b", "work/ckpt", "/work/./a"])
def test_a_checkpoint_path_outside_work_in_an_order_is_refused(path: str) -> None:
    with pytest.raises(CheckpointError):
        checkpoint.relative_parts(path)


def test_a_leases_checkpoint_is_remembered_across_an_agent_restart() -> None:
    from datetime import UTC, datetime

    from gpgpu_agent.leases import TrackedLease
    from gpgpu_agent.types import CheckpointSpec

    spec = CheckpointSpec("/work/ckpt", 1 << 20, "leases/7/checkpoint", None, "", 0, 2)
    now = datetime.now(UTC).replace(microsecond=0)
    lease = TrackedLease(7, ("GPU-a",), 3600.0, now, now, job_id=70, checkpoint=spec, checkpoint_interval_s=600)
    again = TrackedLease.from_json(json.loads(json.dumps(lease.to_json())))
    assert (again.job_id, again.checkpoint, again.checkpoint_interval_s) == (70, spec, 600)


# --- what the job is told -------------------------------------------------------------------------


def test_the_status_file_replaces_a_link_the_job_planted_and_never_writes_through_it(
    work: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("the owner's file")
    (work / checkpoint.STATUS_FILE).symlink_to(victim)
    (work / f"{checkpoint.STATUS_FILE}.tmp").symlink_to(victim)
    write_status(work, {"predicted_idle_s": 3600})
    assert victim.read_text() == "the owner's file"
    status = work / checkpoint.STATUS_FILE
    assert not status.is_symlink()
    assert json.loads(status.read_text()) == {"predicted_idle_s": 3600}
    assert stat.S_IMODE(status.stat().st_mode) == 0o644


def test_the_suggested_interval_follows_the_forecast_and_never_exceeds_the_promise() -> None:
    assert suggested_interval_s(predicted_idle_s=4 * 3600, promised_s=None) == 3600
    assert suggested_interval_s(predicted_idle_s=1200, promised_s=None) == 300
    assert suggested_interval_s(predicted_idle_s=30, promised_s=None) == 60
    assert suggested_interval_s(predicted_idle_s=4 * 3600, promised_s=900) == 900
    assert suggested_interval_s(predicted_idle_s=None, promised_s=None) == 600
    assert suggested_interval_s(predicted_idle_s=None, promised_s=120) == 120


# --- over HTTP ----------------------------------------------------------------------------------


class Store:
    """A stand-in for the marketplace and an S3-like store: serves `blob` on GET, keeps PUTs."""

    def __init__(self) -> None:
        self.blob = b""
        self.headers: dict[str, str] = {}
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.put_body = b""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen.append(("GET", self.path, dict(self.headers)))
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.blob)))
                self.end_headers()
                self.wfile.write(outer.blob)

            def do_PUT(self) -> None:
                outer.seen.append(("PUT", self.path, dict(self.headers)))
                outer.put_body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = b"{}"
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.seen.append(("POST", self.path, dict(self.headers)))
                outer.posted.append((self.path, json.loads(body)))
                answer = json.dumps(outer.answers.get(self.path.rsplit("/", 1)[-1], {})).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        # What POST .../upload and .../commit answer (the marketplace's direct-upload steps).
        self.answers: dict[str, dict[str, Any]] = {}
        self.posted: list[tuple[str, Any]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store()
    yield s
    s.server.shutdown()
    s.server.server_close()


def test_the_agent_apis_own_path_gets_the_credential_and_a_stores_url_never_does(store: Store, tmp_path: Path) -> None:
    transport = HttpTransport(store.url, credential="gpm_secret_credential_1234567890")
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"archive")
    digest = hashlib.sha256(b"archive").hexdigest()
    transport.checkpoint_upload("leases/5/checkpoint", archive, size=7, sha256=digest)
    transport.checkpoint_upload(f"{store.url}/bucket/key?X-Amz-Signature=abc", archive, size=7, sha256=digest)
    (_, own_path, own), (_, presigned_path, presigned) = store.seen
    assert own_path == "/api/agent/v1/leases/5/checkpoint"
    assert own["Authorization"] == "Machine gpm_secret_credential_1234567890"
    assert own["X-Checkpoint-SHA256"] == digest
    assert presigned_path.startswith("/bucket/key")
    assert "Authorization" not in presigned
    assert store.put_body == b"archive"


@pytest.mark.parametrize("direct", [False, True])
def test_an_empty_archive_is_sent_with_its_length_not_chunked(store: Store, tmp_path: Path, direct: bool) -> None:
    """requests sends an empty file chunked: beside a Content-Length of 0 a store may wait for
    chunks that never come."""
    transport = HttpTransport(store.url, credential="gpm_secret_credential_1234567890")
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    _direct(store, headers={"Content-Type": "application/x-tar", "Content-Length": "0"})
    transport.checkpoint_upload(
        "leases/5/checkpoint", empty, size=0, sha256=hashlib.sha256(b"").hexdigest(), direct=direct
    )
    (put,) = [headers for method, _, headers in store.seen if method == "PUT"]
    assert put["Content-Length"] == "0"
    assert "Transfer-Encoding" not in put
    assert store.put_body == b""


def _direct(store: Store, **answer: Any) -> None:
    store.answers["upload"] = {
        "url": f"{store.url}/bucket/job-1/k.tar?X-Amz-Signature=abc",
        "headers": {"Content-Type": "application/x-tar", "Content-Length": "7", "x-amz-checksum-sha256": "b64"},
        "token": "signed-by-the-marketplace",
        "expires_s": 120,
    } | answer
    store.answers["commit"] = {"lease_id": 5, "size": 7, "sha256": "x"}


def test_a_direct_upload_asks_for_a_url_puts_to_the_store_without_the_credential_and_commits(
    store: Store, tmp_path: Path
) -> None:
    transport = HttpTransport(store.url, credential="gpm_secret_credential_1234567890")
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"archive")
    digest = hashlib.sha256(b"archive").hexdigest()
    _direct(store)
    transport.checkpoint_upload("leases/5/checkpoint", archive, size=7, sha256=digest, direct=True)
    (begin_method, begin_path, begin_headers), (put_method, put_path, put_headers), (_, commit_path, commit_headers) = (
        store.seen
    )
    assert (begin_method, begin_path) == ("POST", "/api/agent/v1/leases/5/checkpoint/upload")
    assert begin_headers["Authorization"] == "Machine gpm_secret_credential_1234567890"
    assert (put_method, put_path) == ("PUT", "/bucket/job-1/k.tar?X-Amz-Signature=abc")
    assert "Authorization" not in put_headers
    assert put_headers["x-amz-checksum-sha256"] == "b64"
    assert store.put_body == b"archive"
    assert commit_path == "/api/agent/v1/leases/5/checkpoint/commit"
    assert commit_headers["Authorization"] == "Machine gpm_secret_credential_1234567890"
    assert [body for _, body in store.posted] == [{"size": 7, "sha256": digest}, {"token": "signed-by-the-marketplace"}]


@pytest.mark.parametrize(
    "answer",
    [
        {"url": "leases/9/checkpoint"},  # the agent API itself: the credential would go with it
        {"url": "file:///etc/passwd"},
        {"headers": {"Authorization": "Bearer stolen"}},  # not a header a store's URL needs
        {"headers": {"Host": "elsewhere"}},
        {"headers": {"Content-Length": "70000000"}},  # signed for another size than the archive's
        {"headers": {"content-length": "70000000"}},
        {"token": None},
    ],
)
def test_a_direct_upload_answer_that_would_misuse_the_agent_is_refused_before_any_put(
    store: Store, tmp_path: Path, answer: dict[str, Any]
) -> None:
    transport = HttpTransport(store.url, credential="gpm_secret_credential_1234567890")
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"archive")
    _direct(store, **answer)
    with pytest.raises((Rejected, TransportUnavailable)):
        transport.checkpoint_upload("leases/5/checkpoint", archive, size=7, sha256="0" * 64, direct=True)
    assert [method for method, _, _ in store.seen] == ["POST"]  # nothing sent but the request for a URL


@pytest.mark.parametrize(
    "url", ["../../admin/", "/api/v1/jobs/", "leases/5/../../x", "file:///etc/passwd", "ftp://h/x"]
)
def test_a_checkpoint_url_that_leaves_the_agent_api_or_http_is_refused(url: str, tmp_path: Path) -> None:
    transport = HttpTransport("http://127.0.0.1:9", credential="gpm_secret_credential_1234567890")
    with pytest.raises(Rejected):
        transport.checkpoint_download(url, tmp_path / "x", size=1, sha256="0" * 64, max_bytes=10)


def test_a_download_that_is_not_the_archive_named_is_refused_and_not_kept(store: Store, tmp_path: Path) -> None:
    transport = HttpTransport(store.url, credential="gpm_secret_credential_1234567890")
    store.blob = b"replaced by someone"
    dest = tmp_path / "restore.tar"
    with pytest.raises(CheckpointError, match="SHA-256"):
        transport.checkpoint_download("leases/5/checkpoint", dest, size=len(store.blob), sha256="0" * 64, max_bytes=MB)
    assert not dest.exists()
    # Longer than announced: cut off, not written on.
    store.blob = b"x" * 5000
    with pytest.raises(CheckpointError, match="larger"):
        transport.checkpoint_download(
            "leases/5/checkpoint", dest, size=100, sha256=hashlib.sha256(b"x" * 100).hexdigest(), max_bytes=MB
        )
    assert not dest.exists()


def test_a_download_announced_over_the_limit_is_not_fetched(store: Store, tmp_path: Path) -> None:
    transport = HttpTransport(store.url, credential="gpm_secret_credential_1234567890")
    with pytest.raises(CheckpointError):
        transport.checkpoint_download("leases/5/checkpoint", tmp_path / "x", size=MB + 1, sha256="0" * 64, max_bytes=MB)
    assert store.seen == []
