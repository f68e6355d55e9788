"""Errors that reach a client. One JSON shape everywhere (OpenAI's):
`{"error": {"message", "type", "param", "code"}}`.

    MuseError (500)
    ├── InvalidRequest (400/422)   a field is wrong; `param` names it (400: not JSON, or OpenAI's dialect)
    ├── Unauthorized (401)         missing or wrong API key
    ├── Forbidden (403)            missing or wrong CSRF token
    ├── NotFound (404)
    ├── MethodNotAllowed (405)
    ├── PayloadTooLarge (413)      body over the limit
    ├── UnsupportedMediaType (415) a form sent as something else
    ├── RateLimited (429)          over --rate-limit; carries Retry-After and x-ratelimit-*
    ├── Overloaded (503)           refused before it was queued; carries Retry-After
    ├── TimedOut (504)             deadline passed, queued or running
    ├── Cancelled (499)            the client or the API cancelled it
    ├── WorkerDied (503)           its worker died and the retry died too
    ├── ShuttingDown (503)         the server is draining
    ├── Unavailable (503)          no worker can load the model
    └── GenerationFailed (500)     the pipeline raised
"""

from __future__ import annotations

import math
from typing import Any


class MuseError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    retry_after: int | None = None  # seconds; becomes a Retry-After header when set

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class InvalidRequest(MuseError):
    status = 422
    type = "invalid_request_error"
    code = "invalid_value"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 422):
        super().__init__(message, param=param, code=code)
        assert status in (400, 422), "other 4xx have their own classes"
        self.status = status


class Forbidden(MuseError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(MuseError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class MethodNotAllowed(MuseError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(MuseError):
    status = 413
    type = "invalid_request_error"
    code = "body_too_large"


class UnsupportedMediaType(MuseError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class Overloaded(MuseError):
    status = 503
    type = "overloaded_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, round(retry_after))


class TimedOut(MuseError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class Cancelled(MuseError):
    status = 499
    type = "cancelled_error"
    code = "cancelled"


class WorkerDied(MuseError):
    status = 503
    type = "server_error"
    code = "worker_died"
    retry_after = 1


class ShuttingDown(MuseError):
    status = 503
    type = "overloaded_error"
    code = "shutting_down"
    retry_after = 5


class GenerationFailed(MuseError):
    status = 500
    type = "server_error"
    code = "generation_failed"


class Unavailable(MuseError):
    status = 503
    type = "server_error"
    code = "no_workers"
    retry_after = 30


class Unauthorized(MuseError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="muse"'}


class RateLimited(MuseError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: int, remaining: int, reset_s: float) -> None:
        super().__init__(message)
        self.limit, self.remaining, self.reset_s = limit, remaining, reset_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.reset_s)))} | rate_headers(
            self.limit, self.remaining, self.reset_s
        )


def rate_headers(limit: int, remaining: int, reset_s: float) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": f"{reset_s:.1f}s",
    }
