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
