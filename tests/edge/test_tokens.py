"""Example-based tests of the token core: the pinned layout, every error, every helper."""

from __future__ import annotations

import binascii
import hashlib
import hmac
from urllib.parse import unquote, urlsplit

import pytest

from streamplane.edge import (
    DEFAULT_TOKEN_NAME,
    ExpiredToken,
    ForgedToken,
    Grant,
    MalformedToken,
    MissingToken,
    NotYetValid,
    PathNotAllowed,
    TokenError,
    WrongClient,
    key_from_hex,
    sign,
    signed_url,
    token_from_request,
    tokens,
    verify,
)

HEX_KEY = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
KEY = key_from_hex(HEX_KEY)
KID = "2024-06"
KEYRING = {KID: KEY}
START = 1_700_000_000
EXPIRY = 1_700_003_600
NOW = START + 60
SEGMENT = "/title/abc/v/720/seg_1.m4s"


def _hmac_hex(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _acl_token(**overrides: object) -> str:
    args: dict[str, object] = {
        "key_id": KID,
        "key": KEY,
        "acl": ["/title/abc/*"],
        "expiry": EXPIRY,
    }
    args.update(overrides)
    return sign(**args)  # type: ignore[arg-type]


def _verify(token: str | None, **overrides: object) -> Grant:
    args: dict[str, object] = {
        "path": SEGMENT,
        "now": NOW,
        "client_ip": "198.51.100.9",
        "keyring": KEYRING,
    }
    args.update(overrides)
    return verify(token, **args)  # type: ignore[arg-type]


def _with_valid_mac(signed: str, key: bytes = KEY) -> str:
    """A token whose HMAC is right, so only the layout can make verify refuse it."""
    return f"{signed}~hmac={_hmac_hex(key, signed)}"


# --- the byte layout -------------------------------------------------------------------


def test_acl_token_vector_matches_akamai_layout_from_first_principles() -> None:
    # Akamai's generator: fields ip, st, exp, acl, id, data joined by "~", HMAC-SHA256
    # under the unhexlified key over exactly that text, then "~hmac=<hex>". Our kid sits
    # last before hmac, inside the signed text.
    signed = (
        "ip=203.0.113.7~st=1700000000~exp=1700003600~acl=/title/abc/*!/title/def/v/*"
        "~id=sess-42~data=plan:premium~kid=2024-06"
    )
    expected = f"{signed}~hmac={_hmac_hex(binascii.a2b_hex(HEX_KEY), signed)}"
    token = sign(
        key_id=KID,
        key=KEY,
        acl=["/title/abc/*", "/title/def/v/*"],
        start=START,
        expiry=EXPIRY,
        ip="203.0.113.7",
        session_id="sess-42",
        data="plan:premium",
    )
    assert token == expected
    # Pinned literally too, so a change to both code and test derivation is still caught.
    assert token.endswith("~hmac=3ac7cec46509c51c763479b71f2fe7014ae0ba658ac2c21b8b89deaf0d72c600")


def test_url_token_signs_the_url_but_does_not_carry_it() -> None:
    url = "/title/abc/master.m3u8"
    token = sign(key_id=KID, key=KEY, url=url, expiry=EXPIRY, session_id="sess-42")
    signed = "exp=1700003600~id=sess-42~kid=2024-06"
    assert token == f"{signed}~hmac={_hmac_hex(KEY, signed + '~url=' + url)}"
    assert token.endswith("~hmac=55bbd3a93d75fb6b3b13c1b2e60417e1bea1c6c951eee648b267995bfccd83b0")
    assert "url=" not in token

    grant = _verify(token, path=url)
    assert grant.url == url and grant.acl is None
    with pytest.raises(ForgedToken):
        _verify(token, path="/title/abc/other.m3u8")


def test_minimal_token_has_exp_acl_kid_hmac_only() -> None:
    token = _acl_token()
    assert token.startswith("exp=1700003600~acl=/title/abc/*~kid=2024-06~hmac=")
    assert len(token.rpartition("~hmac=")[2]) == 64


def test_grant_reports_what_the_token_says() -> None:
    token = _acl_token(
        acl=["/title/abc/*", "/title/xyz/*"],
        start=START,
        ip="198.51.100.9",
        session_id="s-1",
        data="d",
    )
    assert _verify(token) == Grant(
        key_id=KID,
        expiry=EXPIRY,
        start=START,
        acl=("/title/abc/*", "/title/xyz/*"),
        url=None,
        ip="198.51.100.9",
        session_id="s-1",
        data="d",
    )


# --- errors and their statuses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (TokenError, 403),
        (MissingToken, 403),
        (MalformedToken, 403),
        (ForgedToken, 403),
        (ExpiredToken, 410),
        (NotYetValid, 403),
        (PathNotAllowed, 403),
        (WrongClient, 403),
    ],
)
def test_each_error_carries_its_http_status(error: type[TokenError], status: int) -> None:
    assert issubclass(error, TokenError)
    assert error.http_status == status
    assert error("why").http_status == status


