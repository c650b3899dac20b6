"""A loopback HTTP/2 proxy for tests: ``H2ServerConnection`` for one fixed route.

Until the app's protocol detection hands HTTP/2 connections over, this stands
in for it, and does the hand-over the same way: read the first bytes, then
``transport.set_protocol(conn); conn.connection_made(transport);
conn.data_received(prefix)``.

    python tests/fakes/h2_proxy_harness.py --target HOST:PORT [--response-timeout S]
        [--connect-timeout S] [--no-informational] [--direction inbound|outbound]
        [--client-id NAME] [--setting FIELD=INT ...]   (FIELD: an H2Settings field)

Prints ``listening <port>`` when ready. Commands on stdin, one per line:
``metrics`` prints the registry snapshot as one JSON line; ``shutdown`` drains
every connection and prints ``drained`` once all are closed; ``pools`` prints
how many upstream connections each pool dialled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import uvloop  # noqa: E402

from proxy.config import Addr  # noqa: E402
from proxy.http.h2 import H2ServerConnection, H2Settings  # noqa: E402
from proxy.http.stack import Clients, HttpRoute  # noqa: E402
from proxy.metrics.families import ProxyMetrics  # noqa: E402

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Detect(asyncio.Protocol):
    """Reads the preface, then hands the transport to the HTTP/2 server."""

    def __init__(self, make) -> None:
        self.make = make
        self.buf = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) < len(PREFACE):
            return
        conn = self.make()
        self.transport.set_protocol(conn)
        conn.connection_made(self.transport)
        conn.data_received(self.buf)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--response-timeout", type=float, default=None)
    ap.add_argument("--connect-timeout", type=float, default=1.0)
    ap.add_argument("--no-informational", action="store_true")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--direction", default="outbound")
    ap.add_argument("--client-id", default="")
    ap.add_argument("--setting", action="append", default=[])
    args = ap.parse_args()
    host, _, port = args.target.rpartition(":")
    target = Addr(host, int(port))
    labels = (args.direction, None, str(target), target.host, str(target.port), "no_identity", None, None, "loopback",
              None, None, None, None, None, None, None, None, None, None)
    route = HttpRoute(args.direction, target, labels, args.connect_timeout, args.response_timeout, not args.no_informational,
                      client_id=args.client_id)
    metrics = ProxyMetrics()
    clients = Clients(None)
    settings = H2Settings(**{k: int(v) for k, v in (item.split("=", 1) for item in args.setting)})
    live: set[H2ServerConnection] = set()

    def make() -> H2ServerConnection:
        conn = H2ServerConnection(route, metrics, clients, settings)
        live.add(conn)
        conn.done.add_done_callback(lambda _: live.discard(conn))
        return conn

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Detect(make), "127.0.0.1", args.port)
    print("listening", server.sockets[0].getsockname()[1], flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        if line == "metrics":
            print(json.dumps(metrics.registry.snapshot()), flush=True)
        elif line == "pools":
            print(json.dumps({str(k[1]): p.connections_opened for k, p in clients.pools.items()}), flush=True)
        elif line == "shutdown":
            server.close()
            conns = list(live)
            for conn in conns:
                conn.shutdown()
            await asyncio.gather(*(c.done for c in conns))
            print("drained", flush=True)
    server.close()
    clients.close()


if __name__ == "__main__":
    uvloop.run(main())
