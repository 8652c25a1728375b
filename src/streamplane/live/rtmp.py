"""RTMP ingest beside SRT: a publisher pushes ``rtmp://HOST:PORT/live/<stream key>``.

The channel's encoder takes one SRT publisher at a time, so an RTMP feed reaches it through
a relay: an ffmpeg that listens for RTMP on a private port and copies what it gets, as
MPEG-TS, to the channel's own SRT listener with the stream key as the passphrase. Nothing is
decoded or encoded twice, and the encoder, the slate and the packager are the same for both.

The public port is this module's own TCP listener, in front of the relay: it sees every
publisher, so a second one while a feed is on air (or another RTMP publisher is connected)
is refused at once, and said so in the log and on the channel's status, while the first
goes on. ffmpeg's RTMP server only warns about a stream name it did not expect; the relay's
log line is the refusal: the relay is killed before it connects anything to the encoder
(it waits for a second of the feed to probe it first), and the next one listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final
from urllib.parse import quote, urlsplit

from streamplane.live.ingest import Channel, LiveError, start_ffmpeg

__all__ = ["RTMP_APP", "RtmpDoor", "relay_args", "rtmp_problem", "rtmp_url"]

log = logging.getLogger("streamplane.live")

RTMP_APP: Final = "live"
_CONNECT_S: Final = 5.0  # how long a publisher waits for the relay to listen again


def rtmp_url(to: str, stream_key: str) -> str:
    """Where a publisher pushes: ``to`` (``rtmp://host:port``, optionally with the
    application) with the stream key as the stream name."""
    parts = urlsplit(to)
    if parts.scheme != "rtmp" or not parts.hostname or not parts.port:
        raise LiveError(f"--to must be rtmp://HOST:PORT, not {to!r}")
    app = parts.path.strip("/") or RTMP_APP
    if "/" in app:
        raise LiveError(f"an RTMP URL names one application, not {app!r}")
    return f"rtmp://{parts.netloc}/{app}/{quote(stream_key, safe='')}"


def relay_args(private_port: int, srt: str, stream_key: str) -> list[str]:
    """ffmpeg's arguments for the relay: one RTMP publisher on ``private_port`` to ``srt``."""
    return [
        "-listen",
        "1",
        "-analyzeduration",
        "1000000",
        "-i",
        f"rtmp://127.0.0.1:{private_port}/{RTMP_APP}/{stream_key}",
        "-map",
        "0",
        "-c",
        "copy",
        "-f",
        "mpegts",
        "-flush_packets",
        "1",
        srt,
    ]


def rtmp_problem(line: str) -> str | None:
    """What a line of the relay's log says went wrong with a publisher, if anything."""
    if "Unexpected stream" in line:
        return "refused a publisher: wrong stream key"
    if "App field don't match up" in line:
        return f"refused a publisher: wrong application (publish to rtmp://…/{RTMP_APP}/KEY)"
    if "Connection to srt" in line and "failed" in line:
        return "refused a second publisher: the channel already has a feed"
    return None


class RtmpDoor:
    """The RTMP listener of ``channel`` on ``host:port``, and its relay."""

    def __init__(self, channel: Channel, host: str, port: int) -> None:
        from streamplane.stack import free_port

        self.channel = channel
        self.host = host
        self.port = port
        self.private_port = free_port()
        self._server: asyncio.Server | None = None
        self._relay: asyncio.subprocess.Process | None = None
        self._publisher: str | None = None  # the connected RTMP publisher's address
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Listen until :meth:`stop`."""
        self._server = await asyncio.start_server(self._publish, self.host, self.port)
        try:
            await self._relay_loop()
        finally:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def stop(self) -> None:
        self._stopping = True
        if self._relay is not None and self._relay.returncode is None:
            self._relay.terminate()
        for task in list(self._tasks):
            task.cancel()

    async def _relay_loop(self) -> None:
        s = self.channel.settings
        host = "127.0.0.1" if s.listen_host in ("0.0.0.0", "::") else s.listen_host
        srt = (
            f"srt://{host}:{s.srt_port}?mode=caller&passphrase={quote(s.stream_key, safe='')}"
            "&latency=120000"
        )
        while not self._stopping:
            process = await start_ffmpeg(relay_args(self.private_port, srt, s.stream_key))
            self._relay = process
            assert process.stderr is not None
            try:
                while line_bytes := await process.stderr.readline():
                    line = line_bytes.decode("utf-8", "replace").rstrip()
                    log.debug("channel %s rtmp relay: %s", s.name, line)
                    problem = rtmp_problem(line)
                    if problem is not None:
                        self.channel.problem(problem)
                        if process.returncode is None:
                            process.kill()  # before it connects anything to the encoder
                await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            if not self._stopping:
                await asyncio.sleep(0.2)

    async def _publish(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a publisher"
        if self._publisher is not None or self.channel.state == "live":
            self.channel.problem(
                f"refused a second publisher ({who}) over RTMP: the channel already has a feed"
            )
            writer.close()
            return
        self._publisher = who
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            upstream = await self._connect_relay()
            if upstream is None:
                self.channel.problem("refused a publisher over RTMP: the relay is not listening")
                return
            up_reader, up_writer = upstream
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            self._publisher = None
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _connect_relay(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CONNECT_S
        while loop.time() < deadline and not self._stopping:
            try:
                return await asyncio.open_connection("127.0.0.1", self.private_port)
            except OSError:
                await asyncio.sleep(0.05)  # the relay is starting again after a publisher
        return None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.write_eof()
