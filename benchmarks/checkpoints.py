"""Checkpoints saved and restored end to end, through the agent's own transport and the
marketplace's own views: how long an upload and a restore take, by size and by store.

For each store and size: a running lease of a job with a `checkpoint_dir`; the agent's
`HttpTransport` uploads an archive of random bytes as the agent does when the owner comes back
(`files`: PUT to the marketplace, which hashes and stores it; `s3`: a pre-signed PUT straight to
the store, then the commit, where the marketplace checks the object); the job is placed again and
the next lease's agent fetches the archive from its start order's `restore_url` (the marketplace
for `files`, a pre-signed GET for `s3`) and checks its SHA-256.

The marketplace runs in this process (Django's WSGI application served by one thread on
127.0.0.1), on a scratch SQLite database unless --database-url names one. The S3 store is moto's
server on 127.0.0.1 unless --s3-endpoint names a real one (MinIO: --s3-endpoint
http://127.0.0.1:9000 --s3-bucket checkpoints --s3-access-key … --s3-secret-key …; the bucket
must exist). moto keeps no checksum of a PUT, so there the commit reads the object back to hash
it (`commit_read_back`); AWS S3 and MinIO answer its HEAD with their own.

    python benchmarks/checkpoints.py --sizes 1,16,128

Prints a line per (store, size) and, last, one JSON line with every row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import _django

MB = 1024 * 1024


class _Server(WSGIServer):
    """One thread serves every request, as a production worker thread does: django-storages
    keeps its S3 client per thread (a new thread per request would build a client, about 0.3 s,
    for each one)."""


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,16,128", help="archive sizes, MiB, comma-separated")
    parser.add_argument("--stores", default="files,s3", help="files, s3 or both (comma-separated)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per (store, size); the median is shown")
    parser.add_argument("--database-url", help="default: a scratch SQLite file")
    parser.add_argument("--s3-endpoint", help="a real S3-compatible endpoint (default: moto's server)")
    parser.add_argument("--s3-bucket", default="checkpoints")
    parser.add_argument("--s3-access-key", default="bench")
    parser.add_argument("--s3-secret-key", default="bench-secret")
    parser.add_argument("--s3-region", default="us-east-1")
    return parser.parse_args()


def _storage(store: str, args: argparse.Namespace, scratch: Path, endpoint: str | None) -> dict[str, Any]:
    if store == "files":
        return {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(scratch / "checkpoints")},
        }
    from tests.s3 import s3_storage

    return s3_storage(
        endpoint=str(endpoint),
        bucket=args.s3_bucket,
        access_key=args.s3_access_key,
        secret_key=args.s3_secret_key,
        region=args.s3_region,
    )


def _round(store: str, size_mib: int, api_url: str, scratch: Path) -> dict[str, Any]:
    from django.conf import settings

    from jobs import checkpoints
    from jobs.models import Checkpoint, Job, Lease
    from jobs.services import lease_end
    from tests.factories import agent_client, gpu_entry, heartbeat, placed_lease

    settings.GPGPU = {**settings.GPGPU, "CHECKPOINT_MAX_BYTES": max(size_mib, 1) * MB + MB}
    archive = scratch / f"archive-{size_mib}.tar"
    with open(archive, "wb") as out:
        for _ in range(size_mib):
            out.write(os.urandom(MB))
    size = archive.stat().st_size
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()

    lease = placed_lease(started=True, interruptible=True, checkpoint_dir="/work/ckpt")
    first = _transport(api_url, lease.machine)
    direct = checkpoints.direct_uploads()
    began = time.perf_counter()
    first.checkpoint_upload(f"leases/{lease.pk}/checkpoint", archive, size=size, sha256=digest, direct=direct)
    upload_s = time.perf_counter() - began
    stored = Checkpoint.objects.get(job_id=lease.job_id)
    assert (stored.size, stored.sha256) == (size, digest)

    lease_end(lease_id=lease.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="benchmark")
    second = placed_lease(job=Job.objects.get(pk=lease.job_id))
    gpu = second.gpus.get()
    (order,) = heartbeat(agent_client(second.machine), [gpu_entry(gpu.uuid, gpu.index)]).json()["start"]
    ckpt = order["checkpoint"]
    restore = scratch / "restored.tar"
    fetcher = _transport(api_url, second.machine)
    began = time.perf_counter()
    fetcher.checkpoint_download(
        ckpt["restore_url"], restore, size=ckpt["restore_size"], sha256=ckpt["restore_sha256"], max_bytes=size
    )
    restore_s = time.perf_counter() - began
    restore.unlink()
    archive.unlink()
    row: dict[str, Any] = {
        "store": store,
        "mib": size_mib,
        "bytes": size,
        "direct": direct,
        "upload_s": round(upload_s, 3),
        "restore_s": round(restore_s, 3),
        "restore_from": "store" if ckpt["restore_url"].startswith("http") else "marketplace",
    }
    if store == "s3":
        storage = checkpoints.checkpoint_storage()
        client, bucket, name = checkpoints._client_and_name(storage, stored.storage_key)
        head = client.head_object(Bucket=bucket, Key=name, ChecksumMode="ENABLED")
        row["commit_read_back"] = not head.get("ChecksumSHA256")
    return row


def _transport(api_url: str, machine: Any) -> Any:
    """The agent's transport with a fresh credential of `machine`."""
    import secrets

    from gpgpu_agent.transport import HttpTransport
    from providers.models import Machine
    from providers.services import secret_digest

    raw = f"gpm_bench_{secrets.token_urlsafe(16)}"
    Machine.objects.filter(pk=machine.pk).update(credential_digest=secret_digest(raw))
    return HttpTransport(api_url, credential=raw)


