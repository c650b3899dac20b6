"""The supervisor <-> worker channel: JSON lines over a unix socket.

Requests carry an ``id`` and get exactly one reply with the same ``id``;
messages without an ``id`` are notices (``hello``, ``ready``). It carries
only control traffic (a metrics snapshot per scrape, a log filter change),
never proxied bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]] | dict[str, Any]]
MAX_LINE = 64 * 1024 * 1024  # a metrics snapshot of a busy worker can be large


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_message: Handler) -> None:
        self.reader = reader
        self.writer = writer
        self.on_message = on_message
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.ids = itertools.count(1)
        self.closed = asyncio.Event()

    def notify(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message).encode() + b"\n")

    async def request(self, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        rid = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        self.notify({**message, "id": rid})
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(rid, None)

    async def serve(self) -> None:
        """Read until the peer goes away; answer requests, resolve replies."""
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                message = json.loads(line)
                if "reply_to" in message:
                    fut = self.pending.get(message["reply_to"])
                    if fut is not None and not fut.done():
                        fut.set_result(message)
                    continue
                result: Any = self.on_message(message)
                if asyncio.iscoroutine(result):
                    result = await result
                if "id" in message:
                    self.notify({**(result or {}), "reply_to": message["id"]})
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("worker channel closed"))
            self.closed.set()
            self.writer.close()


def socket_address(path: str) -> str:
    """``@name`` is the abstract unix socket ``\\0name`` (Linux): no file on disk."""
    return "\0" + path[1:] if path.startswith("@") else path


def listening_socket(path: str) -> socket.socket:
    # uvloop refuses abstract addresses itself, so the sockets are made here and handed over.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(socket_address(path))
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def connect(path: str, on_message: Handler) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_address(path))  # local and immediate: the supervisor listens before starting workers
    sock.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
    return Channel(reader, writer, on_message)
