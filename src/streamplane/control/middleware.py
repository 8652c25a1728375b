"""ASGI middleware of the control plane: request bodies bounded before any handler reads them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import msgspec

__all__ = ["BodyLimit"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (``bulk_limit`` on ``bulk_paths``, the title
    and edge uploads) with 413, whether or not they declare a Content-Length, before any
    handler reads them."""

    def __init__(
        self, app: ASGIApp, limit: int, bulk_limit: int, bulk_paths: Iterable[str]
    ) -> None:
        self.app = app
        self.limit = limit
        self.bulk_limit = bulk_limit
        self.bulk_paths = frozenset(bulk_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.bulk_limit if scope.get("path") in self.bulk_paths else self.limit
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _too_large(send, 400, "the Content-Length header is not a number")
                    return
                if declared > limit:
                    await _too_large(send, 413, _over(limit))
                    return
        # Read the body up front (it is bounded) so that a lying or absent Content-Length
        # cannot stream past the limit into a handler.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, 413, _over(limit))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _over(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes"


async def _too_large(send: Send, status: int, detail: str) -> None:
    error = "body_too_large" if status == 413 else "bad_request"
    body = msgspec.json.encode({"error": error, "detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
