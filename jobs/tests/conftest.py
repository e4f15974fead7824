"""Fixtures of the jobs app's tests."""

from __future__ import annotations

from typing import Any

import pytest

S3_ENDPOINT = "http://minio.test:9000"


@pytest.fixture
def s3_checkpoint_store(settings: Any) -> str:
    """The checkpoints' storage an S3-compatible store (django-storages, path-style, pre-signed
    URLs valid 120 s), as production configures it with CHECKPOINT_S3_BUCKET; nothing is sent to
    it by the tests that sign URLs. Returns the bucket's URL."""
    settings.STORAGES = {
        **settings.STORAGES,
        "checkpoints": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": "checkpoints",
                "endpoint_url": S3_ENDPOINT,
                "access_key": "test-access",
                "secret_key": "test-secret",
                "region_name": "us-east-1",
                "addressing_style": "path",
                "signature_version": "s3v4",
                "querystring_expire": 120,
            },
        },
    }
    return f"{S3_ENDPOINT}/checkpoints"
