"""The channel's SRT port: one publisher at a time, a second one refused and said so.

ffmpeg's SRT listener takes one caller and then stops listening, so a second publisher
never reaches the channel: its handshake goes unanswered, it times out, and nothing on the
channel says why. The channel therefore owns its public SRT port and relays the datagrams of
one publisher (by its address) to the encoder's listener on a private loopback port. A
handshake from any other address while that publisher holds the channel is answered at
once with an SRT rejection (409, "already in use": the caller fails with ``REJECT``), and
the refusal goes to the log and the channel's status; the first publisher is untouched.

The publisher's hold ends when it says goodbye (an SRT shutdown), when its datagrams stop
for ``IDLE_S``, or when ``Channel.publisher_epoch`` moves on (a new listener run, or the
listener refused the holder itself: a wrong stream key) before the holder sent any data in
the current run; the next caller is then let in.

The decisions are pure (:class:`PublisherSlot`, :func:`rejection`); :class:`SrtDoor` is the
shell: one UDP socket in front, one connected socket per publisher behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from typing import Any, Final, Literal

from streamplane.live.ingest import Channel

__all__ = [
    "IDLE_S",
    "REJECT_CONFLICT",
    "PublisherSlot",
    "SrtDoor",
    "control_type",
    "rejection",
]

log = logging.getLogger("streamplane.live")

IDLE_S: Final = 1.5  # a live SRT peer sends at least a keep-alive every second
# The handshake type that rejects: 1000 + the reason; SRT_REJX_CONFLICT (1409) is the
# predefined "the resource is already in use" (libsrt prints it as PREDEFINED:409).
REJECT_CONFLICT: Final = 1000 + 1409
_HANDSHAKE: Final = 0
_SHUTDOWN: Final = 5
_HEADER: Final = struct.Struct("!IIII")
_HANDSHAKE_CIF: Final = struct.Struct("!IHHIIIiII")  # up to the SYN cookie; 16 bytes of IP follow
_HANDSHAKE_LEN: Final = _HEADER.size + _HANDSHAKE_CIF.size + 16

Address = tuple[str, int]
Admission = Literal["forward", "take", "refuse"]


def control_type(datagram: bytes) -> int | None:
    """The control type of an SRT control packet (0 handshake, 5 shutdown, …); None for data."""
    if len(datagram) < _HEADER.size or not datagram[0] & 0x80:
        return None
    return int.from_bytes(datagram[0:2], "big") & 0x7FFF


def rejection(handshake: bytes, reason: int = REJECT_CONFLICT) -> bytes | None:
    """The listener's answer refusing the caller of ``handshake`` (an SRT handshake packet):
    the caller's own numbers, the rejection as the handshake type, addressed to its socket.
    None when ``handshake`` is not a whole handshake."""
    if control_type(handshake) != _HANDSHAKE or len(handshake) < _HANDSHAKE_LEN:
        return None
    _, _, _, isn, mss, flow, _, caller, _ = _HANDSHAKE_CIF.unpack_from(handshake, _HEADER.size)
    cif = _HANDSHAKE_CIF.pack(5, 0, 0, isn, mss, flow, reason, 0, 0) + bytes(16)
    return _HEADER.pack(0x80000000, 0, 0, caller) + cif


class PublisherSlot:
    """Who holds the channel's SRT port: pure, over addresses, times and the channel's epoch."""

    def __init__(self) -> None:
        self.holder: Address | None = None
        self._seen = 0.0
        self._epoch = 0

    def admit(self, sender: Address, now: float, epoch: int, kind: int | None) -> Admission:
        """What to do with a datagram of control type ``kind`` (None: data) from ``sender``:
        forward it to the encoder, ``take`` the port for it (a new publisher), or refuse it.
        ``epoch`` is the channel's publisher epoch (see the module docstring)."""
        if sender == self.holder:
            self._seen = now
            if kind is None:  # data: a session the channel's listener took, in this run
                self._epoch = epoch
            elif kind == _SHUTDOWN:
                self.holder = None
            return "forward"
        free = self.holder is None or now - self._seen > IDLE_S or epoch != self._epoch
        if not free or kind != _HANDSHAKE:  # or the tail of a session no longer held
            return "refuse"
        self.holder, self._seen, self._epoch = sender, now, epoch
        return "take"


class _Front(asyncio.DatagramProtocol):
    def __init__(self, door: SrtDoor) -> None:
        self.door = door

    def datagram_received(self, data: bytes, addr: tuple[str | Any, ...]) -> None:
        self.door.received(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("channel SRT port: %s", exc)


class SrtDoor:
    """The public SRT port of ``channel`` on ``host:port``, in front of its encoder's listener."""

    def __init__(self, channel: Channel, host: str, port: int) -> None:
        from streamplane.stack import free_port

        self.channel = channel
        self.host = host
        self.port = port
        self.slot = PublisherSlot()
        channel.listen_port = free_port(socket.SOCK_DGRAM)
        self._front: asyncio.DatagramTransport | None = None
        self._back: socket.socket | None = None
        self._back_for: Address | None = None
        self._refused: dict[Address, float] = {}
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Relay until :meth:`stop`."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Front(self), local_addr=(self.host, self.port)
        )
        self._front = transport
        try:
            await self._stopped.wait()
        finally:
            self._close_back()
            transport.close()

    async def stop(self) -> None:
        self._stopped.set()

    def received(self, data: bytes, sender: Address) -> None:
        channel = self.channel
        kind = control_type(data)
        admission = self.slot.admit(sender, time.monotonic(), channel.publisher_epoch, kind)
        if admission == "take":
            self._open_back(sender)
        elif admission == "refuse":
            self._refuse(data, sender, kind)
            return
        back = self._back
        if back is not None:
            with contextlib.suppress(OSError):  # full, or the listener between runs: SRT resends
                back.send(data)

    def _refuse(self, data: bytes, sender: Address, kind: int | None) -> None:
        if kind != _HANDSHAKE:
            return
        answer = rejection(data)
        if answer is not None and self._front is not None:
            self._front.sendto(answer, sender)
        now = time.monotonic()
        if now - self._refused.get(sender, -60.0) > 10.0:  # a caller retries: said once
            if len(self._refused) > 1024:
                self._refused.clear()
            self._refused[sender] = now
            who = f"{sender[0]}:{sender[1]}"
            self.channel.problem(
                f"refused a second publisher ({who}) over SRT: the channel already has a feed"
            )

    def _open_back(self, publisher: Address) -> None:
        self._close_back()
        loop = asyncio.get_running_loop()
        back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        back.setblocking(False)
        back.connect(("127.0.0.1", self.channel.listen_port or 0))
        self._back, self._back_for = back, publisher
        loop.add_reader(back.fileno(), self._from_listener, back, publisher)

    def _from_listener(self, back: socket.socket, publisher: Address) -> None:
        front = self._front
        while True:
            try:
                data = back.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the listener is not there (between runs): nothing to pass on
                return
            if front is not None:
                front.sendto(data, publisher)

    def _close_back(self) -> None:
        back = self._back
        if back is not None:
            asyncio.get_running_loop().remove_reader(back.fileno())
            back.close()
        self._back = self._back_for = None
