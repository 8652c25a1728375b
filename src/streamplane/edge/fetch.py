"""Misses: start or join the origin fetch of an object, wait for its length, follow its bytes.

Every worker uses this for its clients' misses and the supervisor for the fill, so a client
and the fill asking for the same object share one origin request, whichever process asked
first. The rules that keep it to one request per object, whatever happens:

- the fetch is started only when the disk shows nobody fetching it (``DiskCache.look``
  gives ``None``), and ``DiskCache.begin`` refuses to start one when the object or its
  error turned up meanwhile;
- every failure is recorded before the partial goes (``ObjectWriter.abort``), whatever
  raised, so no waiter ever sees "nobody fetches it" after a failure;
- a fetcher that died (its lock on the partial is free) is taken over at once, and a reader
  half way through its body follows the new fetch when it brings the same object.

A waiter in the fetching process is woken on every chunk; one in another process when the
partial's size changes, which one look at the disk every few milliseconds sees for all the
process's waiters of that object.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from streamplane.edge.cache import (
    Arriving,
    Complete,
    DiskCache,
    Failed,
    FetchError,
    InflightMeta,
    Lookup,
    ObjectWriter,
    Pending,
    TakenOver,
    error_text,
    marked_complete,
    writer_alive,
)
from streamplane.edge.metrics import MetricsSnapshot
from streamplane.edge.origin import Origin

__all__ = ["Fetches", "Follower"]

_POLL_S: Final = 0.005  # a waiter in another process looks at the disk this often
_WAKE_S: Final = 0.05  # a waiter in the fetching process also looks this often


class Fetches:
    """The fetches one process runs, and the waiting for anyone's."""

    def __init__(
        self,
        cache: DiskCache,
        origin: Origin,
        *,
        stall_s: float,
        stored: Callable[[str, int], None],
        warn: Callable[[str, str], None],
        counters: MetricsSnapshot | None = None,
    ) -> None:
        self.cache = cache
        self.origin = origin
        self.stall_s = stall_s
        self.stored = stored  # an object was committed: the eviction policy must know
        self.warn = warn
        self.counters = counters or MetricsSnapshot()
        self.running: dict[str, asyncio.Event] = {}  # key -> set on every chunk
        self._changes: dict[str, asyncio.Future[None]] = {}  # key -> one wait (see progress)
        self._tasks: set[asyncio.Task[None]] = set()

    def ensure(self, key: str) -> bool:
        """Start the fetch of ``key`` unless one runs somewhere; True if it joins one.

        Raises ``FetchError`` for a key no client could ask for, or when the disk refuses.
        """
        if key in self.running:
            return True
        writer = self.cache.begin(key, self.stall_s)
        if writer is None:
            return True
        event = self.running[key] = asyncio.Event()
        self._spawn(self._run(key, writer, event))
        return False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # The loop keeps only weak references to tasks: hold them until they finish.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: str, writer: ObjectWriter, event: asyncio.Event) -> None:
        c = self.counters
        c.origin_fetches += 1
        try:
            await self.origin.fetch(key, writer, event.set)
            size = writer.commit()
        except TakenOver:
            c.origin_errors += 1
            writer.abort()  # the fetch that took over answers the waiters
        except FetchError as exc:
            c.origin_errors += 1
            writer.abort(exc.status, store=exc.store)
            if exc.status == 503:
                self.warn("cache-full", str(exc))
        except asyncio.CancelledError:  # abandoned (shutdown), not failed: others may retry
            writer.abort()
            raise
        except Exception as exc:  # a fault nobody foresaw: this object fails, nothing else
            c.origin_errors += 1
            writer.abort(502)
            self.warn("fetch", f"fetching {key} failed: {exc!r}")
        else:
            c.origin_bytes += size
            self.cache.clear_error(key)
            self.stored(key, size)
        finally:
            if self.running.get(key) is event:
                del self.running[key]
            event.set()

    async def outcome(self, key: str, *, rejoin: bool = False) -> Complete | Arriving | Failed:
        """Start or join the fetch of ``key`` and wait until its length is known, it is
        complete, or it failed (504 when the origin gives no length within ``stall_s``).

        An ``Arriving`` or ``Complete`` result holds a descriptor the caller closes. The
        waiter holds the partial open from the moment it sees it, so the object is never
        lost to it, even when evicted the moment it is complete (see ``DiskCache.recheck``).
        """
        deadline = time.monotonic() + self.stall_s
        started = False
        held = -1
        found: Lookup
        try:
            while True:
                if held >= 0:
                    found = self.cache.recheck(key, held)
                    if found is None:
                        # the fetch it waited on failed, no-store or not: its waiters get
                        # that answer, never a fetch of their own
                        status = self.cache.fetch_error(key, held)
                        if status is not None:
                            return Failed(status, error_text(status))
                        os.close(held)
                        held = -1
                        continue  # look afresh, now
                else:
                    found = self.cache.look(key)
                if found is None:
                    try:
                        if not self.ensure(key):
                            started = True
                            continue  # hold its partial at once, before it can fail
                    except FetchError as exc:
                        return Failed(exc.status, str(exc))
                elif isinstance(found, Pending):
                    held = found.fd
                else:
                    held = -1  # the result carries it
                    if not started and not rejoin:
                        self.counters.collapsed += 1
                    return found
                if time.monotonic() > deadline:
                    return Failed(504, "the origin did not answer in time")
                await self.progress(key)
        finally:
            if held >= 0:
                os.close(held)

    async def complete(self, key: str) -> int:
        """Start or join the fetch of ``key`` and wait until it is complete; its size."""
        while True:
            found = await self.outcome(key, rejoin=True)
            if isinstance(found, Failed):
                raise FetchError(found.status, found.message)
            if isinstance(found, Complete):
                os.close(found.obj.fd)
                return found.obj.size
            follower = Follower(self, key, found)
            try:
                pos = 0
                while follower.meta.length < 0 or pos < follower.meta.length:
                    pos = await follower.available(pos)
                while writer_alive(follower.fd):  # its fetcher is renaming it into place
                    await self.progress(key)
            finally:
                follower.close()

    async def progress(self, key: str) -> None:
        """Wait a little for ``key``'s fetch to move on.

        Until its next chunk when it runs in this process; until its partial changes size
        (looked at every ``_POLL_S``) when it runs in another; ``_WAKE_S`` at most. Every
        waiter of ``key`` in this process shares one such wait: each waiting on its own cost
        a task or a timer per waiter per round, and made a miss storm's CPU mostly Python
        (``bench/edge.py``).
        """
        change = self._changes.get(key)
        if change is None:
            change = self._changes[key] = asyncio.get_running_loop().create_future()
            self._spawn(self._watch(key, change))
        # shielded: a waiter that goes (its client did) must not cancel the others' wait
        await asyncio.shield(change)

    async def _watch(self, key: str, change: asyncio.Future[None]) -> None:
        try:
            event = self.running.get(key)
            if event is not None:
                event.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), _WAKE_S)
                return
            size = self._partial_size(key)
            for _ in range(round(_WAKE_S / _POLL_S)):
                await asyncio.sleep(_POLL_S)
                if key in self.running or self._partial_size(key) != size:
                    return
        finally:
            del self._changes[key]
            change.set_result(None)

    def _partial_size(self, key: str) -> int:
        try:
            return os.stat(self.cache.body_path(key)).st_size
        except OSError:  # gone: complete, failed, or not begun
            return -1


