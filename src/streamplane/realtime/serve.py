"""``streamplane gateway``: one or several gateway processes sharing a port (SO_REUSEPORT).

The parent raises the open-file limit (inherited by the children), starts the processes, and
stops them all when it is told to stop or one of them dies. With the in-memory broker there can
be only one process: two would each hold their own channels and counts; with Redis
(``redis://…``, or ``redis+cluster://…`` for a Redis Cluster) any number, on any machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import resource
import signal
import socket
import time

import httpx

from streamplane.config import RealtimeSettings
from streamplane.realtime.admission import ADMISSION_CHANNEL, decode_admission_plan
from streamplane.realtime.broker import Broker, BrokerError
from streamplane.realtime.gateway import Gateway, GatewaySettings, raise_open_file_limit
from streamplane.realtime.memory import MemoryHub
from streamplane.realtime.redis import RedisBroker
from streamplane.realtime.tokens import sign_realtime_token

__all__ = ["GatewayConfigError", "gateway_settings", "make_broker", "poll_admission", "serve"]

_log = logging.getLogger(__name__)

# Descriptors a gateway process keeps for other than viewers: its listening socket, the
# broker's connections, logs, the admission poll.
_FD_RESERVE = 512


class GatewayConfigError(ValueError):
    """The settings cannot run a gateway; the message says which and what to set."""


def make_broker(url: str) -> Broker:
    if url == "memory":
        return MemoryHub().node()
    if url.startswith(("redis://", "rediss://", "redis+cluster://")):
        cluster = url.startswith("redis+cluster://")
        try:
            return RedisBroker.connect(url.replace("redis+cluster://", "redis://"), cluster=cluster)
        except (BrokerError, ValueError) as err:
            raise GatewayConfigError(f"realtime.broker = {url!r}: {err}") from None
    raise GatewayConfigError(
        f"realtime.broker = {url!r}: 'memory' (one process), 'redis://host:port' (one Redis) or "
        "'redis+cluster://host:port' (a Redis Cluster, any of its nodes)"
    )


def gateway_settings(settings: RealtimeSettings) -> GatewaySettings:
    if not settings.token_key:
        raise GatewayConfigError(
            "realtime.token_key is not set: the gateway checks the tokens the control plane "
            "signs with it (a hex secret shared by both; e.g. `openssl rand -hex 32`)"
        )
    try:
        key = bytes.fromhex(settings.token_key)
    except ValueError:
        raise GatewayConfigError("realtime.token_key must be hex") from None
    if settings.processes < 1:
        raise GatewayConfigError("realtime.processes must be at least 1")
    if settings.processes > 1 and settings.broker == "memory":
        raise GatewayConfigError(
            "realtime.processes > 1 needs a broker shared by the processes; with "
            "realtime.broker = 'memory' run one process"
        )
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return GatewaySettings(
        token_key=key,
        max_connections=settings.max_connections,
        admission_rate=settings.admission_rate,
        admission_burst=settings.admission_burst,
        connection_ceiling=None if soft == resource.RLIM_INFINITY else soft - _FD_RESERVE,
    )


async def _run_one(settings: RealtimeSettings, reuse_port: bool) -> None:
    # websockets logs "connection open" and "connection closed" at INFO for every connection:
    # 200,000 lines per reconnect storm of 100,000 viewers, written by the loop that serves
    # them. The gateway's own counts are on /health.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    gateway = Gateway(make_broker(settings.broker), gateway_settings(settings))
    port = await gateway.start(settings.host, settings.port, reuse_port=reuse_port)
    _log.info("gateway %s listening on %s:%d", gateway.broker.node, settings.host, port)
    poll = None
    if settings.control_url:
        poll = asyncio.create_task(poll_admission(gateway, settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if poll is not None:
        poll.cancel()
    await gateway.close()


async def poll_admission(gateway: Gateway, settings: RealtimeSettings) -> None:
    """Take the control plane's admission plan every ``admission_poll_s``, for good.

    Polled rather than pushed through the broker: the in-memory broker reaches no other
    process, a gateway started mid-event asks at once instead of waiting for the next push,
    and the plan is a schedule known long before its windows open (a warm-up is minutes,
    a poll seconds), which each process applies by its own clock: a control plane that is
    down when a window opens or closes changes nothing. A failed poll keeps the last plan.
    """
    url = settings.control_url.rstrip("/") + "/v1/live/admission"
    key = gateway.settings.token_key
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            token = sign_realtime_token(
                key,
                user=f"gateway:{gateway.broker.node}",
                channels={ADMISSION_CHANNEL: ["read"]},
                now=int(time.time()),
                ttl_s=300,
            )
            try:
                r = await http.get(url, headers={"authorization": f"Bearer {token}"})
                r.raise_for_status()
                gateway.plan_admission(decode_admission_plan(r.content).windows)
            except (httpx.HTTPError, ValueError) as err:
                _log.warning("admission plan from %s: %s (the last one stands)", url, err)
            await asyncio.sleep(settings.admission_poll_s)


def _child(settings: RealtimeSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run_one(settings, reuse_port=True))


def serve(settings: RealtimeSettings) -> None:
    """Run the gateway until SIGTERM/SIGINT; raises GatewayConfigError first if it cannot."""
    gateway_settings(settings)
    make_broker(settings.broker)
    soft, hard = raise_open_file_limit()
    _log.info("open files: %d per process (hard limit %d)", soft, hard)
    if settings.processes == 1:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run_one(settings, reuse_port=False))
        return
    # Bind once here so a port already taken fails now, with a message, not in every child.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((settings.host, settings.port))
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_child, args=(settings,), name=f"gateway-{i}", daemon=True)
        for i in range(settings.processes)
    ]
    for child in children:
        child.start()
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping and all(c.is_alive() for c in children):
            for child in children:
                child.join(0.2)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(10)
            if child.is_alive():
                child.kill()
