"""The agent API's lease operations, mounted at /api/agent/v1/ beside providers.agent_urls
(docs/agent-api.md)."""

from django.urls import path

from jobs import agent_apis

urlpatterns = [
    path("leases/<int:lease_id>/events", agent_apis.LeaseEventApi.as_view(), name="agent-lease-events"),
    path("orders/wait", agent_apis.OrdersWaitApi.as_view(), name="agent-orders-wait"),
    path("leases/<int:lease_id>/usage", agent_apis.LeaseUsageApi.as_view(), name="agent-lease-usage"),
    path("leases/<int:lease_id>/logs", agent_apis.LeaseLogApi.as_view(), name="agent-lease-logs"),
    path("leases/<int:lease_id>/checkpoint", agent_apis.LeaseCheckpointApi.as_view(), name="agent-lease-checkpoint"),
    path(
        "leases/<int:lease_id>/checkpoint/upload",
        agent_apis.LeaseCheckpointUploadApi.as_view(),
        name="agent-lease-checkpoint-upload",
    ),
    path(
        "leases/<int:lease_id>/checkpoint/commit",
        agent_apis.LeaseCheckpointCommitApi.as_view(),
        name="agent-lease-checkpoint-commit",
    ),
]
