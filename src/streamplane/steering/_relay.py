"""ExaBGP's API process for a BgpFeed: copies ExaBGP's JSON lines to the feed's socket.

ExaBGP talks to API processes over their stdin/stdout only; this runs as one (with no
streamplane import, so it starts in milliseconds) and forwards every line to the Unix
socket the feed listens on. It exits when ExaBGP closes stdin or the feed goes away. ExaBGP
runs it through ``_tether.py``, so it is killed when ExaBGP dies too (ExaBGP puts it in a
process group of its own: a signal to ExaBGP's group does not reach it).

    python _relay.py SOCKET_PATH
"""

import socket
import sys
import time


def main() -> int:
    path = sys.argv[1]
    deadline = time.monotonic() + 30.0
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                print(f"streamplane relay: cannot connect to {path}", file=sys.stderr)
                return 1
            time.sleep(0.05)
    try:
        for line in sys.stdin.buffer:
            sock.sendall(line)
    except OSError:  # the feed stopped
        return 0
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
