"""Typed errors, each with the HTTP status it means, mapped in one place.

Service code raises these; the HTTP layer (``shared.http``) turns them into
a JSON body ``{"error": ..., "message": ...}`` with the status below.
"""

from __future__ import annotations


class ApiError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict:
        return {"error": self.code, "message": self.message, **self.details}


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    """Authenticated, but this actor may not do this (an approver list)."""

    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"

    def __init__(self, current: str, requested: str, allowed: list[str]):
        allowed_text = ", ".join(allowed) if allowed else "none (closed is final)"
        super().__init__(
            f"cannot move an incident from {current} to {requested}; allowed from {current}: {allowed_text}",
            current_status=current,
            requested_status=requested,
            allowed=allowed,
        )


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class ServiceUnavailable(ApiError):
    """Transient: the caller should retry (AlertManager and the Broker do on 5xx)."""

    status = 503
    code = "unavailable"


class SchemaBehind(ServiceUnavailable):
    """The database's schema is older than this code (the migrations have
    not run yet): a deployment state, not a bug, so the caller retries."""

    code = "schema_behind"

    def __init__(self, message: str = "the database schema is older than this code: run the migrations; retry later", **details):
        super().__init__(message, **details)


class NotRecorded(ApiError):
    """The work was done but recording it failed (the database refused the
    write twice): a dead letter the Broker accepted whose redelivery is not
    recorded. Not a 503: a retry would do the work again. Not a 2xx: nothing
    is committed. The body says what was done."""

    code = "not_recorded"


class BadGateway(ApiError):
    """A service we depend on did not accept the work; the Broker retries."""

    status = 502
    code = "bad_gateway"
