"""Children that die with the process that started them (Linux ``PR_SET_PDEATHSIG``), and
tasks that stop when they are told to (``cancellable``).

A child outlives a killed parent otherwise: an encoder keeps its SRT port, a pool worker's
ffmpeg encodes on as an orphan, a stack's control plane holds its port for the next run.

``child_setup`` is what a ``preexec_fn`` runs between fork and exec. Everything it needs
(ctypes loaded, libc's ``prctl`` looked up, the parent's pid) is resolved *before* the fork:
after a fork in a threaded process, the child must take no lock another thread may have held
at the moment of the fork. An ``import`` (the import lock) or a ``dlopen`` (the loader's lock)
there deadlocked a test run's forked child for good, and every later fork of that process too.

The kernel sends the signal when the *thread* that started the child ends, so children are
started from threads that live as long as their process (the main thread, the event loop's).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import cache
from typing import TypeVar

_PR_SET_PDEATHSIG = 1
_T = TypeVar("_T")


@cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent ``parent`` exits (Linux;
    elsewhere a no-op). The parent may be gone before this runs, hence the check after
    arming: then this process ends itself the same way."""
    prctl = _prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def child_setup(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that ties the child to this process, resolved before the fork; None
    where there is nothing to do. SIGTERM for children that clean up after themselves (a
    stack's servers stop their own children), SIGKILL for the rest."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    return lambda: die_with_parent(parent, sig)


PARENT_ENV = "STREAMPLANE_PARENT_PID"  # a streamplane child arms the signal itself, after exec


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a ``python -m streamplane`` child that is to die (SIGTERM) with this process.

    The child arms the signal itself as it starts (``arm_from_env``), so its parent needs no
    ``preexec_fn`` at all: Python's own documentation calls one unsafe in a threaded process,
    and a stack started from a worker thread of an asyncio test run had its forked child hang
    in a futex before exec, twice at the same test."""
    return {**env, PARENT_ENV: str(os.getpid())}


def arm_from_env() -> None:
    """In a streamplane process as it starts: die with the parent ``child_env`` named."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is not None and parent.isdigit():
        die_with_parent(int(parent), signal.SIGTERM)


async def cancellable(awaitable: Awaitable[_T]) -> _T:
    """Await a client library's call without losing a cancellation of the calling task.

    Two of the libraries under the brokers lose one. redis-py writes every command under
    ``asyncio.wait_for`` (its ``socket_timeout``); on Python 3.11, ``wait_for`` returns the
    write's result when its caller is cancelled in the instant the write completes. nats-py's
    ``next_msg`` (under a pull consumer's ``fetch``) turns a cancellation into
    ``ConnectionClosedError`` when the connection is closed by then. Either way the task runs
    on, and a loop told to stop (the gateway's ticker, a pub/sub link, a telemetry consumer)
    never does: whoever awaits it waits for ever. The request is still counted on the task
    (``cancelling``): raise it."""
    task = asyncio.current_task()
    asked = task.cancelling() if task is not None else 0
    try:
        result = await awaitable
    except Exception as exc:
        if task is not None and task.cancelling() > asked:
            raise asyncio.CancelledError from exc
        raise
    if task is not None and task.cancelling() > asked:
        raise asyncio.CancelledError
    return result
