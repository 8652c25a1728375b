"""Realtime tokens: the control plane signs one per viewer, the gateway checks it at the handshake.

A token is an HS256 JWT (:mod:`streamplane.jwt`, the control plane's own) whose claims name the
user, the channels and the rights on each, and an expiry::

    {"typ": "realtime", "sub": "acct-1", "iat": 1800000000, "exp": 1800003600,
     "ch": {"chat:final": ["read", "publish"], "state:final": ["read"], "event:*": ["read"]}}

A channel pattern is a channel name, or a prefix ending in ``*``. Rights: ``read`` (subscribe,
presence), ``publish`` (chat messages; on a state channel, state writes: a source's right, never
a viewer's), ``moderate`` (delete messages, mute users). The ``typ`` claim keeps the control
plane's access and session tokens, signed with another key anyway, from ever passing here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import msgspec

from streamplane.jwt import InvalidJwt, jwt_decode, jwt_encode
from streamplane.realtime.protocol import Code, FrameError

__all__ = ["RIGHTS", "RealtimeGrant", "rights_on", "sign_realtime_token", "verify_realtime_token"]

RIGHTS: Final = ("read", "publish", "moderate")
_TYP: Final = "realtime"
_PATTERN_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:*"
)


class RealtimeGrant(msgspec.Struct, frozen=True, kw_only=True):
    user: str
    channels: dict[str, tuple[str, ...]]
    expires: int


class _Claims(msgspec.Struct, frozen=True, kw_only=True):
    typ: str
    sub: str
    iat: int
    exp: int
    ch: dict[str, list[str]]


def _check_grants(channels: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    checked: dict[str, list[str]] = {}
    for pattern, rights in channels.items():
        star = pattern.find("*")
        if not pattern or not _PATTERN_CHARS.issuperset(pattern) or -1 < star < len(pattern) - 1:
            raise ValueError(f"{pattern!r} is not a channel or a prefix ending in '*'")
        listed = sorted(set(rights))
        unknown = [r for r in listed if r not in RIGHTS]
        if unknown:
            raise ValueError(f"unknown rights {unknown} for {pattern!r}; rights are {RIGHTS}")
        checked[pattern] = listed
    return checked


def sign_realtime_token(
    key: bytes, *, user: str, channels: Mapping[str, Iterable[str]], now: int, ttl_s: int
) -> str:
    """A token for ``user`` with ``channels`` (pattern -> rights), valid ``ttl_s`` from ``now``."""
    if not user:
        raise ValueError("a realtime token names a user")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    claims = _Claims(typ=_TYP, sub=user, iat=now, exp=now + ttl_s, ch=_check_grants(channels))
    return jwt_encode(msgspec.structs.asdict(claims), key)


def verify_realtime_token(token: str, key: bytes, *, now: int) -> RealtimeGrant:
    """The grant ``token`` carries; FrameError UNAUTHORIZED (forged, malformed, not a realtime
    token) or TOKEN_EXPIRED (``exp`` at or before ``now``)."""
    if len(token) > 8192:
        raise FrameError(Code.UNAUTHORIZED, "token too long")
    try:
        raw = jwt_decode(token, key)
        claims = msgspec.convert(raw, _Claims)
        _check_grants(claims.ch)
    except (InvalidJwt, msgspec.ValidationError, ValueError) as err:
        raise FrameError(Code.UNAUTHORIZED, f"invalid token: {err}") from None
    if claims.typ != _TYP:
        raise FrameError(Code.UNAUTHORIZED, "not a realtime token")
    if claims.exp <= now:
        raise FrameError(Code.TOKEN_EXPIRED, "the token has expired; ask the control plane")
    return RealtimeGrant(
        user=claims.sub,
        channels={p: tuple(r) for p, r in claims.ch.items()},
        expires=claims.exp,
    )


def rights_on(grant: RealtimeGrant, channel: str) -> frozenset[str]:
    """Every right any of the grant's patterns gives on ``channel``."""
    rights: set[str] = set()
    for pattern, given in grant.channels.items():
        if pattern == channel or (pattern.endswith("*") and channel.startswith(pattern[:-1])):
            rights.update(given)
    return frozenset(rights)
