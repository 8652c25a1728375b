"""Where the edge pulls from on a miss: the media plane's catalog directory or an HTTP server.

An origin writes one object into an :class:`ObjectWriter` and calls ``progress`` after each
chunk so that waiting clients are woken as the bytes arrive. Failures become a
:class:`FetchError` with the status the client should see: 404 for a missing object, 502 for
an origin that refuses or breaks, 504 for one that is too slow.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Protocol

import httpx

from streamplane.edge.cache import FetchError, ObjectWriter

__all__ = ["DirectoryOrigin", "HttpOrigin", "Origin", "make_origin"]

_CHUNK = 1 << 20


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

    def describe(self) -> str:
        return str(self.root)

    async def fetch(self, key: str, writer: ObjectWriter, progress: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()

        def wake() -> None:
            loop.call_soon_threadsafe(progress)

        # A thread, so that reading a slow disk never stalls the event loop that serves.
        await asyncio.to_thread(self._copy, key, writer, wake)

    async def aclose(self) -> None:
        return None

    def _copy(self, key: str, writer: ObjectWriter, wake: Callable[[], None]) -> None:
        try:
            fd = os.open(self._prefix + key, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise FetchError(404, f"{key} is not in the origin") from None
        except OSError as exc:
            raise FetchError(502, f"origin cannot open {key}: {exc.strerror}") from None
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith(self._prefix):
                raise FetchError(404, f"{key} leads outside the origin")
            st = os.fstat(fd)
            if (st.st_mode & 0o170000) != 0o100000:
                raise FetchError(404, f"{key} is not a file")
            writer.start(st.st_size, st.st_mtime)
            wake()
            offset = 0
            while offset < st.st_size:
                # copy_file_range keeps the copy in the kernel too
                n = os.copy_file_range(fd, writer.fd, min(_CHUNK, st.st_size - offset), offset)
                if n == 0:
                    raise FetchError(502, f"{key} shrank while it was copied")
                offset += n
                writer.written += n
                wake()
        finally:
            os.close(fd)


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
        url = f"{self.base_url}/{key}"
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code == 404:
                    raise FetchError(404, f"{key} is not in the origin")
                if response.status_code != 200:
                    raise FetchError(502, f"origin answered {response.status_code} for {key}")
                length = response.headers.get("content-length")
                if length is None or not length.isdigit():
                    raise FetchError(502, f"origin sent {key} without a Content-Length")
                writer.start(int(length), _last_modified(response.headers))
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
