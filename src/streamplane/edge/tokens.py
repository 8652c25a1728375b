"""Signed URL tokens: the control plane signs them, every edge verifies them.

The layout is Akamai's EdgeAuth (Auth Token 2.0), as built by Akamai's reference generators
(EdgeAuth-Token-Python ``akamai/edgeauth/edgeauth.py``, and its Java and Go ports) with their
defaults: SHA-256, ``~`` between fields, ``!`` between ACLs, ``escape_early`` off::

    [ip=ADDR~][st=START~]exp=EXPIRY[~acl=ACL[!ACL...]][~id=SESSION][~data=PAYLOAD]~kid=KEY_ID~hmac=HEX

``hmac`` is the lowercase hex HMAC-SHA256, under the key's raw bytes (Akamai's keys are hex
strings, unhexlified: :func:`key_from_hex`), of everything before ``~hmac=``. A token without
``acl`` is a URL token: it is valid for exactly one path, which it does not carry; its HMAC
covers ``~url=PATH`` appended to the signed text, as the reference generators do and as
Kaltura's nginx Akamai validator checks (``signed part + "~url=" + uri``).

``kid`` is a streamplane extension so that keys can rotate: the verifier picks the secret from
a keyring by it. Akamai's layout has no key id; placing it last before ``hmac`` keeps
everything else byte-for-byte what the reference generator emits (it is what that generator
emits when handed ``"...~kid=K"`` as its last field), and validators that sign "everything
before ``~hmac=``" verify it unchanged.

Choices, and why:

- Values are carried verbatim, as with Akamai's default ``escape_early=False``; :func:`sign`
  therefore refuses characters that would need escaping. The alphabet is RFC 6265's
  cookie-octet less ``~`` (the field delimiter), ``%``, ``+``, ``&`` and ``#`` (which a query
  string or a URL would reinterpret), so one token string travels unchanged in a cookie, in a
  query string and through percent-decoding. ACLs further refuse ``!`` (the ACL delimiter)
  and ``?`` (a wildcard to some Akamai configurations, a literal to others).
- Validity is the half-open interval ``[st, exp)``: at ``now == exp`` the token has expired.
  The reference generators refuse ``exp <= st`` as "already expired", which is that rule.
  No leeway is built in; a shell that wants some passes a shifted ``now``.
- ``*`` in an ACL matches any run of characters, ``/`` included (Akamai semantics). Matching
  is literal on the path the edge hands over, which must already be percent-decoded and
  normalised. As defence in depth :func:`verify` refuses, whatever the ACL says, a path that
  does not start with ``/`` or holds an empty, ``.`` or ``..`` segment, a backslash, a ``%``
  (left over after decoding it can only be double encoding, e.g. ``%2e%2e``) or a control
  character: ``/title/*`` must never open ``/title/../secret``.
- Parsing is strict: a field out of the canonical order, twice, unknown, or empty, a time
  that is not a positive decimal integer, a missing ``exp`` or ``kid``, a character outside
  the alphabet, more than 4096 characters: all malformed.
  Semantic checks that cost more (the IP, the ACL patterns) run only after the HMAC has
  authenticated the token, so their caches hold only values this service signed.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import ClassVar, Final
from urllib.parse import parse_qsl, quote, urlsplit

import msgspec

__all__ = [
    "DEFAULT_TOKEN_NAME",
    "ExpiredToken",
    "ForgedToken",
    "Grant",
    "GrantCache",
    "MalformedToken",
    "MissingToken",
    "NotYetValid",
    "PathNotAllowed",
    "TokenError",
    "WrongClient",
    "check_grant",
    "grant_allows",
    "key_from_hex",
    "sign",
    "signed_url",
    "token_from_request",
    "verify",
]

DEFAULT_TOKEN_NAME: Final = "__token__"  # Akamai's default parameter and cookie name

_FIELD_DELIMITER: Final = "~"
_ACL_DELIMITER: Final = "!"
# Bounds the work done on attacker-supplied input before the HMAC is checked.
_MAX_TOKEN_LENGTH: Final = 4096

# Canonical field order; rank must strictly increase along a token, which rejects both
# reordering and repetition in one comparison.
_RANK: Final[Mapping[str, int]] = {
    "ip": 0,
    "st": 1,
    "exp": 2,
    "acl": 3,
    "id": 4,
    "data": 5,
    "kid": 6,
}

# RFC 6265 cookie-octet punctuation less ~ % + & # (see the module docstring).
_VALUE_PUNCTUATION: Final = "!$'()*-./:<=>?@[]^_`{|}"
_ACL_PUNCTUATION: Final = _VALUE_PUNCTUATION.replace("!", "").replace("?", "")
_VALUE_RE: Final = re.compile(f"[A-Za-z0-9{re.escape(_VALUE_PUNCTUATION)}]+")
_ACL_RE: Final = re.compile(f"/[A-Za-z0-9{re.escape(_ACL_PUNCTUATION)}]*")
_TOKEN_RE: Final = re.compile(f"[A-Za-z0-9~{re.escape(_VALUE_PUNCTUATION)}]+")
_KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HMAC_HEX_LENGTH: Final = 64

# Characters left bare when a path or token goes into a URL; everything else is
# percent-encoded and comes back through the edge's decoding or parse_qsl.
_PATH_SAFE: Final = "/:@!$'()*,="
_QUERY_VALUE_SAFE: Final = "/:@!$'()*,=?~"


class TokenError(Exception):
    """A request's token does not grant it; ``http_status`` is what the edge answers."""

    http_status: ClassVar[int] = 403


