"""``streamplane live start``: a channel's ingest and its origin in one process."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from streamplane.live.ingest import Channel, ChannelSettings
from streamplane.live.origin import live_app

__all__ = ["serve_channel"]


async def serve_channel(
    settings: ChannelSettings, host: str, port: int, *, access_log: bool = False
) -> None:
    """Run ``settings``'s channel and its HTTP origin on ``host:port`` until SIGINT/SIGTERM.

    The channel's open segments are closed and its playlists ended before the process exits.
    """
    import uvicorn

    channel = Channel(settings)
    config = uvicorn.Config(
        live_app(channel),
        host=host,
        port=port,
        log_level="warning",
        access_log=access_log,
        proxy_headers=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    loop = asyncio.get_running_loop()
    # uvicorn takes SIGINT/SIGTERM while it serves and raises them again once it stopped;
    # by then these handlers are back in place, so the raise ends nothing before the channel
    # closed its segments.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: None)
    ingest = asyncio.create_task(channel.run())
    ingest.add_done_callback(lambda _: setattr(server, "should_exit", True))
    try:
        await server.serve()
    finally:
        await channel.stop()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(ingest), 10)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if ingest.done() and not ingest.cancelled() and ingest.exception() is not None:
        raise ingest.exception()  # type: ignore[misc]
    if not server.started:
        raise OSError(f"the live origin could not listen on {host}:{port}")
