"""Token verification cost: streamplane.edge.verify() against a bare HMAC of the same text.

Method: sign a few typical tokens (an ACL token for a title, the same bound to a client
address, a URL token for one manifest), then time, in one process and on the same strings,
(a) verify() of the token for a segment path inside its grant, and (b) the floor any
verifier pays: ``hmac.new(key, signed_text, hashlib.sha256).hexdigest()``. Each side is the
best of several timeit repeats, in microseconds per call. The ratio says how much parsing,
the time, address and ACL checks and building the Grant add on top of the HMAC itself.
A comparison, not a pass/fail check.

    .venv/bin/python bench/tokens.py [--number 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import platform
import shlex
import sys
import timeit
from collections.abc import Callable

from streamplane.edge import key_from_hex, sign, verify

KEY = key_from_hex("52a152a152a152a152a152a152a152a1d6e7f8091a2b3c4d5e6f708192a3b4c5")
KEYRING = {"2024-06": KEY, "2024-05": key_from_hex("aa" * 32)}
START = 1_700_000_000
EXPIRY = START + 6 * 3600
NOW = START + 600
CLIENT = "198.51.100.23"
SEGMENT = "/title/tt0111161/v/1080p-h264/seg_00042.m4s"
MANIFEST = "/title/tt0111161/master.m3u8"


def _cases() -> list[tuple[str, str, str, str | None]]:
    """(label, token, path, client) for the tokens an edge sees most."""
    acl = ["/title/tt0111161/*"]
    return [
        (
            "ACL token, session id",
            sign(key_id="2024-06", key=KEY, acl=acl, expiry=EXPIRY, session_id="s-8c1f2a"),
            SEGMENT,
            CLIENT,
        ),
        (
            "ACL token, start + IP bound",
            sign(key_id="2024-06", key=KEY, acl=acl, start=START, expiry=EXPIRY, ip=CLIENT),
            SEGMENT,
            CLIENT,
        ),
        (
            "URL token",
            sign(key_id="2024-06", key=KEY, url=MANIFEST, expiry=EXPIRY),
            MANIFEST,
            None,
        ),
    ]


def _best_us(call: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=5, help="repeats; the best is kept")
    args = parser.parse_args()

    print(__doc__.split("\n\n")[1].replace("\n", " "))
    print()
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.system()}")
    print(f"{args.number} calls x best of {args.repeat}")
    print()
    header = (
        f"| {'token':<28} | {'verify() us':>11} | {'verify()/s':>10} "
        f"| {'bare HMAC us':>12} | {'ratio':>5} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for label, token, path, client in _cases():
        signed = token.rpartition("~hmac=")[0]
        message = (signed if "~acl=" in token else f"{signed}~url={path}").encode()

        def verify_call(
            token: str = token, path: str = path, client: str | None = client
        ) -> object:
            return verify(token, path=path, now=NOW, client_ip=client, keyring=KEYRING)

        def hmac_call(message: bytes = message) -> object:
            return hmac.new(KEY, message, hashlib.sha256).hexdigest()

        verify_call()  # raises if the case is not a valid grant
        ours = _best_us(verify_call, args.number, args.repeat)
        floor = _best_us(hmac_call, args.number, args.repeat)
        print(
            f"| {label:<28} | {ours:>11.2f} | {1e6 / ours:>10,.0f} "
            f"| {floor:>12.2f} | {ours / floor:>5.2f} |"
        )
    print()
    print("reproduce: .venv/bin/python bench/tokens.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