class MissingToken(TokenError):
    """No token came with the request."""


class MalformedToken(TokenError):
    """The token is not in the layout :func:`sign` produces."""


class ForgedToken(TokenError):
    """The HMAC does not match, or the key id is not in the keyring."""


class ExpiredToken(TokenError):
    """``now`` is at or past the token's ``exp``."""

    http_status: ClassVar[int] = 410


class NotYetValid(TokenError):
    """``now`` is before the token's ``st``."""


class PathNotAllowed(TokenError):
    """The path is outside every ACL of the token, or is not a normalised path at all."""


class WrongClient(TokenError):
    """The token is bound to another client address."""


# A msgspec Struct, not a frozen dataclass: building one is ~10x cheaper, and verify builds
# one per request.
class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified token allows; ``url`` is set for URL tokens, ``acl`` for ACL tokens."""

    key_id: str
    expiry: int
    start: int | None
    acl: tuple[str, ...] | None
    url: str | None
    ip: str | None
    session_id: str | None
    data: str | None

    def live(self, now: int) -> bool:
        """Whether the grant is in force at ``now`` (after its start, before its expiry)."""
        return now < self.expiry and (self.start is None or now >= self.start)


def key_from_hex(hex_key: str) -> bytes:
    """Decode an Akamai-style hex key (even length, hex digits only) to the HMAC secret."""
    if not hex_key:
        raise ValueError("the key is empty")
    try:
        # a2b_hex, not bytes.fromhex: the latter skips whitespace, the reference does not.
        return binascii.a2b_hex(hex_key)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"the key is not an even-length hex string: {err}") from None


def sign(
    *,
    key_id: str,
    key: bytes,
    acl: Sequence[str] | None = None,
    url: str | None = None,
    start: int | None = None,
    expiry: int,
    ip: str | None = None,
    session_id: str | None = None,
    data: str | None = None,
) -> str:
    """Build a token for ``acl`` (one or more path patterns) or ``url`` (exactly one path).

    Raises ``ValueError`` (or ``TypeError``) for arguments no verifier could accept, so a bad
    grant fails where it is made rather than as a 403 at the edge.
    """
    if not isinstance(key, bytes) or not key:
        raise ValueError("key must be non-empty bytes (see key_from_hex)")
    if not _KEY_ID_RE.fullmatch(key_id):
        raise ValueError(f"key_id must be 1-64 of [A-Za-z0-9._-], not {key_id!r}")
    if (acl is None) == (url is None):
        raise ValueError("give exactly one of acl (path patterns) or url (one path)")
    _check_time("expiry", expiry)
    if start is not None:
        _check_time("start", start)
        if expiry <= start:
            raise ValueError(f"expiry {expiry} is not after start {start}")

    fields: list[str] = []
    if ip is not None:
        fields.append("ip=" + _canonical_ip_or_raise(ip))
    if start is not None:
        fields.append(f"st={start}")
    fields.append(f"exp={expiry}")
    if acl is not None:
        fields.append("acl=" + _join_acl(acl))
    if session_id is not None:
        fields.append("id=" + _checked_value("session_id", session_id))
    if data is not None:
        fields.append("data=" + _checked_value("data", data))
    fields.append("kid=" + key_id)
    signed = _FIELD_DELIMITER.join(fields)

    if url is not None:
        if not isinstance(url, str) or not _is_clean_path(url):
            raise ValueError(f"url must be a normalised absolute path, not {url!r}")
        message = signed + "~url=" + url
    else:
        message = signed
    return signed + "~hmac=" + _mac(key, message)


def verify(
    token: str | None,
    *,
    path: str,
    now: int,
    client_ip: str | None,
    keyring: Mapping[str, bytes],
) -> Grant:
    """Check that ``token`` grants ``path`` to ``client_ip`` at ``now`` (epoch seconds).

    ``path`` is the request path after the edge percent-decoded and normalised it, without
    the query. ``keyring`` maps key ids to secrets; keep retired keys in it until the last
    token signed with them has expired. Raises a :class:`TokenError` subclass.
    """
    if not token:
        raise MissingToken("no token in the query string or cookie")
    if not _is_clean_path(path):
        raise PathNotAllowed(f"{path!r} is not a normalised absolute path")
    if len(token) > _MAX_TOKEN_LENGTH or not _TOKEN_RE.fullmatch(token):
        raise MalformedToken("the token is too long or has characters a token never has")

    parts = token.split(_FIELD_DELIMITER)
    mac_field = parts.pop()
    if not mac_field.startswith("hmac=") or len(mac_field) != 5 + _HMAC_HEX_LENGTH:
        raise MalformedToken("the token does not end with hmac=<64 hex digits>")

    values: dict[str, str] = {}
    last_rank = -1
    for part in parts:
        name, eq, value = part.partition("=")
        rank = _RANK.get(name)
        if rank is None:
            raise MalformedToken(f"unknown field {name!r}")
        if rank <= last_rank:
            raise MalformedToken(f"field {name!r} is repeated or out of order")
        if not eq or not value:
            raise MalformedToken(f"field {name!r} is empty")
        last_rank = rank
        values[name] = value

    key_id = values.get("kid")
    expiry_text = values.get("exp")
    if key_id is None or expiry_text is None:
        raise MalformedToken("the token lacks exp or kid")
    expiry = _parse_time(expiry_text)
    start_text = values.get("st")
    start = None if start_text is None else _parse_time(start_text)

    key = keyring.get(key_id)
    if key is None:
        raise ForgedToken(f"unknown key id {key_id!r}")
    signed = token[: -len(mac_field) - 1]
    acl_text = values.get("acl")
    message = signed if acl_text is not None else signed + "~url=" + path
    mac = _keyed(key).copy()  # _mac, inlined: verify runs once per session at every edge
    mac.update(message.encode())
    if not hmac.compare_digest(mac.hexdigest(), mac_field[5:]):
        # A URL token does not carry its path, so "another path" and "forged" look alike.
        raise ForgedToken("the HMAC does not match the token and path")

    # Authenticated from here on.
    _check_window(start, expiry, now)

    token_ip = values.get("ip")
    if token_ip is not None:
        canonical = _canonical_token_ip(token_ip)
        if canonical is None:
            raise MalformedToken(f"ip {token_ip!r} is not an address")
        if client_ip != token_ip and (client_ip is None or _canonical_ip(client_ip) != canonical):
            raise WrongClient(f"the token is bound to another address than {client_ip!r}")

    acl: tuple[str, ...] | None = None
    if acl_text is not None:
        compiled = _compile_acl(acl_text)
        if compiled is None:
            raise MalformedToken("the acl has an empty entry")
        acl, patterns = compiled
        if not _any_match(patterns, path):
            raise PathNotAllowed(f"{path!r} is outside the token's acl")

    return Grant(
        key_id=key_id,
        expiry=expiry,
        start=start,
        acl=acl,
        url=None if acl_text is not None else path,
        ip=token_ip,
        session_id=values.get("id"),
        data=values.get("data"),
    )


def check_grant(grant: Grant, *, path: str, now: int) -> None:
    """Check a grant :func:`verify` returned for another request of the same token and client.

    The checks that depend on the request rather than on the token, in :func:`verify`'s order:
    the validity window at ``now`` (:class:`NotYetValid`, :class:`ExpiredToken`), then the
    path (:class:`PathNotAllowed`). The HMAC and the client address are the token's and were
    checked once.
    """
    _check_window(grant.start, grant.expiry, now)
    if not grant_allows(grant, path):
        raise PathNotAllowed(f"{path!r} is outside the token's acl")


class GrantCache:
    """Verified grants by token and client address, so a session's token costs one HMAC.

    A session asks for hundreds of paths with one token: the first request pays for
    :func:`verify`, later ones only for :func:`check_grant`. Only grants that verified are
    kept (a refused token is verified again each time), and at ``size`` entries the cache
    starts over: a bound, not an eviction policy.
    """

    def __init__(self, keyring: Mapping[str, bytes], size: int = 16384) -> None:
        self.keyring = keyring
        self.size = size
        self._grants: dict[tuple[str, str | None], Grant] = {}

    def verify(self, token: str | None, *, path: str, now: int, client_ip: str | None) -> Grant:
        """:func:`verify` with its outcome remembered; raises what it raises."""
        grant = self._grants.get((token, client_ip)) if token else None
        if grant is not None:
            check_grant(grant, path=path, now=now)
            return grant
        grant = verify(token, path=path, now=now, client_ip=client_ip, keyring=self.keyring)
        if len(self._grants) >= self.size:
            self._grants.clear()
        self._grants[(token or "", client_ip)] = grant
        return grant


def grant_allows(grant: Grant, path: str) -> bool:
    """Whether a grant :func:`verify` returned also covers ``path`` (decoded, normalised).

    The path half of :func:`check_grant`, which an edge uses (through :class:`GrantCache`) to
    check a session's further requests with a pattern match instead of an HMAC.
    """
    if not _is_clean_path(path):
        return False
    if grant.acl is None:
        return grant.url == path
    compiled = _compile_acl(_ACL_DELIMITER.join(grant.acl))
    return compiled is not None and _any_match(compiled[1], path)


def token_from_request(
    query: str, cookie_header: str | None, name: str = DEFAULT_TOKEN_NAME
) -> str | None:
    """The token from the query string (preferred) or else the ``Cookie`` header, if any.

    The query string wins because it is per request and deliberate, where a cookie is ambient
    state from an earlier page. A token given twice in the query is refused
    (``MalformedToken``): two layers picking different copies is how checks get bypassed. A
    repeated cookie is not refused, since browsers send one per matching Path and list the
    most specific first (RFC 6265 section 5.4); the first wins. An empty value counts as absent.
    """
    query = query.removeprefix("?")
    prefix = name + "="
    if query.startswith(prefix) and "&" not in query and "+" not in query and "%" not in query:
        if len(query) > len(prefix):
            return query[len(prefix) :]  # the common case, without parsing
        query = ""  # an empty value counts as absent: the cookie may have one
    found: str | None = None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name and value:
            if found is not None:
                raise MalformedToken(f"{name} appears more than once in the query string")
            found = value
    if found is not None:
        return found
    if cookie_header:
        for pair in cookie_header.split(";"):
            key, eq, value = pair.strip(" \t").partition("=")
            if eq and key == name:
                value = value.strip(" \t")
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                if value:
                    return value
    return None


def signed_url(base: str, path: str, token: str, name: str = DEFAULT_TOKEN_NAME) -> str:
    """``base`` (``scheme://host[:port]``) + ``path`` (decoded, normalised) + ``?name=token``.

    ``path`` is the same string the ACL or URL was signed for; it is percent-encoded here and
    the edge decodes it back before :func:`verify`.
    """
    parts = urlsplit(base)
    if (
        not parts.scheme
        or not parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"base must be scheme://host[:port] only, not {base!r}")
    if not _is_clean_path(path):
        raise ValueError(f"path must be a normalised absolute path, not {path!r}")
    return (
        f"{parts.scheme}://{parts.netloc}{quote(path, safe=_PATH_SAFE)}"
        f"?{quote(name, safe='')}={quote(token, safe=_QUERY_VALUE_SAFE)}"
    )


def _mac(key: bytes, message: str) -> str:
    """HMAC-SHA256 (RFC 2104) of ``message`` under ``key``, as lowercase hex.

    The standard library's HMAC, keyed once per key and copied per message: with OpenSSL 3
    most of a one-shot ``hmac.digest`` is spent setting the key up again on every call, and
    copying the keyed state skips that (about 1.5x the one-shot speed here).
    """
    mac = _keyed(key).copy()
    mac.update(message.encode())
    return mac.hexdigest()


# Small: a keyring holds a handful of live keys, and this keeps the secrets it is given.
@lru_cache(maxsize=32)
def _keyed(key: bytes) -> hmac.HMAC:
    return hmac.new(key, digestmod=hashlib.sha256)


def _check_window(start: int | None, expiry: int, now: int) -> None:
    if start is not None and now < start:
        raise NotYetValid(f"valid from {start}, now is {now}")
    if now >= expiry:
        raise ExpiredToken(f"expired at {expiry}, now is {now}")


def _is_clean_path(path: str) -> bool:
    return (
        path.startswith("/")
        and path.isprintable()
        and "\\" not in path
        and "%" not in path
        and "//" not in path
        and "/./" not in path
        and "/../" not in path
        and not path.endswith(("/.", "/.."))
    )


def _check_time(name: str, value: int) -> None:
    # bool is an int; a True expiry is a bug, not epoch second 1.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int of epoch seconds, not {value!r}")


def _parse_time(text: str) -> int:
    # The token already matched an ASCII-only pattern, so isdigit() means 0-9 here.
    if not text.isdigit() or text[0] == "0":
        raise MalformedToken(f"{text!r} is not a positive decimal integer")
    return int(text)


def _checked_value(name: str, value: str) -> str:
    if not isinstance(value, str) or not _VALUE_RE.fullmatch(value):
        raise ValueError(
            f'{name} must be non-empty printable ASCII without space, ~ % + & # ; , " or \\, '
            f"not {value!r}"
        )
    return value


def _join_acl(acl: Sequence[str]) -> str:
    if isinstance(acl, str):
        raise TypeError("acl is a list of patterns; wrap a single pattern in a list")
    if not acl:
        raise ValueError("acl needs at least one pattern")
    for pattern in acl:
        if not isinstance(pattern, str) or not _ACL_RE.fullmatch(pattern):
            raise ValueError(
                f"acl pattern {pattern!r} must start with / and hold only the token "
                "alphabet less ! and ?"
            )
    return _ACL_DELIMITER.join(acl)


def _canonical_ip_or_raise(ip: str) -> str:
    canonical = _canonical_ip(ip)
    if canonical is None:
        raise ValueError(f"ip {ip!r} is not an IPv4 or IPv6 address")
    return canonical


# Cached for authenticated token addresses only: client addresses are far more numerous.
@lru_cache(maxsize=4096)
def _canonical_token_ip(ip: str) -> str | None:
    return _canonical_ip(ip)


def _canonical_ip(ip: str) -> str | None:
    # Sockets on a dual-stack listener report IPv4 clients as ::ffff:a.b.c.d.
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@lru_cache(maxsize=4096)
def _compile_acl(acl_text: str) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]] | None:
    entries = tuple(acl_text.split(_ACL_DELIMITER))
    if not all(entries):
        return None
    return entries, tuple(tuple(entry.split("*")) for entry in entries)


def _any_match(patterns: tuple[tuple[str, ...], ...], path: str) -> bool:
    # A loop, not any() over a generator (a third of a microsecond): this runs on every verify.
    for pattern in patterns:  # noqa: SIM110
        if _glob_match(pattern, path):
            return True
    return False


def _glob_match(pieces: tuple[str, ...], path: str) -> bool:
    """Match ``path`` against a pattern split on ``*``; ``*`` matches any run, ``/`` too.

    With ``*`` the only wildcard, taking each middle piece at its leftmost occurrence is
    never worse than a later one, so one pass of ``str.find`` decides: linear time, no
    backtracking for an adversarial path to exploit.
    """
    if len(pieces) == 1:
        return path == pieces[0]
    head, tail = pieces[0], pieces[-1]
    end = len(path) - len(tail)
    if end < len(head) or not path.startswith(head) or not path.endswith(tail):
        return False
    position = len(head)
    for piece in pieces[1:-1]:
        found = path.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True
