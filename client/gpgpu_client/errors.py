"""The marketplace's one error shape, {"code", "detail"} (plus "fields" for invalid input), as
typed exceptions. Every error the SDK raises is an ApiError or a ClientError."""

from __future__ import annotations

from collections.abc import Mapping


class ClientError(Exception):
    """A problem on this side: bad input, a bad config or job file, an unreachable server."""


class ApiError(Exception):
    """The server answered with an error. `code` is its stable machine-readable code, `detail`
    the sentence for a person, `status` the HTTP status."""

    def __init__(
        self,
        detail: str,
        *,
        code: str,
        status: int,
        fields: Mapping[str, list[str]] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.status = status
        self.fields: dict[str, list[str]] = dict(fields or {})
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.detail} ({self.code}, HTTP {self.status})"


class ValidationFailed(ApiError):
    """400: the request was refused; `fields` names the offending fields and their messages."""


class AuthenticationFailed(ApiError):
    """401: no token, or a token the server does not know (or revoked)."""


class PermissionDenied(ApiError):
    """403: signed in, but not allowed (e.g. a provider-only account calling renter endpoints)."""


class NotFound(ApiError):
    """404: no such row, or one that is not yours."""


class Conflict(ApiError):
    """409: the request conflicts with the row's state (e.g. cancelling a finished job)."""


class InsufficientFunds(ApiError):
    """402: the available balance does not cover the job's budget."""


class RateLimited(ApiError):
    """429: too many requests; `retry_after_s` says when to try again, when the server said."""


class Unavailable(ApiError):
    """503: the server cannot answer for now; `retry_after_s` says when to try again."""


class ServerError(ApiError):
    """500 and other statuses the client has no better name for."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: ValidationFailed,
    401: AuthenticationFailed,
    402: InsufficientFunds,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    503: Unavailable,
}


def error_for(status: int, body: object, *, retry_after_s: float | None = None, fallback_detail: str = "") -> ApiError:
    """The typed exception for an error answer: `body` is its parsed JSON (or None when it was not
    JSON, e.g. a proxy's HTML page; then `fallback_detail` describes it)."""
    code = f"http_{status}"
    detail = fallback_detail or f"HTTP {status}"
    fields: dict[str, list[str]] = {}
    if isinstance(body, Mapping):
        code = str(body.get("code") or code)
        detail = str(body.get("detail") or detail)
        raw_fields = body.get("fields")
        if isinstance(raw_fields, Mapping):
            for name, messages in raw_fields.items():
                if isinstance(messages, list):
                    fields[str(name)] = [str(m) for m in messages]
                else:
                    fields[str(name)] = [str(messages)]
    cls = _BY_STATUS.get(status, ServerError)
    return cls(detail, code=code, status=status, fields=fields, retry_after_s=retry_after_s)