@pytest.mark.parametrize(
    ("token", "kwargs", "error", "status"),
    [
        (None, {}, MissingToken, 403),
        ("", {}, MissingToken, 403),
        ("exp=1~hmac=00", {}, MalformedToken, 403),
        (_acl_token(key=b"another secret"), {}, ForgedToken, 403),
        (_acl_token(key_id="retired"), {}, ForgedToken, 403),
        (_acl_token(), {"now": EXPIRY}, ExpiredToken, 410),
        (_acl_token(start=START), {"now": START - 1}, NotYetValid, 403),
        (_acl_token(), {"path": "/title/xyz/seg_1.m4s"}, PathNotAllowed, 403),
        (_acl_token(ip="203.0.113.7"), {}, WrongClient, 403),
    ],
)
def test_verify_raises_each_error_with_its_status(
    token: str | None, kwargs: dict[str, object], error: type[TokenError], status: int
) -> None:
    with pytest.raises(error) as caught:
        _verify(token, **kwargs)
    assert type(caught.value) is error
    assert caught.value.http_status == status
    assert str(caught.value)


# --- time --------------------------------------------------------------------------------


def test_validity_is_half_open_from_start_to_expiry() -> None:
    token = _acl_token(start=START)
    with pytest.raises(NotYetValid):
        _verify(token, now=START - 1)
    assert _verify(token, now=START).start == START
    assert _verify(token, now=EXPIRY - 1).expiry == EXPIRY
    with pytest.raises(ExpiredToken):
        _verify(token, now=EXPIRY)


# --- keys and rotation -------------------------------------------------------------------


def test_key_rotation_by_key_id() -> None:
    old, new = key_from_hex("aa" * 32), key_from_hex("bb" * 32)
    old_token = sign(key_id="k1", key=old, acl=["/*"], expiry=EXPIRY)
    new_token = sign(key_id="k2", key=new, acl=["/*"], expiry=EXPIRY)
    both = {"k1": old, "k2": new}
    assert _verify(old_token, keyring=both).key_id == "k1"
    assert _verify(new_token, keyring=both).key_id == "k2"
    with pytest.raises(ForgedToken, match="unknown key id"):
        _verify(old_token, keyring={"k2": new})
    # The kid is signed: relabelling a token to another key breaks it.
    relabelled = old_token.replace("~kid=k1~", "~kid=k2~")
    with pytest.raises(ForgedToken):
        _verify(relabelled, keyring=both)


def test_key_from_hex_follows_akamai_unhexlify() -> None:
    assert key_from_hex("0a1B") == b"\x0a\x1b"
    for bad in ["", "abc", "zz", "0a 1b", "0a\n"]:
        with pytest.raises(ValueError):
            key_from_hex(bad)


