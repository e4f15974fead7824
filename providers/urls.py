"""The fleet's REST API under /api/v1/ (see providers.apis)."""

from django.urls import path

from providers import apis

urlpatterns = [
    path("gpus/", apis.GpuSearchApi.as_view(), name="gpu-search"),
    path("machines/", apis.MachineListApi.as_view(), name="machine-list"),
    path("machines/<int:machine_id>/", apis.MachineDetailApi.as_view(), name="machine-detail"),
    path("machines/<int:machine_id>/gpus/<int:gpu_id>/", apis.MachineGpuApi.as_view(), name="machine-gpu"),
    path(
        "machines/<int:machine_id>/credential/rotate/",
        apis.MachineCredentialRotateApi.as_view(),
        name="machine-credential-rotate",
    ),
    path(
        "machines/<int:machine_id>/credential/revoke/",
        apis.MachineCredentialRevokeApi.as_view(),
        name="machine-credential-revoke",
    ),
    path("provider/", apis.ProviderProfileApi.as_view(), name="provider-profile"),
    path("availability-windows/", apis.WindowListApi.as_view(), name="window-list"),
    path("availability-windows/<int:window_id>/", apis.WindowDetailApi.as_view(), name="window-detail"),
    path("blackouts/", apis.BlackoutListApi.as_view(), name="blackout-list"),
    path("blackouts/<int:blackout_id>/", apis.BlackoutDetailApi.as_view(), name="blackout-detail"),
    path("registration-tokens/", apis.RegistrationTokenApi.as_view(), name="registration-token-list"),
]
