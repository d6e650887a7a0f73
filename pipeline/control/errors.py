"""Error bodies of the control API: one JSON shape (`ErrorResponse`) for every refusal, naming the field."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pipeline.control.models import ErrorResponse, FieldErrorItem

MAX_SHOWN_CHARS = 80  # a refused header value is quoted in the error up to this many characters


# ------------------------------------------------------------------------------------ errors
class FieldError(Exception):
    """A bad request about one field: answered as `ErrorResponse` with `status_code`."""

    def __init__(self, field: str, message: str, *, status_code: int = 422,
                 type_: str = "value_error") -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status_code, self.type = field, message, status_code, type_


def error_body(error: str, field: str | None = None,
               items: list[dict[str, str]] | None = None) -> dict[str, Any]:
    errors = [FieldErrorItem(**item) for item in items or []]
    return ErrorResponse(error=error, field=field, errors=errors).model_dump()


def json_bytes(data: Any) -> bytes:
    """UTF-8 JSON that cannot fail to encode: a lone surrogate that came in with the request (an unknown
    key "\\ud800" is named in its error) is written as its \\u escape, which is what it was in the
    request, instead of turning the answer into a 500."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8", "backslashreplace")


class _JSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def error_response(status_code: int, error: str, field: str | None = None,
                   items: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if field is not None and not items:  # `errors` always lists the problem `field` names
        items = [{"field": field, "message": error.removeprefix(f"{field}: "),
                  "type": HTTPStatus(status_code).name.lower()}]
    return _JSONResponse(error_body(error, field, items), status_code=status_code, headers=headers)


def shown(value: bytes | str) -> str:
    """A header value quoted in an error message, cut to MAX_SHOWN_CHARS."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return repr(text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "...")


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def validation_items(exc: RequestValidationError, request: Request) -> tuple[int, list[dict[str, str]]]:
    """pydantic/FastAPI errors -> (status, [{field, message, type}]): 400 malformed JSON, 415 not JSON."""
    items: list[dict[str, str]] = []
    status = 422
    content_type = request.headers.get("content-type", "")
    for err in exc.errors():
        etype = str(err.get("type", "value_error"))
        loc = tuple(err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        if etype == "json_invalid":
            status = 400
            pos = loc[1] if len(loc) > 1 else "?"
            detail = (err.get("ctx") or {}).get("error", "")
            message = f"invalid JSON at position {pos}: {detail}".rstrip(": ")
            items.append({"field": "body", "message": message, "type": etype})
            continue
        field = _field_of(loc)
        if field == "body" and etype == "missing":
            msg = "a JSON object is required"
        elif field == "body" and isinstance(err.get("input"), bytes | bytearray):
            status = 415
            etype = "unsupported_media_type"
            msg = f"send JSON with Content-Type: application/json (got {content_type or 'no Content-Type'!r})"
        elif etype == "extra_forbidden":
            msg = "unknown field"
        elif etype.startswith("value_error") and msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif field == "event_type" and etype == "literal_error":
            msg += " (POST /interrupt sends conversation.interrupt)"
        items.append({"field": field, "message": msg, "type": etype})
    if not items:
        items.append({"field": "body", "message": "invalid request", "type": "value_error"})
    return status, items
