"""The edge's disk cache: complete objects, objects being fetched, and recent origin errors.

The disk is the one truth every worker process shares, so that collapsing works across
processes without a coordinator:

- ``<root>/<key>`` is a complete object (``key`` is the request path without its ``/``).
  Only a fully written body is ever renamed here, so a partial object is never served as
  complete, and a restart finds exactly the complete objects (the index is the tree).
- Everything else lives in flat directories, one entry per key named by the SHA-256 of the
  key, never in trees mirroring the keys: an object's name can then never become a directory
  another object needs (``a/b`` and ``a/b/c`` are fetched, failed and remembered side by
  side), and no key, however long or strange, makes a path the filesystem refuses.
- ``.inflight/body/<h>`` is an object being fetched. Its fetcher creates it under a private
  name, takes an exclusive ``flock`` on it and only then links it into place, so the lock is
  held for as long as the fetcher lives: a partial nobody holds belongs to a fetcher that
  died (``kill -9``, a crash) and is taken over at once. Every other request for the object,
  in any worker, reads the same file as it grows.
- ``.inflight/meta/<h>-<inode>`` holds the object's length and validators once the origin
  answered, so waiters can send their headers before the body is complete. It is named by
  the partial's inode, so a reader never pairs a body with another fetch's meta.
- ``.errors/<h>`` records an origin failure for a few seconds, so a burst of requests for a
  missing or unreachable object costs one origin request, not one each. A failure the origin
  marked ``no-store`` is recorded for the waiters of that one fetch only (its record names the
  partial's inode): they share its answer, and the next request asks the origin again.
- Metas and error records are symbolic links whose target is the record: created
  atomically, and short enough to live in the inode, so they need no data block and can be
  written on a full disk (a failure must be recorded exactly when the disk is full, or every
  waiter would start the fetch again).
- A fetcher reserves the object's whole length (``fallocate`` keeping the size) before it
  tells anyone the length: a full disk is found before any client was sent a header, and the
  supervisor is asked to make room (see ``ask_room``).
- ``<root>/.run/`` holds the workers' metrics, the fill plan and its status.

Client paths never start a segment with ``.`` (``request_path`` refuses it), so none of
these can be requested; :func:`valid_key` is the one test of a key, for requests and for
what the workers tell the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final
from urllib.parse import quote

import msgspec

from streamplane.edge import http

__all__ = [
    "GROWING",
    "Arriving",
    "BadKey",
    "CachedObject",
    "Complete",
    "DiskCache",
    "Failed",
    "FetchError",
    "InflightMeta",
    "Lookup",
    "ObjectWriter",
    "Pending",
    "TakenOver",
    "error_text",
    "marked_complete",
    "valid_key",
    "writer_alive",
]

INFLIGHT: Final = ".inflight"
ERRORS: Final = ".errors"
RUN: Final = ".run"
ERROR_TTL_S: Final = 5.0
MAX_OBJECT_BYTES: Final = 1 << 44  # 16 TB: no media object is larger
ROOM_WAIT_S: Final = 2.0  # a fetch waits this long for the supervisor to make room
_ROOM_POLL_S: Final = 0.02
_ROOM_ASK_EVERY_S: Final = 0.25
_MEMORY_ERRORS: Final = 4096
_FALLOC_FL_KEEP_SIZE: Final = 1
_PARTIAL_MODE: Final = 0o644
_COMPLETE_MODE: Final = 0o444  # set on a verified body before it is renamed into place
# Characters request_path takes as they are; every other one is percent-encoded before a
# key is checked, so that the check decodes exactly what a client's request would have.
_KEY_SAFE: Final = "/._~!$&'()*+,;=:@-"


class FetchError(Exception):
    """The origin could not give the object; ``status`` is what the client gets."""

    def __init__(self, status: int, message: str, *, store: bool = True) -> None:
        super().__init__(message)
        self.status = status
        # False when the origin said its answer must not be stored (Cache-Control: no-store)
        self.store = store


class BadKey(FetchError):
    """A key no client could ask for (``..``, a hidden segment, control bytes...)."""

    def __init__(self, key: str) -> None:
        super().__init__(400, f"{key[:200]!r} is not an object name")


class TakenOver(FetchError):
    """The fetch was judged stalled and another took its place: not an origin failure."""

    def __init__(self) -> None:
        super().__init__(502, "the partial object was taken over by another fetch")


GROWING: Final = -1  # an InflightMeta length: the origin sends it as it is written


class InflightMeta(msgspec.Struct, frozen=True):
    length: int  # GROWING until the last byte landed: a live segment still being written
    mtime: float  # the origin's Last-Modified, so every edge gives the same validators


class CachedObject(msgspec.Struct, frozen=True):
    fd: int
    size: int
    mtime_ns: int


# What a request for an object not (yet) complete finds: see DiskCache.look.
class Complete(msgspec.Struct, frozen=True):
    obj: CachedObject


class Arriving(msgspec.Struct, frozen=True):
    fd: int  # a reader's descriptor on the partial body: the caller closes it
    meta: InflightMeta


class Pending(msgspec.Struct, frozen=True):
    """A live fetcher has not heard the origin's length yet; ``fd`` reads its partial."""

    fd: int


