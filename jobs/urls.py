"""Renters' REST API under /api/v1/ (see jobs.apis)."""

from django.urls import path

from jobs import apis

urlpatterns = [
    path("jobs/", apis.JobListApi.as_view(), name="job-list"),
    path("jobs/<int:job_id>/", apis.JobDetailApi.as_view(), name="job-detail"),
    path("jobs/<int:job_id>/cancel/", apis.JobCancelApi.as_view(), name="job-cancel"),
    path("jobs/<int:job_id>/leases/", apis.JobLeaseListApi.as_view(), name="job-lease-list"),
    path("jobs/<int:job_id>/events/", apis.JobEventListApi.as_view(), name="job-event-list"),
    path("leases/", apis.LeaseListApi.as_view(), name="lease-list"),
    path("leases/<int:lease_id>/", apis.LeaseDetailApi.as_view(), name="lease-detail"),
]