# --- strict parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signed",
    [
        "exp=1700003600~exp=1700003600~acl=/*~kid=2024-06",  # duplicate
        "exp=1700003600~acl=/*~acl=/*~kid=2024-06",  # duplicate
        "exp=1700003600~acl=/*~kid=2024-06~kid=2024-06",  # duplicate
        "exp=1700003600~acl=/*~foo=bar~kid=2024-06",  # unknown
        "exp=1700003600~acl=/*~salt=x~kid=2024-06",  # Akamai's salt is never in a token
        "exp=1700003600~url=/title/abc/v/720/seg_1.m4s~kid=2024-06",  # nor is url
        "exp=1700003600~acl=/*~id=~kid=2024-06",  # empty value
        "exp=1700003600~acl=/*~id~kid=2024-06",  # no "="
        "exp=1700003600~acl=~kid=2024-06",  # empty acl
        "exp=1700003600~acl=/*~~kid=2024-06",  # empty field
        "exp=17OO003600~acl=/*~kid=2024-06",  # not an integer
        "exp=-1700003600~acl=/*~kid=2024-06",
        "exp=0~acl=/*~kid=2024-06",
        "exp=01700003600~acl=/*~kid=2024-06",  # not canonical
        "exp=1.7e9~acl=/*~kid=2024-06",
        "st=abc~exp=1700003600~acl=/*~kid=2024-06",
        "acl=/*~exp=1700003600~kid=2024-06",  # order
        "exp=1700003600~st=1700000000~acl=/*~kid=2024-06",  # order
        "kid=2024-06~exp=1700003600~acl=/*",  # order
        "exp=1700003600~acl=/*~data=x~id=y~kid=2024-06",  # order
        "st=1700000000~ip=203.0.113.7~exp=1700003600~acl=/*~kid=2024-06",  # order
        "acl=/*~kid=2024-06",  # no exp
        "exp=1700003600~acl=/*",  # no kid
        "exp=1700003600~acl=/title/abc/*!!/x/*~kid=2024-06",  # empty acl entry
        "exp=1700003600~acl=/title/abc/*!~kid=2024-06",  # empty acl entry
        "ip=not-an-address~exp=1700003600~acl=/*~kid=2024-06",
        "exp=1700003600~acl=/*~data=a b~kid=2024-06",  # space
        "exp=1700003600~acl=/*~data=caf\u00e9~kid=2024-06",  # not ASCII
        "exp=1700003600~acl=/*~data=a%2Fb~kid=2024-06",  # escaping we never do
        "exp=1700003600~acl=/*~data=" + "x" * 5000 + "~kid=2024-06",  # too long
    ],
)
def test_layouts_sign_never_makes_are_malformed_even_with_a_valid_mac(signed: str) -> None:
    with pytest.raises(MalformedToken):
        _verify(_with_valid_mac(signed), client_ip="203.0.113.7")


@pytest.mark.parametrize(
    "token",
    [
        "exp=1700003600~acl=/*~kid=2024-06",  # no hmac
        "exp=1700003600~acl=/*~kid=2024-06~hmac=",
        "exp=1700003600~acl=/*~kid=2024-06~hmac=abc",
        "exp=1700003600~acl=/*~kid=2024-06~hmac=" + "0" * 65,
        "hmac=" + "0" * 64 + "~exp=1700003600~acl=/*~kid=2024-06",  # hmac not last
        "~hmac=" + "0" * 64,
        "hmac=" + "0" * 64,
        "garbage",
        "exp=1700003600~acl=/*~kid=2024-06~hmac=" + "\u0660" * 64,
    ],
)
def test_a_token_without_a_final_hmac_is_malformed(token: str) -> None:
    with pytest.raises(MalformedToken):
        _verify(token)


def test_uppercase_hmac_is_not_the_hmac() -> None:
    signed, _, mac = _acl_token().rpartition("~hmac=")
    with pytest.raises(ForgedToken):
        _verify(f"{signed}~hmac={mac.upper()}")


@pytest.mark.parametrize("length", [1, 32, 63, 64, 65, 128, 200])
def test_the_mac_is_rfc_2104_hmac_sha256_for_keys_of_every_length(length: int) -> None:
    # 64 bytes is SHA-256's block: a longer key is hashed first, a shorter one padded.
    key = bytes(range(7, 7 + length))
    acl = sign(key_id=KID, key=key, acl=["/title/abc/*"], expiry=EXPIRY)
    url = sign(key_id=KID, key=key, url=SEGMENT, expiry=EXPIRY)
    for token, message in ((acl, ""), (url, "~url=" + SEGMENT)):
        signed, _, mac = token.rpartition("~hmac=")
        assert mac == _hmac_hex(key, signed + message)
        assert _verify(token, keyring={KID: key}).key_id == KID
    assert tokens._mac(key, "") == _hmac_hex(key, "")


def test_the_mac_is_the_standard_librarys_hmac_keyed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not HMAC rebuilt from pad states: hmac.new keys it, once per key (then copied per message).
    keyed: list[tuple[bytes, object]] = []
    real = hmac.new

    def spy(key: bytes, msg: bytes | None = None, digestmod: object = None) -> hmac.HMAC:
        keyed.append((key, digestmod))
        return real(key, msg, digestmod)

    monkeypatch.setattr(hmac, "new", spy)
    key = b"a key only this test signs with"
    tokens_signed = [_acl_token(key=key, session_id=f"s{n}") for n in range(3)]
    for token in tokens_signed:
        _verify(token, keyring={KID: key})
    assert keyed == [(key, hashlib.sha256)]


