"""Cross-check against Akamai's own generator (PyPI ``akamai-edgeauth``, a dev extra).

Akamai's layout has no key id, so the kid is handed to the reference generator as the tail
of its last field ("...~kid=K"): it emits values verbatim (``escape_early`` off), so the
token it returns must equal ours byte for byte, and our verifier must accept it.
"""

from __future__ import annotations

import importlib
import ipaddress
import os

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from streamplane.edge import sign, verify
from streamplane.edge.tokens import _is_clean_path

# The package sets TZ=GMT for the whole process on import; keep that from leaking.
_saved_tz = os.environ.get("TZ")
try:
    EdgeAuth = importlib.import_module("akamai.edgeauth").EdgeAuth
except Exception as err:  # ImportError, or its pkg_resources namespace package failing
    pytest.skip(f"akamai-edgeauth is not importable: {err!r}", allow_module_level=True)
finally:
    if _saved_tz is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = _saved_tz

HEX_KEY = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
KEY = bytes.fromhex(HEX_KEY)
KID = "2024-06"

values = st.text(st.sampled_from("abcXYZ019!$'()*-./:<=>?@[]^_`{|}"), min_size=1, max_size=12)
acl_patterns = st.text(st.sampled_from("abc019-_./*"), max_size=12).map(lambda s: "/" + s)
times = st.integers(min_value=1, max_value=2**40)


def _akamai(
    *,
    acl: list[str] | None,
    url: str | None,
    start: int | None,
    expiry: int,
    ip: str | None,
    session_id: str | None,
    data: str | None,
    hex_key: str = HEX_KEY,
) -> str:
    """Akamai's token, with our kid smuggled in as the tail of its last field."""
    kid = f"~kid={KID}"
    if data is not None:
        data += kid
    elif session_id is not None:
        session_id += kid
    elif acl is not None:
        acl = [*acl[:-1], acl[-1] + kid]
    else:
        raise ValueError("a URL token needs an id or data field to carry the kid")
    generator = EdgeAuth(
        key=hex_key,
        ip=ip,
        start_time=start,
        end_time=expiry,
        session_id=session_id,
        payload=data,
    )
    if acl is not None:
        return str(generator.generate_acl_token(acl))
    return str(generator.generate_url_token(url))


def test_acl_token_equals_akamais() -> None:
    args = {
        "acl": ["/title/abc/*", "/title/def/v/*"],
        "url": None,
        "start": 1_700_000_000,
        "expiry": 1_700_003_600,
        "ip": "203.0.113.7",
        "session_id": "sess-42",
        "data": "plan:premium",
    }
    ours = sign(key_id=KID, key=KEY, **args)  # type: ignore[arg-type]
    assert ours == _akamai(**args)  # type: ignore[arg-type]


def test_url_token_equals_akamais() -> None:
    args = {
        "acl": None,
        "url": "/title/abc/master.m3u8",
        "start": None,
        "expiry": 1_700_003_600,
        "ip": None,
        "session_id": None,
        "data": "d",
    }
    ours = sign(key_id=KID, key=KEY, **args)  # type: ignore[arg-type]
    assert ours == _akamai(**args)  # type: ignore[arg-type]


@given(
    is_url=st.booleans(),
    acl=st.lists(acl_patterns, min_size=1, max_size=3),
    start=st.none() | times,
    expiry=times,
    ip=st.none() | st.ip_addresses().map(str),
    session_id=st.none() | values,
    data=st.none() | values,
    key=st.binary(min_size=1, max_size=80),
)
def test_tokens_equal_akamais_and_verify_both_ways(
    is_url: bool,
    acl: list[str],
    start: int | None,
    expiry: int,
    ip: str | None,
    session_id: str | None,
    data: str | None,
    key: bytes,
) -> None:
    assume(start is None or start < expiry)
    assume(not is_url or session_id is not None or data is not None)
    if ip is not None:
        # Akamai's generator carries the address as given; ours writes the canonical form.
        address = ipaddress.ip_address(ip)
        mapped = getattr(address, "ipv4_mapped", None)
        ip = str(mapped or address)
    url = "/title/abc/seg_1.m4s"
    args = {
        "acl": None if is_url else acl,
        "url": url if is_url else None,
        "start": start,
        "expiry": expiry,
        "ip": ip,
        "session_id": session_id,
        "data": data,
    }
    ours = sign(key_id=KID, key=key, **args)  # type: ignore[arg-type]
    theirs = _akamai(hex_key=key.hex(), **args)  # type: ignore[arg-type]
    assert ours == theirs
    path = url if is_url else acl[0].replace("*", "")
    if _is_clean_path(path):
        grant = verify(theirs, path=path, now=expiry - 1, client_ip=ip, keyring={KID: key})
        assert grant.data == data
