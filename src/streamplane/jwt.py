"""JSON Web Tokens (RFC 7519), HS256 only: the control plane's access and session tokens and the
realtime gateway's tokens are signed and checked here. Only the one header this service writes
is accepted (:func:`jwt_decode`), so no algorithm named by a token is ever honoured.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from typing import Any, Final

import msgspec

__all__ = ["InvalidJwt", "jwt_decode", "jwt_encode"]

# The one header this service writes (the bytes PyJWT writes too), and the only one accepted:
# no algorithm named by the token is ever honoured, so "none" or a public-key algorithm with
# the secret as its key cannot be slipped in.
_JWT_HEADER: Final = (
    base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode("ascii")
)


class InvalidJwt(ValueError):
    """Not a token this service signed with this key (the reason is safe to show)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwt_encode(claims: Mapping[str, Any], key: bytes) -> str:
    """``claims`` as a compact HS256 JWS (RFC 7515) signed with ``key``."""
    signing_input = f"{_JWT_HEADER}.{_b64(msgspec.json.encode(claims))}"
    mac = hmac.digest(key, signing_input.encode("ascii"), "sha256")
    return f"{signing_input}.{_b64(mac)}"


def jwt_decode(token: str, key: bytes) -> dict[str, Any]:
    """The claims of ``token`` if ``key`` signed it with :func:`jwt_encode`'s header; the
    claims are not checked (see :meth:`Accounts.claims`). Raises :class:`InvalidJwt`."""
    if not token.isascii():
        raise InvalidJwt("not a JSON Web Token")
    header, _, rest = token.partition(".")
    payload, _, signature = rest.partition(".")
    if header != _JWT_HEADER:
        raise InvalidJwt("not a JSON Web Token of this service (HS256)")
    mac = hmac.digest(key, f"{header}.{payload}".encode("ascii"), "sha256")
    if not hmac.compare_digest(_b64(mac), signature):
        raise InvalidJwt("the signature does not match")
    # Signed by this key, so the payload is what jwt_encode wrote; decoded all the same as
    # untrusted text.
    try:
        claims = msgspec.json.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, msgspec.DecodeError):
        raise InvalidJwt("the payload is not JSON") from None
    if not isinstance(claims, dict):
        raise InvalidJwt("the payload is not a JSON object")
    return claims
