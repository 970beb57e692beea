"""The exception tree, and the one place that turns an exception into an HTTP error body.

Every error a client can see is a `SluiceError` with a status. Handlers raise; the server writes.
Two body shapes exist because two APIs exist: the sluice-native one (the seed's
`{"status": ..., "error": ...}`) and the OpenAI envelope (`{"error": {message, type, param, code}}`).
"""

from __future__ import annotations


class SluiceError(Exception):
    """An error with an HTTP status and a message that tells the client what to do next."""

    status = 500
    code = "internal_error"
    native_status = "error"  # the seed's "status" field

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.headers = dict(headers or {})


class BadRequest(SluiceError):
    status, code = 400, "invalid_request"


class Unauthorized(SluiceError):
    status, code = 401, "invalid_api_key"


class Forbidden(SluiceError):
    status, code = 403, "forbidden"


class NotFound(SluiceError):
    status, code = 404, "not_found"


class MethodNotAllowed(SluiceError):
    status, code = 405, "method_not_allowed"


class Conflict(SluiceError):
    status, code = 409, "conflict"


class LengthRequired(SluiceError):
    status, code = 411, "length_required"


class PayloadTooLarge(SluiceError):
    status, code = 413, "payload_too_large"


class HeadersTooLarge(SluiceError):
    status, code = 431, "headers_too_large"


class TooManyRequests(SluiceError):
    status, code, native_status = 429, "rate_limited", "rejected"


class BadGateway(SluiceError):
    """The backend failed (refused, reset, returned garbage or an error)."""
    status, code = 502, "backend_error"


class BackendRefused(BadGateway):
    """The backend refused the connection: nothing was sent, so the request may safely go elsewhere."""


class Unavailable(SluiceError):
    """Nothing can serve this now (no backend ready, cloud not configured, shutting down)."""
    status, code, native_status = 503, "unavailable", "unavailable"


class QueueFull(Unavailable):
    code, native_status = "queue_full", "rejected"


class QueueTimeout(SluiceError):
    status, code, native_status = 504, "timeout", "timeout"


class Cancelled(SluiceError):
    """The client went away; nobody reads this, but the job's outcome is recorded with it."""
    status, code, native_status = 499, "cancelled", "cancelled"


_OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
    411: "invalid_request_error", 413: "invalid_request_error", 414: "invalid_request_error",
    431: "invalid_request_error", 429: "rate_limit_error", 499: "cancelled",
    502: "api_error", 503: "overloaded_error", 504: "timeout_error",
}


def openai_type(status: int) -> str:
    return _OPENAI_TYPES.get(status, "api_error")


def openai_body(err: SluiceError) -> dict:
    return {"error": {"message": err.message, "type": openai_type(err.status),
                      "param": err.param, "code": err.code}}


def native_body(err: SluiceError) -> dict:
    return {"status": err.native_status, "error": err.message}


def _wire_status(err: SluiceError) -> int:
    return err.status if err.status != 499 else 400      # 499 (client gone) is not a status to send


_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error",
}


def anthropic_status(err: SluiceError) -> int:
    """Anthropic's status for an error: 529 where sluice cannot take it now (its SDK retries 529 with
    Retry-After); other 4xx as they are; the rest 500/502/504."""
    return 529 if err.status == 503 else _wire_status(err)


def anthropic_body(err: SluiceError) -> dict:
    status = anthropic_status(err)
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


# One error envelope per API, by the name a Route gives in `api`: (status, body).
ENVELOPES = {
    "openai": lambda err: (_wire_status(err), openai_body(err)),
    "native": lambda err: (_wire_status(err), native_body(err)),
    "anthropic": lambda err: (anthropic_status(err), anthropic_body(err)),
    "ollama": lambda err: (_wire_status(err), {"error": err.message}),
}


def response_headers(err: SluiceError) -> dict[str, str]:
    headers = dict(err.headers)
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    elif err.status in (429, 503):
        headers["Retry-After"] = "1"
    return headers