# --- paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/title/abc/../secret",
        "/title/abc/..",
        "/title/abc/./seg_1.m4s",
        "/title/abc/.",
        "/title/abc/%2e%2e/secret",
        "/title/abc/%2E%2E/secret",
        "/title/abc/..%2fsecret",
        "/title/abc/%252e%252e/secret",
        "/title/abc//seg_1.m4s",
        "//title/abc/seg_1.m4s",
        "/title/abc/seg_1.m4s\x00.txt",
        "/title/abc/\r\nX-Injected: 1",
        "/title/abc\\..\\secret",
        "/title/abc/..\\secret",
        "title/abc/seg_1.m4s",
        "",
    ],
)
@pytest.mark.parametrize("acl", [["/*"], ["/title/*"], ["/title/abc/*"], ["*"]])
def test_unnormalised_paths_are_refused_whatever_the_acl(path: str, acl: list[str]) -> None:
    # "*" alone is no pattern sign() accepts; the MAC is forged by hand to show that even
    # such a token cannot open these paths.
    if acl == ["*"]:
        token = _with_valid_mac(f"exp={EXPIRY}~acl=*~kid={KID}")
    else:
        token = _acl_token(acl=acl)
    with pytest.raises((PathNotAllowed, MalformedToken)):
        _verify(token, path=path)


@pytest.mark.parametrize(
    ("acl", "path", "allowed"),
    [
        ("/title/abc/*", "/title/abc/", True),
        ("/title/abc/*", "/title/abc/v/720/seg_1.m4s", True),
        ("/title/abc/*", "/title/abcd/seg_1.m4s", False),
        ("/title/abc/*", "/title/ab", False),
        ("/title/abc", "/title/abc", True),
        ("/title/abc", "/title/abc/", False),
        ("/title/*/master.m3u8", "/title/abc/master.m3u8", True),
        ("/title/*/master.m3u8", "/title/a/b/c/master.m3u8", True),  # * crosses "/"
        ("/title/*/master.m3u8", "/title/abc/master.m3u8.bak", False),
        ("/title/*/v/*/init.mp4", "/title/abc/v/720/init.mp4", True),
        ("/title/*/v/*/init.mp4", "/title/abc/a/720/init.mp4", False),
        ("/*a*a*", "/aa", True),
        ("/*a*a*", "/a", False),
        ("/ab*ba", "/aba", False),  # the pieces may not overlap
        ("/ab*ba", "/abba", True),
        ("/title/abc/**", "/title/abc/x", True),
    ],
)
def test_acl_wildcard_semantics(acl: str, path: str, allowed: bool) -> None:
    token = _acl_token(acl=[acl])
    if allowed:
        assert _verify(token, path=path).acl == (acl,)
    else:
        with pytest.raises(PathNotAllowed):
            _verify(token, path=path)


def test_any_of_several_acls_allows() -> None:
    token = _acl_token(acl=["/title/abc/*", "/title/def/master.m3u8"])
    _verify(token, path="/title/abc/x")
    _verify(token, path="/title/def/master.m3u8")
    with pytest.raises(PathNotAllowed):
        _verify(token, path="/title/def/v/720/seg_1.m4s")


# --- client address -----------------------------------------------------------------------


def test_ip_binding() -> None:
    token = _acl_token(ip="203.0.113.7")
    assert _verify(token, client_ip="203.0.113.7").ip == "203.0.113.7"
    # A dual-stack listener reports IPv4 clients as mapped IPv6 addresses.
    _verify(token, client_ip="::ffff:203.0.113.7")
    for other in ["203.0.113.8", None, "", "not-an-ip", "2001:db8::1"]:
        with pytest.raises(WrongClient):
            _verify(token, client_ip=other)


def test_ipv6_binding_is_by_address_not_spelling() -> None:
    token = _acl_token(ip="2001:DB8:0:0:0:0:0:1")
    assert "ip=2001:db8::1~" in token
    _verify(token, client_ip="2001:db8::1")
    _verify(token, client_ip="2001:0db8::0001")
    with pytest.raises(WrongClient):
        _verify(token, client_ip="2001:db8::2")


def test_unbound_token_ignores_the_client() -> None:
    _verify(_acl_token(), client_ip=None)


