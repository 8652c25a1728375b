"""Runs a program that dies with the process that started it.

    python _tether.py PARENT_PID PROGRAM [ARG...]
    python _tether.py - PROGRAM [ARG...]        (the parent it has now)

A BgpFeed starts ExaBGP through this, and ExaBGP its API process (``_relay.py``). On Linux
it asks the kernel (``PR_SET_PDEATHSIG``) to send SIGKILL when its parent goes, then becomes
the program with ``execv``: the request survives the exec, so a control plane killed with
SIGKILL takes its speakers with it rather than leaving them holding their BGP sessions and
ports, and a speaker takes its API process. If the parent is already gone when the request
is made, no signal would come, so it exits instead. Standard library only: it runs before
every ExaBGP start and must cost little.

The kernel sends the signal when the *thread* that started the process ends, so the feed
must be started from a thread that lives as long as the feed (the event loop's).
"""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def tie_to_parent(parent: int) -> bool:
    """Ask for SIGKILL when the parent dies; False if ``parent`` is not the parent now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            error = ctypes.get_errno()
            print(f"streamplane tether: prctl failed: {os.strerror(error)}", file=sys.stderr)
            return False
    return os.getppid() == parent


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: _tether.py PARENT_PID PROGRAM [ARG...]", file=sys.stderr)
        return 2
    parent = os.getppid() if sys.argv[1] == "-" else int(sys.argv[1])
    if not tie_to_parent(parent):
        return 1
    os.execv(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
