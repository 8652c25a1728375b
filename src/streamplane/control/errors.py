"""The control plane's refusals: one exception, rendered as ``{"error": code, "detail": text}``."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A refusal a client can act on: an HTTP status, a stable code, a sentence, and facts."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}


def unauthorised(detail: str) -> ApiError:
    return ApiError(401, "unauthorised", detail)


def forbidden(detail: str, code: str = "forbidden") -> ApiError:
    return ApiError(403, code, detail)


def not_found(detail: str, code: str = "not_found") -> ApiError:
    return ApiError(404, code, detail)
