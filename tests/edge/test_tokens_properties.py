"""Properties of the token core, checked with hypothesis."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass, replace

from hypothesis import assume, given
from hypothesis import strategies as st

from streamplane.edge import (
    ExpiredToken,
    ForgedToken,
    Grant,
    NotYetValid,
    PathNotAllowed,
    TokenError,
    WrongClient,
    sign,
    verify,
)
from streamplane.edge.tokens import _mac

KID = "k1"
KEY = bytes(range(32))
KEYRING = {KID: KEY, "k2": b"a second live key"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# A small alphabet, so that random patterns and paths often share pieces.
segments = st.text("ab-_.0", min_size=1, max_size=4).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts))
patterns = st.text("ab/*-", max_size=8).map(lambda s: "/" + s)
values = st.text(st.sampled_from("abcXYZ019!$'()*-./:<=>?@[]^_`{|}"), min_size=1, max_size=12)
times = st.integers(min_value=1, max_value=2**40)


def _oracle(pattern: str, path: str) -> bool:
    """Akamai ACL semantics by regex: '*' is any run of characters, '/' included."""
    regex = ".*".join(re.escape(piece) for piece in pattern.split("*"))
    return re.fullmatch(regex, path, re.DOTALL) is not None


def _same_host(a: IPAddress) -> IPAddress:
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


@dataclass(frozen=True)
class Case:
    """Arguments to sign() and a request (path, now, client) inside what they grant."""

    key_id: str
    acl: list[str] | None
    url: str | None
    start: int | None
    expiry: int
    ip: str | None
    session_id: str | None
    data: str | None
    path: str
    now: int

    def sign(self, key: bytes | None = None) -> str:
        return sign(
            key_id=self.key_id,
            key=KEYRING[self.key_id] if key is None else key,
            acl=self.acl,
            url=self.url,
            start=self.start,
            expiry=self.expiry,
            ip=self.ip,
            session_id=self.session_id,
            data=self.data,
        )

    def verify(self, token: str) -> Grant:
        return verify(token, path=self.path, now=self.now, client_ip=self.ip, keyring=KEYRING)


@st.composite
def acl_covering(draw: st.DrawFn, path: str) -> str:
    """A pattern that matches ``path``: some middle of it replaced by '*'."""
    i = draw(st.integers(min_value=1, max_value=len(path)))
    j = draw(st.integers(min_value=i, max_value=len(path)))
    return path[:i] + "*" + path[j:]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    path = draw(paths)
    start = draw(st.none() | times)
    expiry = draw(times.filter(lambda t: start is None or t > start))
    is_url = draw(st.booleans())
    acl = None
    if not is_url:
        acl = draw(
            st.permutations([*draw(st.lists(patterns, max_size=2)), draw(acl_covering(path))])
        )
    return Case(
        key_id=draw(st.sampled_from(sorted(KEYRING))),
        acl=acl,
        url=path if is_url else None,
        start=start,
        expiry=expiry,
        ip=draw(st.none() | st.ip_addresses().map(str)),
        session_id=draw(st.none() | values),
        data=draw(st.none() | values),
        path=path,
        now=draw(st.integers(min_value=start or 0, max_value=expiry - 1)),
    )


@given(cases())
def test_sign_then_verify_round_trips(case: Case) -> None:
    grant = case.verify(case.sign())
    assert (grant.key_id, grant.expiry, grant.start) == (case.key_id, case.expiry, case.start)
    assert (grant.session_id, grant.data) == (case.session_id, case.data)
    assert grant.url == case.url
    assert grant.acl == (None if case.acl is None else tuple(case.acl))
    if case.ip is None:
        assert grant.ip is None
    else:
        assert grant.ip is not None
        assert _same_host(ipaddress.ip_address(grant.ip)) == _same_host(
            ipaddress.ip_address(case.ip)
        )


@given(cases(), st.data())
def test_any_single_character_change_is_refused(case: Case, data: st.DataObject) -> None:
    token = case.sign()
    index = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    edit = data.draw(st.sampled_from(["replace", "insert", "delete"]))
    char = data.draw(st.characters(codec="utf-8") | st.sampled_from("~=!*/0aA"))
    if edit == "replace":
        assume(char != token[index])
        changed = token[:index] + char + token[index + 1 :]
    elif edit == "insert":
        changed = token[:index] + char + token[index:]
    else:
        changed = token[:index] + token[index + 1 :]
    try:
        case.verify(changed)
    except TokenError:
        return
    raise AssertionError(f"{edit} at {index} with {char!r} was accepted: {changed}")


@given(st.lists(patterns, min_size=1, max_size=3), paths, times)
def test_a_path_outside_every_acl_is_not_allowed(acl: list[str], path: str, expiry: int) -> None:
    assume(not any(_oracle(pattern, path) for pattern in acl))
    token = sign(key_id=KID, key=KEY, acl=acl, expiry=expiry)
    try:
        verify(token, path=path, now=expiry - 1, client_ip=None, keyring=KEYRING)
    except PathNotAllowed:
        return
    raise AssertionError(f"{path} was allowed by {acl}")


@given(patterns, paths)
def test_acl_matching_agrees_with_a_regex_oracle(pattern: str, path: str) -> None:
    token = sign(key_id=KID, key=KEY, acl=[pattern], expiry=2)
    try:
        verify(token, path=path, now=1, client_ip=None, keyring=KEYRING)
        allowed = True
    except PathNotAllowed:
        allowed = False
    assert allowed == _oracle(pattern, path)


@given(st.none() | times, times, st.integers(min_value=0, max_value=2**41))
def test_validity_is_start_inclusive_expiry_exclusive(
    start: int | None, expiry: int, now: int
) -> None:
    assume(start is None or start < expiry)
    token = sign(key_id=KID, key=KEY, acl=["/*"], start=start, expiry=expiry)
    outcome: type[TokenError] | None = None
    try:
        verify(token, path="/a", now=now, client_ip=None, keyring=KEYRING)
    except (NotYetValid, ExpiredToken) as err:
        outcome = type(err)
    if start is not None and now < start:
        assert outcome is NotYetValid
    elif now >= expiry:
        assert outcome is ExpiredToken
    else:
        assert outcome is None


@given(st.ip_addresses(), st.ip_addresses())
def test_ip_binding_holds_for_the_bound_address_only(bound: IPAddress, client: IPAddress) -> None:
    token = sign(key_id=KID, key=KEY, acl=["/*"], expiry=2, ip=str(bound))
    try:
        verify(token, path="/a", now=1, client_ip=str(client), keyring=KEYRING)
        accepted = True
    except WrongClient:
        accepted = False
    assert accepted == (_same_host(bound) == _same_host(client))
    # Another spelling of the bound address (exploded IPv6) is still the same client.
    verify(token, path="/a", now=1, client_ip=bound.exploded, keyring=KEYRING)


@given(cases(), st.text("abcXYZ019._-", min_size=1, max_size=8))
def test_a_key_id_outside_the_keyring_is_forged(case: Case, key_id: str) -> None:
    assume(key_id not in KEYRING)
    token = replace(case, key_id=key_id).sign(key=KEY)
    try:
        case.verify(token)
    except ForgedToken:
        return
    raise AssertionError("an unknown key id was accepted")


@given(cases(), st.binary(min_size=1, max_size=80))
def test_a_token_signed_with_another_secret_is_forged(case: Case, secret: bytes) -> None:
    assume(secret != KEYRING[case.key_id])
    try:
        case.verify(case.sign(key=secret))
    except ForgedToken:
        return
    raise AssertionError("a token under another secret was accepted")


@given(st.binary(min_size=1, max_size=200), st.text(max_size=300))
def test_the_keyed_and_copied_hmac_equals_the_one_shot_hmac(key: bytes, message: str) -> None:
    assert _mac(key, message) == hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


@given(st.text(max_size=120))
def test_arbitrary_text_is_refused_without_crashing(token: str) -> None:
    try:
        verify(token, path="/a", now=1, client_ip="192.0.2.1", keyring=KEYRING)
    except TokenError:
        return
    raise AssertionError(f"{token!r} was accepted")
