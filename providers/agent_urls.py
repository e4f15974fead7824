"""The agent API, mounted at /api/agent/v1/ (docs/agent-api.md); its lease operations are
jobs.agent_urls."""

from django.urls import path

from providers import agent_apis

urlpatterns = [
    path("register", agent_apis.RegisterApi.as_view(), name="agent-register"),
    path("heartbeat", agent_apis.HeartbeatApi.as_view(), name="agent-heartbeat"),
    path("credential/rotate", agent_apis.CredentialRotateApi.as_view(), name="agent-credential-rotate"),
]
