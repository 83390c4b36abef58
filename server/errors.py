"""API errors: one exception type and one body constructor for OpenAI's error envelope, and
Anthropic's shape for its routes (server/middleware.py rewrites their errors into it)."""

from __future__ import annotations

import logging
from dataclasses import KW_ONLY, dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.errors import EngineDeadError, PromptTooLongError, SamplingParamsError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class APIError(Exception):
    """An error the client should see with its HTTP status, OpenAI type, param and code."""

    message: str
    status_code: int = 400
    _: KW_ONLY
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)


def error_body(
    message: str, status_code: int, param: str | None = None, code: str | None = None
) -> dict:
    """The one place that shapes {"error": {message, type, param, code}}."""
    err_type = "server_error" if status_code >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.status_code, err.param, err.code),
        status_code=err.status_code,
        headers=err.headers,
    )


def from_exception(exc: BaseException) -> APIError:
    """The engine's named errors as API errors; anything else is a bug: logged, and a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(
            f"the engine is not accepting requests: {exc}", 503, code="engine_unavailable"
        )
    if isinstance(exc, SamplingParamsError):  # PromptTooLongError and ConstraintError too
        code = "context_length_exceeded" if isinstance(exc, PromptTooLongError) else None
        return APIError(str(exc), 400, param=exc.param, code=code)
    logger.exception("unexpected error", exc_info=exc)
    return APIError(f"internal server error: {type(exc).__name__}", 500)


def validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's 422 as a 400 naming the first bad field."""
    errors = exc.errors()
    if not errors:
        return APIError("invalid request", 400)
    first = errors[0]
    # NOTE: union members appear in loc ("prompt", "str"; "TokenizeChatRequest", "messages"):
    # drop the body marker and model class names so param is the first field name.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not str(p)[:1].isupper()]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    if first.get("type") == "json_invalid":
        return APIError(f"invalid JSON body: {first.get('msg')}", 400, code="invalid_json")
    return APIError(f"{where}: {first.get('msg')}", 400, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the app in the OpenAI envelope, 422 becomes 400, unknown routes 404."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, RequestValidationError):
            return error_response(validation_error(exc))
        if not isinstance(exc, StarletteHTTPException):
            return error_response(from_exception(exc))
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"route {request.method} {request.url.path} not found"
        code = getattr(exc, "code", None)
        return error_response(APIError(message, exc.status_code, code=code, headers=exc.headers))

    for exc_type in (APIError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handler)


# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors)
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_body(message: str, status_code: int) -> dict:
    """Anthropic's {"type": "error", "error": {"type", "message"}} for an HTTP status."""
    default = "api_error" if status_code >= 500 else "invalid_request_error"
    err_type = ANTHROPIC_ERROR_TYPES.get(status_code, default)
    return {"type": "error", "error": {"type": err_type, "message": message}}
