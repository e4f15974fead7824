"""Fixtures shared by every app's tests."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient


@pytest.fixture
def api_client() -> APIClient:
    return APIClient()


@pytest.fixture
def renter_client(db):  # type: ignore[no-untyped-def]
    """(client authenticated as a fresh renter, renter)."""
    from tests.factories import RenterFactory, token_for

    renter = RenterFactory()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(renter.user)}")
    return client, renter


@pytest.fixture
def provider_client(db):  # type: ignore[no-untyped-def]
    """(client authenticated as a fresh provider, provider)."""
    from tests.factories import ProviderFactory, token_for

    provider = ProviderFactory()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(provider.user)}")
    return client, provider
