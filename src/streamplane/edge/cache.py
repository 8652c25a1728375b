"""The edge's disk cache: complete objects, objects being fetched, and recent origin errors.

The disk is the one truth every worker process shares, so that collapsing works across
processes without a coordinator:

- ``<root>/<key>`` is a complete object (``key`` is the request path without its ``/``).
  Only a fully written body is ever renamed here, so a partial object is never served as
  complete, and a restart finds exactly the complete objects (the index is the tree).
- ``<root>/.inflight/body/<key>`` is an object being fetched. Whoever creates it (``O_EXCL``)
  is its only fetcher; every other request for it, in any worker, reads the same file as it
  grows. ``.inflight/meta/<key>`` holds the object's length and validators once the origin
  answered, so waiters can send their headers before the body is complete.
- ``<root>/.errors/<key>`` records an origin failure for a few seconds, so a burst of
  requests for a missing or unreachable object costs one origin request, not one each.
- ``<root>/.run/`` holds the workers' metrics, the fill plan and the keeper's socket.

Client paths never start a segment with ``.`` (``request_path`` refuses it), so none of
these can be requested.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from pathlib import Path
from typing import Final

import msgspec

__all__ = ["CachedObject", "DiskCache", "FetchError", "InflightMeta", "ObjectWriter"]

INFLIGHT: Final = ".inflight"
ERRORS: Final = ".errors"
RUN: Final = ".run"
ERROR_TTL_S: Final = 5.0


class FetchError(Exception):
    """The origin could not give the object; ``status`` is what the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class InflightMeta(msgspec.Struct, frozen=True):
    length: int
    mtime: float  # the origin's Last-Modified, so every edge gives the same validators


class CachedObject(msgspec.Struct, frozen=True):
    fd: int
    size: int
    mtime_ns: int


class DiskCache:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._root_prefix = str(self.root) + os.sep
        for sub in (f"{INFLIGHT}/body", f"{INFLIGHT}/meta", f"{INFLIGHT}/tmp", ERRORS, RUN):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- complete objects ---------------------------------------------------------------

    def object_path(self, key: str) -> str:
        return self._root_prefix + key

    def open_complete(self, key: str) -> CachedObject | None:
        """Open a complete object, or ``None`` if the cache does not hold it.

        The opened file's real path is read back from ``/proc/self/fd``, so a symlink
        anywhere on the way that leads out of the cache root is refused, whatever it is
        named: one extra syscall instead of an lstat per path component.
        """
        try:
            fd = os.open(self._root_prefix + key, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES):
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
        path = self._root_prefix + key
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return 0
        # Empty directories stay: removing them would race a fetcher renaming into them.
        return size

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
                if _is_regular(st.st_mode):
                    found.append((os.path.relpath(path, self.root), st.st_size, st.st_atime))
        return found

    def clear_inflight(self) -> int:
        """Drop every partial object left by a crash; returns how many there were."""
        dropped = 0
        for sub in ("body", "meta", "tmp"):
            base = self.root / INFLIGHT / sub
            for dirpath, _, filenames in os.walk(base, topdown=False):
                for name in filenames:
                    os.unlink(os.path.join(dirpath, name))
                    dropped += sub == "body"
                if dirpath != str(base):
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)
        return dropped

    # -- objects being fetched ----------------------------------------------------------

    def body_path(self, key: str) -> str:
        return f"{self.root}/{INFLIGHT}/body/{key}"

    def begin(self, key: str, stall_s: float) -> ObjectWriter | None:
        """Become the fetcher of ``key``, or ``None`` if another fetch is under way.

        A partial that has not grown for ``stall_s`` belongs to a fetcher that died: it is
        taken over.
        """
        body = self.body_path(key)
        os.makedirs(os.path.dirname(body), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(body, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                try:
                    age = time.time() - os.stat(body).st_mtime
                except FileNotFoundError:
                    continue
                if age < stall_s:
                    return None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(body)
                continue
            return ObjectWriter(self, key, fd)
        return None

    def open_inflight(self, key: str) -> tuple[int, InflightMeta | None] | None:
        """A reader's descriptor on the partial body and its meta, if a fetch is under way."""
        try:
            fd = os.open(self.body_path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return fd, self.read_meta(key)

    def read_meta(self, key: str) -> InflightMeta | None:
        try:
            with open(f"{self.root}/{INFLIGHT}/meta/{key}", "rb") as f:
                return msgspec.json.decode(f.read(), type=InflightMeta)
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    # -- recent origin errors -----------------------------------------------------------

    def record_error(self, key: str, status: int) -> None:
        path = f"{self.root}/{ERRORS}/{key}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomic(self.root / INFLIGHT / "tmp", path, str(status).encode())

    def recent_error(self, key: str) -> int | None:
        path = f"{self.root}/{ERRORS}/{key}"
        try:
            st = os.stat(path)
            if time.time() - st.st_mtime > ERROR_TTL_S:
                return None
            with open(path, "rb") as f:
                return int(f.read())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None

    def clear_error(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(f"{self.root}/{ERRORS}/{key}")


class ObjectWriter:
    """The one writer of an object being fetched; ``commit`` makes it complete."""

    def __init__(self, cache: DiskCache, key: str, fd: int) -> None:
        self.cache = cache
        self.key = key
        self.fd = fd
        self.written = 0
        self.meta: InflightMeta | None = None
        self._ino = os.fstat(fd).st_ino

    def start(self, length: int, mtime: float) -> None:
        self.meta = InflightMeta(length=length, mtime=mtime)
        meta_path = f"{self.cache.root}/{INFLIGHT}/meta/{self.key}"
        os.makedirs(os.path.dirname(meta_path), exist_ok=True)
        _write_atomic(self.cache.root / INFLIGHT / "tmp", meta_path, msgspec.json.encode(self.meta))

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written += n

    def commit(self) -> int:
        """Rename the finished body into the cache; returns its size."""
        assert self.meta is not None
        if self.written != self.meta.length:
            raise FetchError(502, f"origin sent {self.written} of {self.meta.length} bytes")
        os.utime(self.fd, (self.meta.mtime, self.meta.mtime))
        body = self.cache.body_path(self.key)
        # Someone may have taken over a partial they believed stalled; never rename theirs.
        if os.stat(body).st_ino != self._ino:
            raise FetchError(502, "the partial object was taken over by another fetch")
        final = self.cache.object_path(self.key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(body, final)
        self._close()
        return self.written

    def abort(self) -> None:
        body = self.cache.body_path(self.key)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(body).st_ino == self._ino:
                os.unlink(body)
        self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.cache.root}/{INFLIGHT}/meta/{self.key}")


def _write_atomic(tmp_dir: Path, path: str, data: bytes) -> None:
    tmp = f"{tmp_dir}/{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _is_regular(mode: int) -> bool:
    return (mode & 0o170000) == 0o100000
