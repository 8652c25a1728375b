"""Request bodies: every JSON body is read strictly, by msgspec.

Python's ``json`` module (which Starlette's ``Request.json`` uses) reads more than JSON:
``NaN`` and ``Infinity``, numbers beyond a float (as infinity), and lone UTF-16 surrogate
halves (``"\\ud800"``) that make strings no UTF-8 encoder (the response's, the database
driver's) will take; and it exhausts the interpreter's recursion on deeply nested documents.
Here all of these are a 400 ``bad_json`` naming what is wrong: the pydantic routes are
:class:`JsonRoute` s, whose requests parse with :func:`parse`, and the two bodies that are
msgspec contracts shared with other planes (title.json, edge heartbeats) go through
:func:`decode`. ``body_schema`` tells the OpenAPI document what those two bodies are, and
``reply_schema`` what a msgspec answer is (the schemas themselves are added by ``create_app``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

import msgspec
from fastapi import Request, Response
from fastapi.routing import APIRoute

from streamplane.control.errors import ApiError

__all__ = ["SCHEMA_REF", "BadJson", "JsonRoute", "body_schema", "decode", "parse", "reply_schema"]

_T = TypeVar("_T")
SCHEMA_REF: Final = "#/components/schemas/{name}"
_AT_BYTE: Final = re.compile(r"\(byte (\d+)\)")
_CONTEXT_BYTES: Final = 16
_TOO_DEEP: Final = "it is nested too deeply (arrays and objects within each other)"
# A backslash escape: \uXXXX (group 1: the code unit) or any other (\\, \", ...); read left
# to right, so an escaped backslash is never taken for the start of an escape.
_ESCAPE: Final = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.S)


class BadJson(ValueError):
    """A request body that is not JSON; the message says where and why."""


def parse(body: bytes) -> Any:
    """The JSON document ``body`` as plain values; :class:`BadJson` if it is not JSON."""
    try:
        return msgspec.json.decode(body)
    except RecursionError:
        raise BadJson(_TOO_DEEP) from None
    except msgspec.DecodeError as err:  # ValidationError too: a number out of range
        raise BadJson(_lone_surrogate(body) or _explain(str(err), body)) from None


def decode(body: bytes, kind: type[_T]) -> _T:
    """``body`` as a ``kind``: 400 if it is not JSON, 422 naming the field if the shape is wrong."""
    if not body:
        raise ApiError(400, "bad_json", "the request body is empty; send a JSON document")
    try:
        return msgspec.json.decode(body, type=kind)
    except RecursionError:
        raise ApiError(
            400, "bad_json", f"the request body is not valid JSON: {_TOO_DEEP}"
        ) from None
    except msgspec.DecodeError as err:
        # msgspec validates while it parses: tell malformed JSON from a wrong shape, and
        # name the syntax error as parse() does (a typed decode may say only "truncated").
        try:
            parse(body)
        except BadJson as syntax:
            raise ApiError(
                400, "bad_json", f"the request body is not valid JSON: {syntax}"
            ) from None
        if isinstance(err, msgspec.ValidationError):
            raise ApiError(422, "invalid", f"{kind.__name__}: {err}") from None
        raise ApiError(400, "bad_json", f"the request body is not valid JSON: {err}") from None


def _lone_surrogate(body: bytes) -> str | None:
    """What is wrong if ``body`` escapes half a UTF-16 surrogate pair on its own.

    msgspec refuses one, but calls it "truncated" when it comes near the end of the body.
    """
    pending: re.Match[bytes] | None = None  # a high half, whose low half must come next
    for m in _ESCAPE.finditer(body):
        unit = int(m.group(1), 16) if m.group(1) else None
        low = unit is not None and 0xDC00 <= unit <= 0xDFFF
        if pending is not None:
            if low and m.start() == pending.end():
                pending = None
                continue
            return _surrogate(pending)
        if low:
            return _surrogate(m)
        if unit is not None and 0xD800 <= unit <= 0xDBFF:
            pending = m
    return None if pending is None else _surrogate(pending)


def _surrogate(escape: re.Match[bytes]) -> str:
    return (
        f"a lone UTF-16 surrogate {escape.group().decode()} at byte {escape.start()}: "
        "text must be Unicode characters (a surrogate half only pairs with the other half)"
    )


def _explain(message: str, body: bytes) -> str:
    """msgspec's message, and the text at the byte it names (``NaN``, a stray comma...)."""
    at = _AT_BYTE.search(message)
    if at is None:
        return message
    start = int(at.group(1))
    text = body[start : start + _CONTEXT_BYTES].decode("utf-8", "backslashreplace")
    return f"{message} at {text!r}" if text else message


class _JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = parse(await self.body())
            except BadJson as err:
                # FastAPI turns this one exception into its "json_invalid" error (a 400 here).
                raise json.JSONDecodeError(str(err), "", 0) from None
        return self._json


class JsonRoute(APIRoute):
    """A route whose JSON body is read by :func:`parse` rather than ``json.loads``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_JsonRequest(request.scope, request.receive))

        return strict


def body_schema(name: str, reply: str | None = None) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body (and reply) is the named msgspec schema."""
    extra: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": SCHEMA_REF.format(name=name)}}},
        }
    }
    if reply is not None:
        extra.update(reply_schema(reply, "accepted"))
    return extra


def reply_schema(name: str, description: str = "Successful Response") -> dict[str, Any]:
    """``openapi_extra`` for a route whose 200 answer is the named msgspec schema."""
    content = {"application/json": {"schema": {"$ref": SCHEMA_REF.format(name=name)}}}
    return {"responses": {"200": {"description": description, "content": content}}}