class Failed(msgspec.Struct, frozen=True):
    status: int
    message: str


Lookup = Complete | Arriving | Pending | Failed | None  # None: nobody fetches it


def valid_key(key: str) -> bool:
    """Whether ``key`` names an object a client could request: the path ``request_path``
    gives for a request, without its leading ``/``, and no segment starting with ``.``."""
    if not key or key[0] == "." or "/." in key:
        return False
    try:
        target = ("/" + quote(key, safe=_KEY_SAFE)).encode("ascii")
        path, query = http.request_path(target)
    except (http.BadPath, UnicodeError):
        return False
    return path == "/" + key and not query


def _name(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class DiskCache:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._root_prefix = str(self.root) + os.sep
        self._body = f"{self.root}/{INFLIGHT}/body/"
        self._meta = f"{self.root}/{INFLIGHT}/meta/"
        self._tmp = f"{self.root}/{INFLIGHT}/tmp/"
        self._errors = f"{self.root}/{ERRORS}/"
        for sub in (f"{INFLIGHT}/body", f"{INFLIGHT}/meta", f"{INFLIGHT}/tmp", ERRORS, RUN):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._serial = itertools.count()
        # Errors are remembered in memory too, for when even the disk record failed: then
        # this process still asks the origin once per error_ttl, not once per request.
        self._recent: dict[str, tuple[float, int, int | None]] = {}
        # Called with the bytes a fetch needs when the disk has no room: the worker asks the
        # supervisor to evict, the supervisor evicts. Set by whoever owns the cache.
        self.ask_room: Callable[[int], None] = lambda need: None
        # Tells about trouble that should not pass silently (rate-limited by the caller).
        self.warn: Callable[[str, str], None] = lambda kind, text: None

    # -- complete objects ---------------------------------------------------------------

    def object_path(self, key: str) -> str:
        return self._root_prefix + key

    def open_complete(self, key: str) -> CachedObject | None:
        """Open a complete object, or ``None`` if the cache does not hold it.

        The opened file's real path is read back from ``/proc/self/fd``, so a symlink
        anywhere on the way that leads out of the cache root is refused, whatever it is
        named: one extra syscall instead of an lstat per path component. A path that needs
        a directory where a file is (``a/b/c`` with ``a/b`` cached) is simply not held.
        """
        try:
            fd = os.open(self._root_prefix + key, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES, errno.ENXIO):
                return None
            raise
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            st = os.fstat(fd)
            if not real.startswith(self._root_prefix) or not _is_regular(st.st_mode):
                os.close(fd)
                return None
        except BaseException:
            os.close(fd)
            raise
        return CachedObject(fd=fd, size=st.st_size, mtime_ns=st.st_mtime_ns)

    def open_complete_size(self, key: str) -> int | None:
        """The size of a complete object, or ``None`` if the cache does not hold it."""
        obj = self.open_complete(key)
        if obj is None:
            return None
        os.close(obj.fd)
        return obj.size

    def remove(self, key: str) -> int:
        """Delete a complete object (eviction); returns the bytes freed."""
        if not valid_key(key):
            return 0
        path = self._root_prefix + key
        try:
            st = os.lstat(path)
            if not _is_regular(st.st_mode):
                return 0
            os.unlink(path)
        except OSError:
            return 0
        # Directories left empty go, so that a path that was a directory can later be an
        # object; a fetcher renaming into one meanwhile makes it again (see commit).
        parent = os.path.dirname(path)
        while parent.startswith(self._root_prefix):
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)
        return st.st_size

    def scan(self) -> list[tuple[str, int, float]]:
        """Every complete object as ``(key, size, atime)``: the index after a restart."""
        found: list[tuple[str, int, float]] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                key = os.path.relpath(path, self.root)
                if _is_regular(st.st_mode) and valid_key(key):
                    found.append((key, st.st_size, st.st_atime))
        return found

    def clear_inflight(self) -> int:
        """Drop every partial object and error record left from before a restart (and any
        tree an older layout left there); returns how many partials there were."""
        dropped = sum(len(files) for _, _, files in os.walk(self.root / INFLIGHT / "body"))
        for sub in (INFLIGHT, ERRORS):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        for sub in (f"{INFLIGHT}/body", f"{INFLIGHT}/meta", f"{INFLIGHT}/tmp", ERRORS):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        return dropped

    # -- objects being fetched ----------------------------------------------------------

    def body_path(self, key: str) -> str:
        return self._body + _name(key)

    def begin(self, key: str, stall_s: float) -> ObjectWriter | None:
        """Become the fetcher of ``key``, or ``None`` if another fetch is under way or has
        just given the object or its error.

        A partial whose fetcher died (its lock is free) is taken over at once; one whose live
        fetcher has not written for ``stall_s`` too (a hung origin read). Raises ``BadKey``
        for a key no client could ask for, and ``FetchError`` (503) if the disk refuses.
        """
        if not valid_key(key):
            raise BadKey(key)
        name = _name(key)
        body = self._body + name
        for _ in range(4):
            try:
                fd = self._create(name)
                if fd < 0:
                    if self._take_over(body, name, stall_s):
                        continue
                    return None
            except OSError as exc:
                raise FetchError(503, f"the cache cannot start {key}: {exc.strerror}") from None
            writer = ObjectWriter(self, key, name, fd)
            # Whoever held the key before us has finished, and its outcome is visible now
            # (a commit renames, a failure is recorded before its partial goes): never ask
            # the origin again for what it just gave or refused.
            if self.open_complete_size(key) is not None or self.recent_error(key) is not None:
                writer.drop()
                return None
            return writer
        return None

    def _create(self, name: str) -> int:
        """A new partial for ``name``, locked and linked into place; -1 if one exists."""
        tmp = f"{self._tmp}{name}.{os.getpid()}.{next(self._serial)}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _PARTIAL_MODE)
        try:
            # Locked before anyone can see it: an unlocked partial is always a dead one.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, _PARTIAL_MODE)  # whatever the umask: read-only means complete
            os.link(tmp, self._body + name)
        except FileExistsError:
            os.close(fd)
            return -1
        except BaseException:
            os.close(fd)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return fd

    def _take_over(self, body: str, name: str, stall_s: float) -> bool:
        """Remove a partial whose fetcher is gone (or stalled); False if it lives on."""
        try:
            fd = os.open(body, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True  # finished meanwhile
        try:
            st = os.fstat(fd)
            if writer_alive(fd, exclusive=True):
                if time.time() - st.st_mtime < stall_s:
                    return False
                how = "stalled"
            else:
                how = "died"
            # Holding the dead partial open keeps its inode (and so its meta's name) ours.
            try:
                if os.stat(body).st_ino != st.st_ino:
                    return True  # someone else replaced it already
            except FileNotFoundError:
                return True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._meta}{name}-{st.st_ino}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(body)
            self.warn("takeover", f"took over a partial object whose fetch {how}")
            return True
        finally:
            os.close(fd)

    def look(self, key: str) -> Lookup:
        """Where a request for ``key`` stands: complete, arriving (its length known), pending
        (a live fetcher waits for the origin), failed just now, or ``None`` (nobody fetches
        it: the caller starts the fetch, taking over a dead fetcher's partial).

        A ``Complete``, ``Arriving`` or ``Pending`` result holds a descriptor for the caller.
        """
        obj = self.open_complete(key)
        if obj is not None:
            return Complete(obj)
        try:
            fd = os.open(self._body + _name(key), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            found = self.recheck(key, fd)
            if found is not None:
                return found
            os.close(fd)
            # a dead fetcher's partial, or its outcome landed just after we looked
            obj = self.open_complete(key)
            if obj is not None:
                return Complete(obj)
        status = self.recent_error(key)
        if status is not None:
            return Failed(status, error_text(status))
        return None

    def recheck(self, key: str, fd: int) -> Complete | Arriving | Pending | None:
        """Where the fetch whose partial a waiter holds open as ``fd`` stands now.

        Holding the partial is what lets every waiter have the object even when it is
        evicted the moment it lands (a small disk): the committed file is marked read-only
        before it is renamed, so the descriptor shows it complete whatever its name is now.
        With a ``Complete``, ``Arriving`` or ``Pending`` result the descriptor goes on
        serving; with ``None`` (the fetch ended without the object, its fetcher died, or a
        stalled fetch was replaced) the caller closes it and looks again.
        """
        st = os.fstat(fd)
        name = _name(key)
        meta = self._read_meta(name, st.st_ino)
        if marked_complete(st.st_mode):
            return Complete(CachedObject(fd=fd, size=st.st_size, mtime_ns=st.st_mtime_ns))
        alive = writer_alive(fd)
        # a growing object whose fetcher is gone and that was never completed is lost
        if meta is not None and (alive or 0 <= meta.length <= st.st_size):
            return Arriving(fd, meta)
        if alive and meta is None:
            try:
                if os.stat(self._body + name).st_ino == st.st_ino:
                    return Pending(fd)
            except OSError:
                pass
        return None

    def _read_meta(self, name: str, ino: int) -> InflightMeta | None:
        try:
            text = os.readlink(f"{self._meta}{name}-{ino}")
            length, _, mtime = text.partition(" ")
            return InflightMeta(length=int(length), mtime=float(mtime))
        except (OSError, ValueError):
            return None

    # -- recent origin errors -----------------------------------------------------------

    def record_error(self, key: str, status: int, *, fetch: int | None = None) -> None:
        """Remember that the origin failed on ``key`` with ``status``: for every request
        during ``ERROR_TTL_S``, or with ``fetch`` (a partial's inode: the origin said
        ``no-store``) only for the waiters holding that fetch's partial."""
        if len(self._recent) >= _MEMORY_ERRORS:
            self._recent.clear()
        self._recent[key] = (time.monotonic() + ERROR_TTL_S, status, fetch)
        name = _name(key)
        tmp = f"{self._tmp}{name}.{os.getpid()}.{next(self._serial)}"
        record = str(status) if fetch is None else f"{status} {fetch}"
        try:
            os.symlink(record, tmp)
            os.replace(tmp, self._errors + name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self.warn("error-record", f"cannot record an origin error: {exc.strerror}")

    def recent_error(self, key: str) -> int | None:
        """The status of a recent origin failure on ``key`` that any request may be given."""
        found = self._error_record(key)
        return found[0] if found is not None and found[1] is None else None

    def fetch_error(self, key: str, fd: int) -> int | None:
        """The status the fetch whose partial a waiter holds as ``fd`` failed with, if it
        did (a ``no-store`` failure included), or of any recent failure on ``key``."""
        found = self._error_record(key)
        if found is None:
            return None
        status, fetch = found
        if fetch is not None and fetch != os.fstat(fd).st_ino:
            return None
        return status

    def _error_record(self, key: str) -> tuple[int, int | None] | None:
        remembered = self._recent.get(key)
        if remembered is not None:
            if remembered[0] > time.monotonic():
                return remembered[1], remembered[2]
            del self._recent[key]
        path = self._errors + _name(key)
        try:
            st = os.lstat(path)
            if time.time() - st.st_mtime > ERROR_TTL_S:
                return None
            status, _, fetch = os.readlink(path).partition(" ")
            return int(status), int(fetch) if fetch else None
        except (OSError, ValueError):
            return None

    def clear_error(self, key: str) -> None:
        self._recent.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(self._errors + _name(key))


_ERROR_TEXT: Final = {
    404: "the origin does not have this object",
    503: "the cache cannot hold this object now",
    504: "the origin did not answer in time",
}


def error_text(status: int) -> str:
    """What a client is told about a recent failure with ``status``."""
    return _ERROR_TEXT.get(status, "the origin failed on this object")


def marked_complete(mode: int) -> bool:
    """Whether a partial's ``st_mode`` says its fetcher committed it: every byte is there."""
    return mode & 0o777 == _COMPLETE_MODE


def writer_alive(fd: int, *, exclusive: bool = False) -> bool:
    """Whether the fetcher of the partial open as ``fd`` still lives (holds its lock).

    With ``exclusive`` a dead fetcher's lock is kept, until ``fd`` is closed: a taker
    holds it so that no one else takes the same partial over.
    """
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    if not exclusive:
        fcntl.flock(fd, fcntl.LOCK_UN)
    return False


class ObjectWriter:
    """The one writer of an object being fetched; ``commit`` makes it complete."""

    def __init__(self, cache: DiskCache, key: str, name: str, fd: int) -> None:
        self.cache = cache
        self.key = key
        self.fd = fd
        self.written = 0
        self.meta: InflightMeta | None = None
        self._body = cache._body + name
        self._ino = os.fstat(fd).st_ino
        self._meta_path = f"{cache._meta}{name}-{self._ino}"

    async def start(self, length: int, mtime: float) -> None:
        """The origin's length and validators are known: reserve the space, then publish
        them to the waiters. Waits up to ``ROOM_WAIT_S`` for room on a full disk, asking
        for it; then fails with 503, before any client was sent a header."""
        if not 0 <= length <= MAX_OBJECT_BYTES:
            raise FetchError(502, f"the origin gave {self.key} an impossible length {length}")
        if not self._reserve(length):
            deadline = time.monotonic() + ROOM_WAIT_S
            asked = 0.0
            while not self._reserve(length):
                now = time.monotonic()
                if now > deadline:
                    self.cache.warn("full", "the cache disk is full and nothing could be evicted")
                    raise FetchError(503, f"the cache disk has no room for {self.key} now")
                if now - asked >= _ROOM_ASK_EVERY_S:
                    self.cache.ask_room(length)
                    asked = now
                await asyncio.sleep(_ROOM_POLL_S)
        self._publish(InflightMeta(length=length, mtime=mtime))

    def start_growing(self, mtime: float) -> None:
        """The origin sends the object as it is being written (a live segment, chunked): its
        waiters are told so, and follow it until ``commit`` marks it complete. Nothing can be
        reserved for a length nobody knows: a full disk shows as a write error."""
        self._publish(InflightMeta(length=GROWING, mtime=mtime))

    def _publish(self, meta: InflightMeta) -> None:
        self.meta = meta
        tmp = f"{self.cache._tmp}m.{os.getpid()}.{next(self.cache._serial)}"
        try:
            os.symlink(f"{meta.length} {meta.mtime!r}", tmp)
            os.replace(tmp, self._meta_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise FetchError(503, f"the cache cannot start {self.key}: {exc.strerror}") from None

    def _reserve(self, length: int) -> bool:
        if length == 0:
            return True
        if _fallocate(self.fd, _FALLOC_FL_KEEP_SIZE, 0, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):
            return False
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return True  # this filesystem reserves nothing: a full disk shows as a write error
        raise FetchError(503, f"the cache cannot reserve {self.key}: {os.strerror(err)}")

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.written += n
        except OSError as exc:
            raise FetchError(503, f"the cache cannot store {self.key}: {exc.strerror}") from None

    def commit(self) -> int:
        """Rename the finished body into the cache; returns its size.

        A path the tree cannot hold (a cached file where this key needs a directory, or a
        directory of cached objects where it needs a file) is a 502 for this key alone.
        """
        assert self.meta is not None
        if self.meta.length == GROWING:  # its length is what landed
            self.meta = InflightMeta(length=self.written, mtime=self.meta.mtime)
        if self.written != self.meta.length:
            raise FetchError(502, f"origin sent {self.written} of {self.meta.length} bytes")
        os.utime(self.fd, (self.meta.mtime, self.meta.mtime))
        os.fchmod(self.fd, _COMPLETE_MODE)
        # Someone may have taken over a partial they believed stalled; never rename theirs.
        try:
            if os.stat(self._body).st_ino != self._ino:
                raise TakenOver()
        except FileNotFoundError:
            raise TakenOver() from None
        final = self.cache.object_path(self.key)
        for _ in range(3):
            try:
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.rename(self._body, final)
                break
            except FileNotFoundError:
                continue  # an eviction removed the emptied directory meanwhile
            except OSError as exc:
                if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST) and _prune(final):
                    continue  # empty directories left by evictions
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise FetchError(503, f"the cache disk has no room for {self.key}") from None
                raise FetchError(
                    502, f"{self.key} cannot be cached: its path conflicts with a cached object"
                ) from None
        else:
            raise FetchError(503, f"the cache could not place {self.key}")
        self._close()
        return self.written

    def abort(self, status: int | None = None, *, store: bool = True) -> None:
        """Give up; with ``status``, the waiters (and, if ``store``, requests for a few
        seconds) get it.

        The error is recorded before the partial goes, so that whoever sees the partial
        gone sees the error too and never starts another origin request.
        """
        if status is not None:
            self.cache.record_error(self.key, status, fetch=None if store else self._ino)
        with contextlib.suppress(OSError):
            os.unlink(self._meta_path)
        with contextlib.suppress(OSError):
            if os.stat(self._body).st_ino == self._ino:
                os.unlink(self._body)
        self._close()

    def drop(self) -> None:
        """Withdraw a partial nothing was written to (the object turned up meanwhile)."""
        self.abort(None)

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._meta_path)
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock: waiters see the fetch ended
            self.fd = -1


def _prune(path: str) -> bool:
    """Remove ``path`` if it is a tree of empty directories; True if it is gone."""
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    for dirpath, _, filenames in os.walk(path, topdown=False):
        if filenames:
            return False
        try:
            os.rmdir(dirpath)
        except OSError:
            return False
    return True


def _is_regular(mode: int) -> bool:
    return (mode & 0o170000) == 0o100000


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    # os.posix_fallocate cannot keep the size: waiters read the size as the bytes arrived.
    return int(_libc.fallocate(fd, mode, offset, length))