def main() -> None:
    args = _parse()
    sizes = [int(part) for part in args.sizes.split(",") if part.strip()]
    stores = [part.strip() for part in args.stores.split(",") if part.strip()]
    if not sizes or any(size < 0 for size in sizes) or not set(stores) <= {"files", "s3"}:
        _django.refuse("--sizes: MiB, comma-separated; --stores: files and/or s3")
    with tempfile.TemporaryDirectory(prefix="gpgpu-bench-ckpt-") as tmp:
        scratch = Path(tmp)
        _django.django_setup(database_url=args.database_url or f"sqlite:///{scratch / 'bench.sqlite3'}")
        _django.migrations_ready(migrate=args.database_url is None)
        from django.conf import settings
        from django.core.wsgi import get_wsgi_application
        from django.test.utils import override_settings

        server = make_server("127.0.0.1", _django.free_port(), get_wsgi_application(), _Server, _Quiet)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        api_url = f"http://127.0.0.1:{server.server_address[1]}/api/agent/v1/"
        moto = None
        endpoint = args.s3_endpoint
        if "s3" in stores and endpoint is None:
            import logging

            import boto3
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            moto.start()
            host, port = moto.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id=args.s3_access_key,
                aws_secret_access_key=args.s3_secret_key,
                region_name=args.s3_region,
            ).create_bucket(Bucket=args.s3_bucket)
        rows = []
        try:
            for store in stores:
                stores_setting = {**settings.STORAGES, "checkpoints": _storage(store, args, scratch, endpoint)}
                with override_settings(STORAGES=stores_setting):
                    _round(store, 1, api_url, scratch)  # warm: the first request of each path
                    for size in sizes:
                        rounds = [_round(store, size, api_url, scratch) for _ in range(max(1, args.repeat))]
                        row = dict(rounds[0])
                        for key in ("upload_s", "restore_s"):
                            row[key] = statistics.median(r[key] for r in rounds)
                            row[key.replace("_s", "_mib_per_s")] = round(size / row[key], 1) if row[key] else None
                        row["rounds"] = len(rounds)
                        rows.append(row)
                        print(
                            f"{store:5} {size:5} MiB  upload {row['upload_s']:7.3f} s  "
                            f"restore {row['restore_s']:7.3f} s  (from the {row['restore_from']})",
                            file=sys.stderr,
                        )
        finally:
            server.shutdown()
            if moto is not None:
                moto.stop()
        print(json.dumps({"benchmark": "checkpoints", "s3_endpoint": args.s3_endpoint or "moto", "rows": rows}))


if __name__ == "__main__":
    main()
