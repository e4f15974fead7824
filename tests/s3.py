"""A bucket of a real S3 endpoint for tests (the root conftest's `s3_store` fixture)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class S3Store:
    """A bucket on a real S3 endpoint (moto's server on 127.0.0.1), the checkpoints' storage."""

    endpoint: str
    bucket: str
    client: Any  # boto3's S3 client (boto3 ships no types), with the store's credentials

    def keys(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket)
        return sorted(item["Key"] for item in listed.get("Contents", []))


def s3_storage(*, endpoint: str, bucket: str, access_key: str, secret_key: str, region: str) -> dict[str, Any]:
    """The checkpoints' STORAGES entry for `bucket` of `endpoint`, as production's
    CHECKPOINT_S3_BUCKET configures it (marketplace/settings.py: django-storages, private objects,
    pre-signed URLs valid 120 s), path-style as a local endpoint needs."""
    return {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": bucket,
            "endpoint_url": endpoint,
            "access_key": access_key,
            "secret_key": secret_key,
            "region_name": region,
            "addressing_style": "path",
            "signature_version": "s3v4",
            "default_acl": None,
            "querystring_auth": True,
            "querystring_expire": 120,
            "file_overwrite": False,
        },
    }
