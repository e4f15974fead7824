"""The agent API, mounted at /api/agent/v1/ (docs/agent-api.md)."""

from django.urls import path

from providers import agent_apis

urlpatterns = [
    path("register", agent_apis.RegisterApi.as_view(), name="agent-register"),
    path("heartbeat", agent_apis.HeartbeatApi.as_view(), name="agent-heartbeat"),
    path("credential/rotate", agent_apis.CredentialRotateApi.as_view(), name="agent-credential-rotate"),
    path("leases/<int:lease_id>/events", agent_apis.LeaseEventApi.as_view(), name="agent-lease-events"),
    path("leases/<int:lease_id>/usage", agent_apis.LeaseUsageApi.as_view(), name="agent-lease-usage"),
]
