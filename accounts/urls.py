"""The account's REST API under /api/v1/ (see accounts.apis)."""

from django.urls import path

from accounts import apis

urlpatterns = [
    path("me", apis.MeApi.as_view(), name="me"),
]
