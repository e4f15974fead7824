from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from marketplace import apis, dashboard, health, metrics

urlpatterns = [
    # Probes and the status document, outside /api/ (marketplace.health, README "Health and status").
    path("livez", health.livez, name="livez"),
    path("readyz", health.readyz, name="readyz"),
    path("healthz", health.healthz, name="healthz"),
    # Prometheus' scrape, behind METRICS_TOKEN (marketplace.metrics).
    path("metrics", metrics.metrics, name="metrics"),
    # The console's home is the fleet dashboard (marketplace.dashboard), staff only like the rest.
    path("admin/", admin.site.admin_view(dashboard.console_index), name="console-index"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    path("api/agent/v1/", include("providers.agent_urls")),
    path("api/agent/v1/", include("jobs.agent_urls")),
    path("api/v1/", include("providers.urls")),
    # A job with its budget (billing) and submitting one (marketplace.submit) sit above jobs.
    path("api/v1/jobs/", apis.JobListApi.as_view(), name="job-list"),
    path("api/v1/jobs/<int:job_id>/", apis.JobDetailApi.as_view(), name="job-detail"),
    path("api/v1/jobs/<int:job_id>/cancel/", apis.JobCancelApi.as_view(), name="job-cancel"),
    path("api/v1/", include("jobs.urls")),
    path("api/v1/", include("accounts.urls")),
    path("api/v1/", include("billing.urls")),
]

# Under /api/ Django's own error answers use the API's error shape (core.api).
handler400 = "core.api.bad_request"
handler403 = "core.api.permission_denied"
handler404 = "core.api.page_not_found"
handler500 = "core.api.server_error"
