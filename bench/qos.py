"""The QoS consumer beside the write-behind consumer, draining the same backlog.

Method: ``--batches`` heartbeats (a batch of one event each, as players send them) of
``--sessions`` sessions, each session playing one of ``--titles`` titles from one of
``--edges`` edges and from one of ``--networks`` client networks, are appended to an embedded
stream while no consumer runs (what a store outage leaves). Then, on a fresh store each, the
write-behind consumer (resume positions and screens: ``telemetry/consumers.py``) and the QoS
consumer (``telemetry/qos_consumer.py``: sessions' marks, minute and hour rows per edge, title,
network and edge for a network) each drain the whole backlog as their own consumer group, one
after the other: events/s written, and the QoS consumer's rate as a share of the write-behind's.
Both read the same stream; the QoS consumer writes far more rows per event (four keys, a
minute and an hour each), which is what the ratio shows. The figure that matters: whether
the QoS group keeps up with what the write-behind takes.

    .venv/bin/python bench/qos.py [--stores SQLite PostgreSQL] [--batches 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from playback import _database

from streamplane.control.heartbeats import StoreSink
from streamplane.control.qos import QosStore
from streamplane.control.store import Account, Store, migrate
from streamplane.telemetry import EventBatch, HeartbeatEvent, QosConsumer
from streamplane.telemetry.consumers import WriteBehind
from streamplane.telemetry.group_consumer import GroupConsumer
from streamplane.telemetry.stream_embedded import EmbeddedStream


async def _backlog(stream: EmbeddedStream, args: argparse.Namespace) -> None:
    now = time.time()
    appends = []
    for n in range(args.batches):
        k = n % args.sessions
        event = HeartbeatEvent(
            account=f"a{k}",
            session=f"s{k}",
            device=f"d{k}",
            title=f"t{k % args.titles}",
            received_at=now + n / 1000,
            at=now + n / 1000,
            seq=n,
            kind="position",
            position_s=n / 10,
            edge=f"e{k % args.edges}",
            client=f"10.{k % args.networks}.0.1",
            rebuffer_s=n / args.sessions * 0.01,
            switches=n // args.sessions,
            bitrate_kbps=3000.0,
            startup_s=0.8,
        )
        appends.append(
            stream.append(
                EventBatch(
                    device=event.device,
                    events=[event],
                    account=event.account,
                    session=event.session,
                    title=event.title,
                    received_at=event.received_at,
                )
            )
        )
    for group in ("store", "qos"):  # the outage: both groups exist, nothing written yet
        await (await stream.group(group)).close()
    await asyncio.gather(*appends)


async def _drain(consumer: GroupConsumer) -> float:
    t0 = time.perf_counter()
    await consumer.start()
    await consumer.settle(timeout_s=1800)
    seconds = time.perf_counter() - t0
    await consumer.stop()
    return seconds


async def _run(
    urls: dict[str, str], stream_dir: Path, args: argparse.Namespace
) -> tuple[float, float]:
    stream = EmbeddedStream(stream_dir, partitions=8)
    await _backlog(stream, args)
    rates = []
    for which, url in urls.items():
        store = Store(url)
        await migrate(store)
        if which == "store":
            accounts = [
                {"id": f"a{i}", "email": f"a{i}@x.io", "password_hash": "-", "plan": "b"}
                | {"created_at": 0.0}
                for i in range(args.sessions)
            ]
            await store.transaction(lambda c, a=accounts: c.execute(Account.__table__.insert(), a))
            consumer: GroupConsumer = WriteBehind(stream, StoreSink(store, 90.0, 15.0))
        else:
            consumer = QosConsumer(
                stream,
                QosStore(store),
                lambda address: (address.rsplit(".", 2)[0] + ".0.0/16", 64500),
                max_batches=args.qos_batches,
            )
        rates.append(args.batches / await _drain(consumer))
        await store.dispose()
    await stream.close()
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", nargs="*", default=["SQLite", "PostgreSQL"])
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--titles", type=int, default=50)
    parser.add_argument("--edges", type=int, default=8)
    parser.add_argument("--networks", type=int, default=200)
    parser.add_argument("--qos-batches", type=int, default=8192, help="batches per QoS write")
    args = parser.parse_args()
    print(__doc__.split("\n\n")[1].replace("\n", " "))
    with tempfile.TemporaryDirectory() as tmp:
        for store_name in args.stores:
            work = Path(tmp)
            with (
                _database(store_name, work, f"store-{store_name}") as store_url,
                _database(store_name, work, f"qos-{store_name}") as qos_url,
            ):
                urls = {"store": store_url, "qos": qos_url}
                stream_dir = work / f"stream-{store_name}"
                write_behind, qos = asyncio.run(_run(urls, stream_dir, args))
            print(
                f"- {store_name}: write-behind {write_behind:,.0f} events/s, QoS {qos:,.0f}"
                f" events/s: {qos / write_behind:.2f} of the write-behind's"
            )
    print(
        "command: .venv/bin/python bench/qos.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not isinstance(v, list)
        )
    )


if __name__ == "__main__":
    main()
