"""Renters' REST API under /api/v1/ (see jobs.apis); submitting a job and a job's detail with its
budget are routed by marketplace.urls (marketplace.apis)."""

from django.urls import path

from jobs import apis

urlpatterns = [
    path("jobs/<int:job_id>/leases/", apis.JobLeaseListApi.as_view(), name="job-lease-list"),
    path("jobs/<int:job_id>/events/", apis.JobEventListApi.as_view(), name="job-event-list"),
    path("jobs/<int:job_id>/logs/", apis.JobLogApi.as_view(), name="job-logs"),
    path("jobs/<int:job_id>/checkpoint/", apis.JobCheckpointApi.as_view(), name="job-checkpoint"),
    path("leases/", apis.LeaseListApi.as_view(), name="lease-list"),
    path("leases/<int:lease_id>/", apis.LeaseDetailApi.as_view(), name="lease-detail"),
    path("leases/<int:lease_id>/telemetry/", apis.LeaseTelemetryApi.as_view(), name="lease-telemetry"),
]
