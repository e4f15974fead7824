"""API tokens for people (renters, providers, operators) using the REST API.

A token is shown once when created; only its SHA-256 digest is stored, so a database leak
does not leak credentials. Machines (agents) have their own credential on providers.Machine.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, default="default")
    # The first characters of the token, kept so a person can tell their tokens apart.
    prefix = models.CharField(max_length=12, db_index=True)
    key_digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API token"
        verbose_name_plural = "API tokens"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.user} / {self.name} ({self.prefix}…)"

    def throttle_key(self) -> tuple[str, str]:
        """The rate limit's scope and key for a request this token authenticated
        (core.throttling): the person's scope, per token."""
        return "user", f"token{self.pk}.{self.key_digest[:16]}"
