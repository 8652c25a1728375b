"""Realtime tokens: signed by the control plane, checked by the gateway at the handshake."""

from __future__ import annotations

import pytest

from streamplane.jwt import jwt_encode
from streamplane.realtime.protocol import Code, FrameError
from streamplane.realtime.tokens import rights_on, sign_realtime_token, verify_realtime_token

KEY = bytes(range(32))
NOW = 1_800_000_000


def _token(**kw: object) -> str:
    args: dict[str, object] = {
        "user": "ann",
        "channels": {"chat:final": ["read", "publish"], "state:*": ["read"]},
        "now": NOW,
        "ttl_s": 60,
    }
    args.update(kw)
    return sign_realtime_token(KEY, **args)  # type: ignore[arg-type]


def test_a_signed_token_verifies_to_its_user_channels_and_rights() -> None:
    grant = verify_realtime_token(_token(), KEY, now=NOW + 59)
    assert grant.user == "ann" and grant.expires == NOW + 60
    assert rights_on(grant, "chat:final") == {"read", "publish"}
    assert rights_on(grant, "state:final") == {"read"}, "a viewer cannot publish state"
    assert rights_on(grant, "chat:other") == frozenset()


def _refused(token: str, key: bytes = KEY, now: int = NOW) -> Code:
    with pytest.raises(FrameError) as err:
        verify_realtime_token(token, key, now=now)
    return err.value.code


def test_forged_expired_and_foreign_tokens_are_refused() -> None:
    token = _token()
    head, payload, mac = token.split(".")
    forged = jwt_encode(
        {"typ": "realtime", "sub": "ann", "iat": NOW, "exp": NOW + 60, "ch": {"*": ["moderate"]}},
        b"not the key",
    )
    assert _refused(forged) is Code.UNAUTHORIZED
    assert _refused(f"{head}.{payload}.{mac[:-2]}AA") is Code.UNAUTHORIZED
    assert _refused(token, key=b"another key") is Code.UNAUTHORIZED
    assert _refused("garbage") is Code.UNAUTHORIZED
    assert _refused(token, now=NOW + 60) is Code.TOKEN_EXPIRED
    access = jwt_encode({"typ": "access", "sub": "ann", "iat": NOW, "exp": NOW + 60}, KEY)
    assert _refused(access) is Code.UNAUTHORIZED, "an access token is not a realtime token"
    odd = jwt_encode(
        {
            "typ": "realtime",
            "sub": "ann",
            "iat": NOW,
            "exp": NOW + 60,
            "ch": {"chat:a": ["launch"]},
        },
        KEY,
    )
    assert _refused(odd) is Code.UNAUTHORIZED


def test_signing_refuses_what_it_could_not_mean() -> None:
    with pytest.raises(ValueError, match="unknown rights"):
        _token(channels={"chat:a": ["admin"]})
    with pytest.raises(ValueError, match="prefix ending"):
        _token(channels={"chat:*:x": ["read"]})
    with pytest.raises(ValueError, match="names a user"):
        _token(user="")