# --- sign refuses what could not verify ----------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"acl": None}, ValueError),
        ({"url": "/title/abc/master.m3u8"}, ValueError),  # both acl and url
        ({"acl": "/title/*"}, TypeError),
        ({"acl": []}, ValueError),
        ({"acl": ["title/*"]}, ValueError),
        ({"acl": ["/a/*!/b/*"]}, ValueError),
        ({"acl": ["/a?b"]}, ValueError),
        ({"acl": ["/a~b"]}, ValueError),
        ({"acl": ["/a b"]}, ValueError),
        ({"acl": [""]}, ValueError),
        ({"expiry": 0}, ValueError),
        ({"expiry": True}, ValueError),
        ({"expiry": 1.5}, ValueError),
        ({"start": EXPIRY}, ValueError),
        ({"start": EXPIRY + 1}, ValueError),
        ({"start": 0}, ValueError),
        ({"ip": "203.0.113.999"}, ValueError),
        ({"session_id": ""}, ValueError),
        ({"session_id": "a~b"}, ValueError),
        ({"data": "a+b"}, ValueError),
        ({"data": "a%20b"}, ValueError),
        ({"data": "a&b"}, ValueError),
        ({"data": "a;b"}, ValueError),
        ({"data": 'a"b'}, ValueError),
        ({"data": "caf\u00e9"}, ValueError),
        ({"key": b""}, ValueError),
        ({"key": "hex string"}, ValueError),
        ({"key_id": ""}, ValueError),
        ({"key_id": "k~1"}, ValueError),
        ({"key_id": "k" * 65}, ValueError),
    ],
)
def test_sign_refuses_arguments_no_verifier_could_accept(
    overrides: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        _acl_token(**overrides)


@pytest.mark.parametrize("url", ["/title/../secret", "/a//b", "relative", "/a/%2e%2e", "/a\\b"])
def test_sign_refuses_unnormalised_urls(url: str) -> None:
    with pytest.raises(ValueError):
        sign(key_id=KID, key=KEY, url=url, expiry=EXPIRY)


# --- carrying the token ---------------------------------------------------------------------


def test_token_from_query() -> None:
    token = _acl_token()
    assert token_from_request(f"a=1&{DEFAULT_TOKEN_NAME}={token}&b=2", None) == token
    assert token_from_request(f"?__token__={token}", None) == token
    assert token_from_request("__token__=" + token.replace("~", "%7E"), None) == token
    assert token_from_request(f"hdnts={token}", None, name="hdnts") == token
    assert token_from_request(f"hdnts={token}", None) is None
    assert token_from_request("", None) is None
    assert token_from_request("__token__=", None) is None


def test_token_given_twice_in_the_query_is_refused() -> None:
    token = _acl_token()
    with pytest.raises(MalformedToken):
        token_from_request(f"__token__={token}&__token__={token}", None)


def test_token_from_cookie() -> None:
    token = _acl_token()
    assert token_from_request("", f"__token__={token}") == token
    assert token_from_request("", f"theme=dark; __token__={token}; lang=en") == token
    assert token_from_request("", f'__token__="{token}"') == token
    # Browsers list the cookie with the most specific Path first; that one is used.
    assert token_from_request("", f"__token__={token}; __token__=older") == token
    assert token_from_request("", "x__token__=nope; theme=dark") is None
    assert token_from_request("", "__token__=") is None
    assert token_from_request("", None) is None


def test_query_wins_over_cookie() -> None:
    token = _acl_token()
    assert token_from_request(f"__token__={token}", "__token__=stale") == token
    assert token_from_request("__token__=", f"__token__={token}") == token


def test_signed_url_round_trips_through_the_edge() -> None:
    path = "/title/abc/v/720/seg 1.m4s"
    # Characters a URL must percent-encode, to show the query round trip restores them.
    data = "k=v:[1]{2}|<3>^`"
    token = _acl_token(acl=["/title/abc/*"], data=data)
    url = signed_url("https://edge1.example:8443", path, token)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == "https://edge1.example:8443"
    assert parts.path == "/title/abc/v/720/seg%201.m4s"
    # What the edge does: decode the path, take the token, verify.
    grant = _verify(token_from_request(parts.query, None), path=unquote(parts.path))
    assert grant.data == data


def test_signed_url_keeps_akamai_token_characters_readable() -> None:
    token = _acl_token(acl=["/title/abc/*", "/title/def/*"], session_id="s-1")
    url = signed_url("https://edge1.example", SEGMENT, token)
    assert url == f"https://edge1.example{SEGMENT}?__token__={token}"


@pytest.mark.parametrize(
    "base", ["edge1.example", "https://", "https://e/prefix", "https://e?x=1", "https://e#f"]
)
def test_signed_url_wants_scheme_and_host_only(base: str) -> None:
    with pytest.raises(ValueError):
        signed_url(base, SEGMENT, _acl_token())


def test_signed_url_refuses_unnormalised_paths() -> None:
    with pytest.raises(ValueError):
        signed_url("https://e", "/title/../secret", _acl_token())
