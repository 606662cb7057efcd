"""OpenAI's error body and the HTTP status each failure gets, so every client library raises the right exception.

The ``openai`` package picks its exception class from the status alone (400 BadRequestError, 401
AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 409 ConflictError, 413, 422
UnprocessableEntityError, 429 RateLimitError, 500 InternalServerError) and shows the body's message.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from edgelora.errors import BusyError, EdgeLoraError, UnknownAdapterError

ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
}


class ApiError(Exception):
    """A failure a request ends with: its status, one-line message, the field at fault and a stable code."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(" ".join(str(message).split()))
        self.status = status
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    @property
    def message(self) -> str:
        return str(self)

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def model_not_found(model: str) -> ApiError:
    """One answer for a name nobody has and for a name only another tenant may use, so neither can be told apart."""
    return ApiError(404, f"The model {model!r} does not exist or you do not have access to it.",
                    code="model_not_found", param="model")


def from_runtime(error: EdgeLoraError, model: str | None) -> ApiError:
    """The runtime's errors as the server answers them; an unknown adapter never lists the others."""
    if isinstance(error, BusyError):
        return ApiError(429, f"the server is busy: {error}", code="server_busy", retry_after_s=error.retry_after_s)
    if isinstance(error, UnknownAdapterError):
        return model_not_found(model or "")
    return ApiError(400, str(error), code="invalid_value")
