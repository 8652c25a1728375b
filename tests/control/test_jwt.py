"""The control plane's HS256 JSON Web Tokens, cross-checked against PyJWT."""

from __future__ import annotations

import base64
import hmac
import json
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.control.accounts import InvalidJwt, jwt_decode, jwt_encode

KEY = bytes.fromhex("b2" * 64)  # long enough for PyJWT to sign HS512 with it too
CLAIMS = {"sub": "a1", "typ": "access", "iat": 1_800_000_000, "exp": 1_800_000_900}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
claims = st.dictionaries(st.text(), json_values, max_size=6)
# PyJWT reads any claims: their meaning is checked by Accounts.claims, not by the codec.
NO_CLAIM_CHECKS = {
    f"verify_{claim}": False for claim in ("exp", "nbf", "iat", "aud", "iss", "sub", "jti")
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@given(claims)
def test_tokens_round_trip_and_pyjwt_reads_them(c: dict[str, Any]) -> None:
    token = jwt_encode(c, KEY)
    assert jwt_decode(token, KEY) == c
    assert jwt.decode(token, KEY, algorithms=["HS256"], options=NO_CLAIM_CHECKS) == c


def test_tokens_pyjwt_signed_with_the_key_are_read() -> None:
    assert jwt_decode(jwt.encode(CLAIMS, KEY, algorithm="HS256"), KEY) == CLAIMS


@given(st.data())
def test_any_changed_character_is_refused(data: st.DataObject) -> None:
    token = jwt_encode(CLAIMS, KEY)
    at = data.draw(st.integers(0, len(token) - 1))
    other = data.draw(st.sampled_from("AQgw_-.=a0Z9é ").filter(lambda ch: ch != token[at]))
    with pytest.raises(InvalidJwt):
        jwt_decode(token[:at] + other + token[at + 1 :], KEY)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not.a.jwt",
        jwt_encode(CLAIMS, KEY) + ".extra",
        jwt_encode(CLAIMS, b"another key"),
        # what PyJWT signs with the same key under another algorithm or header
        jwt.encode(CLAIMS, KEY, algorithm="HS512"),
        jwt.encode(CLAIMS, KEY, algorithm="HS256", headers={"kid": "k1"}),
        # alg=none: no signature at all
        f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}."
        f"{_b64(json.dumps(CLAIMS).encode())}.",
    ],
)
def test_tokens_this_service_did_not_sign_so_are_refused(token: str) -> None:
    with pytest.raises(InvalidJwt):
        jwt_decode(token, KEY)


def test_a_signed_payload_that_is_not_an_object_is_refused() -> None:
    header = jwt_encode({}, KEY).split(".")[0]
    for payload in (_b64(b"[1]"), _b64(b"{bad json")):
        signing_input = f"{header}.{payload}"
        mac = _b64(hmac.digest(KEY, signing_input.encode(), "sha256"))
        with pytest.raises(InvalidJwt, match="payload"):
            jwt_decode(f"{signing_input}.{mac}", KEY)
