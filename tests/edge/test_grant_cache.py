"""A remembered grant is checked by the same rules as a fresh verify, through one function."""

from __future__ import annotations

import pytest

from streamplane.edge import (
    ExpiredToken,
    ForgedToken,
    GrantCache,
    NotYetValid,
    PathNotAllowed,
    TokenError,
    check_grant,
    sign,
    verify,
)

KEY = bytes.fromhex("5f" * 32)
KEYRING = {"k1": KEY}
START, EXPIRY = 1_700_000_000, 1_700_000_600
ACL = sign(key_id="k1", key=KEY, acl=["/t1/*"], start=START, expiry=EXPIRY)
URL = sign(key_id="k1", key=KEY, url="/t1/master.m3u8", expiry=EXPIRY)


@pytest.mark.parametrize(
    ("token", "path", "now", "error"),
    [
        (ACL, "/t1/seg_1.m4s", START + 1, None),
        (ACL, "/t1/seg_1.m4s", START - 1, NotYetValid),
        (ACL, "/t1/seg_1.m4s", EXPIRY, ExpiredToken),
        (ACL, "/t2/seg_1.m4s", START + 1, PathNotAllowed),
        (ACL, "/t1/../t2/seg_1.m4s", START + 1, PathNotAllowed),
        (URL, "/t1/master.m3u8", START, None),
        (URL, "/t1/other.m3u8", START, PathNotAllowed),
    ],
)
def test_a_cached_grant_refuses_what_verify_refuses(
    token: str, path: str, now: int, error: type[TokenError] | None
) -> None:
    first = "/t1/master.m3u8" if token is URL else "/t1/seg_0.m4s"
    grant = verify(token, path=first, now=START + 1, client_ip="192.0.2.1", keyring=KEYRING)
    cache = GrantCache(KEYRING)
    cache.verify(token, path=first, now=START + 1, client_ip="192.0.2.1")
    if error is None:
        check_grant(grant, path=path, now=now)
        assert cache.verify(token, path=path, now=now, client_ip="192.0.2.1") == grant
        return
    with pytest.raises(error):
        check_grant(grant, path=path, now=now)
    with pytest.raises(error):
        cache.verify(token, path=path, now=now, client_ip="192.0.2.1")
    # a fresh verify of the same request says the same (URL tokens: another path is a forgery)
    with pytest.raises(ForgedToken if token is URL and error is PathNotAllowed else error):
        verify(token, path=path, now=now, client_ip="192.0.2.1", keyring=KEYRING)


def test_the_cache_remembers_only_grants_per_client_and_stays_bounded() -> None:
    cache = GrantCache(KEYRING, size=2)
    forged = ACL[:-1] + ("0" if ACL[-1] != "0" else "1")
    for _ in range(2):
        with pytest.raises(ForgedToken):
            cache.verify(forged, path="/t1/a.m4s", now=START + 1, client_ip="192.0.2.1")
    one = cache.verify(ACL, path="/t1/a.m4s", now=START + 1, client_ip="192.0.2.1")
    assert cache.verify(ACL, path="/t1/b.m4s", now=START + 2, client_ip="192.0.2.1") is one
    other = cache.verify(ACL, path="/t1/a.m4s", now=START + 1, client_ip="192.0.2.2")
    assert other == one and other is not one  # verified again for another client
    cache.verify(URL, path="/t1/master.m3u8", now=START + 1, client_ip="192.0.2.1")
    assert len(cache._grants) <= 2