class Follower:
    """A reader of an object as it arrives, that never sends more than the origin gave.

    If the fetcher dies half way (its lock on the partial is free, no error recorded), the
    follower takes the fetch over and goes on reading the new partial when it carries the
    same object (same length and modification time); otherwise ``available`` raises.
    """

    def __init__(self, fetches: Fetches, key: str, arriving: Arriving) -> None:
        self.fetches = fetches
        self.key = key
        self.fd = arriving.fd
        self.meta: InflightMeta = arriving.meta

    async def available(self, pos: int) -> int:
        """Up to where the object can be read now, past ``pos`` (or its whole length).

        A growing object's length (``meta.length`` is ``GROWING``) becomes known here, in
        ``meta``, once its fetcher committed it. Raises ``FetchError`` when the rest will not
        come: the fetch failed, stalled for ``stall_s``, or was replaced by one bringing
        something else.
        """
        fetches = self.fetches
        last = time.monotonic()
        while True:
            st = os.fstat(self.fd)
            size = st.st_size
            length = self.meta.length
            if length < 0 and marked_complete(st.st_mode):
                self.meta = InflightMeta(length=size, mtime=self.meta.mtime)
                return size
            if size > pos or size >= length >= 0:
                return size if length < 0 else min(size, length)
            if not writer_alive(self.fd):
                # The fetch ended: complete (seen above), failed, or its fetcher died.
                if os.fstat(self.fd).st_size > size or (
                    length < 0 and marked_complete(os.fstat(self.fd).st_mode)
                ):
                    continue
                status = fetches.cache.fetch_error(self.key, self.fd)
                if status is not None:
                    raise FetchError(status, "the origin fetch failed mid-body")
                if length < 0:  # nothing else can bring the rest of what it began
                    raise FetchError(502, "the origin fetch of a growing object ended early")
                await self._rejoin()
                last = time.monotonic()
                continue
            if time.monotonic() - last > fetches.stall_s:
                raise FetchError(504, "the origin stalled mid-body")
            await fetches.progress(self.key)

    async def _rejoin(self) -> None:
        found = await self.fetches.outcome(self.key, rejoin=True)
        if isinstance(found, Failed):
            raise FetchError(found.status, found.message)
        if isinstance(found, Complete):
            fd, length, mtime = found.obj.fd, found.obj.size, found.obj.mtime_ns // 10**9
        else:
            fd, length, mtime = found.fd, found.meta.length, int(found.meta.mtime)
        if length != self.meta.length or mtime != int(self.meta.mtime):
            os.close(fd)
            raise FetchError(502, "the object changed at the origin while it was sent")
        os.close(self.fd)
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
