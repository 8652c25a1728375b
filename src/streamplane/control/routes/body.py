"""Request bodies decoded by msgspec (title.json, edge heartbeats), and their OpenAPI entries.

These two bodies are msgspec contracts shared with other planes, not pydantic models: the
routes read the raw body and decode it here, and ``body_schema`` tells the OpenAPI document
what the body is (the schemas themselves are added by ``create_app``).
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec

from streamplane.control.errors import ApiError

__all__ = ["SCHEMA_REF", "body_schema", "decode"]

_T = TypeVar("_T")
SCHEMA_REF: Final = "#/components/schemas/{name}"


def decode(body: bytes, kind: type[_T]) -> _T:
    """``body`` as a ``kind``: 400 if it is not JSON, 422 naming the field if the shape is wrong."""
    if not body:
        raise ApiError(400, "bad_json", "the request body is empty; send a JSON document")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as err:
        try:  # msgspec validates while it parses: tell truncated JSON from a wrong shape
            msgspec.json.decode(body)
        except msgspec.DecodeError as syntax:
            raise ApiError(
                400, "bad_json", f"the request body is not valid JSON: {syntax}"
            ) from None
        raise ApiError(422, "invalid", f"{kind.__name__}: {err}") from None
    except msgspec.DecodeError as err:
        raise ApiError(400, "bad_json", f"the request body is not valid JSON: {err}") from None


def body_schema(name: str, reply: str | None = None) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body (and reply) is the named msgspec schema."""
    extra: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": SCHEMA_REF.format(name=name)}}},
        }
    }
    if reply is not None:
        extra["responses"] = {
            "200": {
                "description": "accepted",
                "content": {
                    "application/json": {"schema": {"$ref": SCHEMA_REF.format(name=reply)}}
                },
            }
        }
    return extra
