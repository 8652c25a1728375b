"""Where the edge pulls from on a miss: the media plane's catalog directory or an HTTP server.

An origin writes one object into an :class:`ObjectWriter` (``start`` with the length, which
may wait for room on a full disk, then the bytes) and calls ``progress`` after each chunk so
that waiting clients are woken as the bytes arrive. Failures become a :class:`FetchError`
with the status the client should see: 404 for a missing object, 502 for an origin that
refuses or breaks, 504 for one that is too slow, 503 when the cache cannot hold it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import quote

import httpx

from streamplane.edge import live
from streamplane.edge.cache import FetchError, ObjectWriter

__all__ = ["DirectoryOrigin", "HttpOrigin", "Origin", "make_origin"]

_CHUNK = 1 << 20
_CHUNKED_MAX: Final = 64 << 20  # a chunked answer is a live segment, not a title
_URL_SAFE: Final = "/._~!$&'()*+,;=:@-"


class Origin(Protocol):
    def describe(self) -> str: ...

    async def fetch(self, key: str, writer: ObjectWriter, progress: Callable[[], None]) -> None: ...

    async def aclose(self) -> None: ...


class DirectoryOrigin:
    """A catalog directory (local disk, NFS, a mounted bucket)."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise ValueError(f"origin directory {root} does not exist")
        self.root = root.resolve()
        self._prefix = str(self.root) + os.sep
        # Falls back once per origin, for good: a cache on another filesystem stays there.
        self._mode = "copy_file_range"

    def describe(self) -> str:
        return str(self.root)

    async def fetch(self, key: str, writer: ObjectWriter, progress: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()

        def wake() -> None:
            loop.call_soon_threadsafe(progress)

        # Threads, so that a slow disk (NFS, a mounted bucket) never stalls the event loop.
        fd, size, mtime = await asyncio.to_thread(self._open, key)
        try:
            await writer.start(size, mtime)
            progress()
            # The thread copies with descriptors of its own, closed by itself, and stops when
            # told: a cancelled fetch closes the writer's descriptor, and a thread still using
            # that number could write into whatever file the number is given to next.
            stop = threading.Event()
            src, dst = os.dup(fd), os.dup(writer.fd)
            try:
                await asyncio.to_thread(self._copy, key, src, dst, size, writer, wake, stop)
            finally:
                stop.set()
        finally:
            os.close(fd)

    async def aclose(self) -> None:
        return None

    def _open(self, key: str) -> tuple[int, int, float]:
        try:
            # O_NONBLOCK: a FIFO in the catalog must not hang the fetch waiting for a writer
            fd = os.open(self._prefix + key, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
            raise FetchError(404, f"{key} is not in the origin") from None
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):  # no file could be named so
                raise FetchError(404, f"{key} is not in the origin") from None
            raise FetchError(502, f"origin cannot open {key}: {exc.strerror}") from None
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith(self._prefix):
                raise FetchError(404, f"{key} leads outside the origin")
            st = os.fstat(fd)
            if (st.st_mode & 0o170000) != 0o100000:
                raise FetchError(404, f"{key} is not a file")
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size, st.st_mtime

    def _copy(
        self,
        key: str,
        src: int,
        dst: int,
        size: int,
        writer: ObjectWriter,
        wake: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        try:
            self._copy_all(key, src, dst, size, writer, wake, stop)
        finally:
            os.close(src)
            os.close(dst)

    def _copy_all(
        self,
        key: str,
        src: int,
        dst: int,
        size: int,
        writer: ObjectWriter,
        wake: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        offset = 0
        while offset < size and not stop.is_set():
            count = min(_CHUNK, size - offset)
            try:
                n = self._copy_chunk(src, dst, count, offset)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise FetchError(503, f"the cache disk has no room for {key}") from None
                message = f"copying {key} from the origin failed: {exc.strerror}"
                raise FetchError(502, message) from None
            if n == 0:
                raise FetchError(502, f"{key} shrank while it was copied")
            offset += n
            writer.written += n
            wake()

    def _copy_chunk(self, src: int, dst: int, count: int, offset: int) -> int:
        """Copy in the kernel: ``copy_file_range`` (shares extents on one filesystem), else
        ``sendfile`` (another filesystem: EXDEV), else through a buffer."""
        if self._mode == "copy_file_range":
            try:
                return os.copy_file_range(src, dst, count, offset)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._mode = "sendfile"
        if self._mode == "sendfile":
            try:
                return os.sendfile(dst, src, offset, count)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._mode = "read"
        data = os.pread(src, count, offset)
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view) :]
        return len(data)


# The errors that say "not between these two files", not "the copy failed".
_UNSUPPORTED: Final = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


class HttpOrigin:
    """Another HTTP server: a storage origin, nginx, or a parent edge."""

    def __init__(self, base_url: str, connect_timeout: float = 3.0, read_timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"Accept-Encoding": "identity", "User-Agent": "streamplane-edge"},
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )

    def describe(self) -> str:
        return self.base_url

    async def fetch(self, key: str, writer: ObjectWriter, progress: Callable[[], None]) -> None:
        # Encoded again: a key may hold "?", "#" or "%" (decoded from the client's request).
        # A blocking playlist reload's directives go back into the query.
        path, query = live.origin_target(key)
        url = f"{self.base_url}/{quote(path, safe=_URL_SAFE)}" + (f"?{query}" if query else "")
        try:
            async with self._client.stream("GET", url) as response:
                # An error the origin says must not be stored (a live playlist or part not
                # there yet) goes to this fetch's waiters only, never to later requests.
                store = not _no_store(response.headers)
                if response.status_code == 404:
                    raise FetchError(404, f"{key} is not in the origin", store=store)
                if response.status_code != 200:
                    message = f"origin answered {response.status_code} for {key}"
                    raise FetchError(502, message, store=store)
                length = response.headers.get("content-length")
                if length is None and "chunked" in response.headers.get("transfer-encoding", ""):
                    # A live segment being written comes chunked as its parts land: its
                    # waiters follow it as it grows, each chunk passed on as it arrives.
                    writer.start_growing(_last_modified(response.headers))
                    progress()
                    async for chunk in response.aiter_raw():
                        if writer.written + len(chunk) > _CHUNKED_MAX:
                            raise FetchError(502, f"origin sent {key} chunked and too long")
                        writer.write(chunk)
                        progress()
                    return
                if length is None or not length.isdigit():
                    raise FetchError(502, f"origin sent {key} without a Content-Length")
                await writer.start(int(length), _last_modified(response.headers))
                progress()
                async for chunk in response.aiter_raw():  # as received: waiters see every chunk
                    writer.write(chunk)
                    progress()
        except httpx.TimeoutException:
            raise FetchError(504, f"origin {self.base_url} timed out on {key}") from None
        except httpx.HTTPError as exc:
            raise FetchError(502, f"origin {self.base_url} failed on {key}: {exc}") from None

    async def aclose(self) -> None:
        await self._client.aclose()


def _no_store(headers: httpx.Headers) -> bool:
    directives = headers.get("cache-control", "").lower().split(",")
    return any(d.strip().partition("=")[0] == "no-store" for d in directives)


def _last_modified(headers: httpx.Headers) -> float:
    text = headers.get("last-modified")
    if text:
        try:
            return parsedate_to_datetime(text).timestamp()
        except (TypeError, ValueError):
            pass
    return 0.0


def make_origin(spec: str) -> Origin:
    """``http(s)://…`` is an HTTP origin; anything else a directory."""
    if spec.startswith(("http://", "https://")):
        return HttpOrigin(spec)
    return DirectoryOrigin(Path(spec))
