"""A loopback TCP forwarder that can cut every connection through it: a network outage between
the gateway processes and a Redis that must keep running (the shared one, a cluster other tests
use). It stands for the network, not for Redis: every byte still goes to the real server.
"""

from __future__ import annotations

import asyncio
import contextlib


class FaultProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.cut = False
        # The next ``hang_ups`` connections from ``hang_up_from``: their first bytes read, then
        # reset unanswered, as a gateway drops a handshake it did not get whole in time.
        self.hang_ups = 0
        self.hang_up_from = ""
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        if self.hang_ups and writer.get_extra_info("peername")[0] == self.hang_up_from:
            self.hang_ups -= 1
            await reader.read(1)
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(1 << 16):
                sink.write(data)
                await sink.drain()
        self._drop(pair)

    def _drop(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        if pair in self._pairs:
            self._pairs.discard(pair)
            for writer in pair:
                writer.transport.abort()  # a reset, as a dead peer or a cut link gives

    def interrupt(self) -> None:
        """Reset every connection and refuse new ones until :meth:`heal`."""
        self.cut = True
        for pair in list(self._pairs):
            self._drop(pair)

    def heal(self) -> None:
        self.cut = False

    async def close(self) -> None:
        self.interrupt()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
