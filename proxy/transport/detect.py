"""Protocol detection stage: read the first bytes (bounded in size and time), then hand over.

The accepted transport is given to a ``DetectProtocol`` that collects bytes
until ``decide(buf)`` returns something other than NEED_MORE, the buffer
limit is reached, the client half-closes, or the detect timeout fires.
``on_done(conn, kind, buf, client_eof)`` then passes the connection, with
every byte read so far, to the next stage: nothing is consumed, and a timeout
never fails the connection (it becomes opaque, users.md A1).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from proxy.core.detect import NEED_MORE

READ_TIMEOUT = "read_timeout"
CLOSED = "closed"


class DetectProtocol:
    __slots__ = ("conn", "decide", "on_done", "limit", "buf", "timer", "started", "finished", "live")

    def __init__(self, conn: Any, decide: Callable[[bytes], str], on_done: Callable[..., None], timeout: float, limit: int, live: set[Any]) -> None:
        self.conn = conn
        self.live = live  # a connection being detected holds the drain too
        live.add(self)
        self.decide = decide
        self.on_done = on_done
        self.limit = limit
        self.buf = b""
        self.finished = False
        self.started = time.monotonic()
        self.timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)

    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        if self.finished:
            return
        self.buf += data
        kind = self.decide(self.buf)
        if kind != NEED_MORE:
            self._finish(kind, False)
        elif len(self.buf) >= self.limit:
            self._finish(self.decide(self.buf + b"\n\x00"), False)  # full buffer: decide now

    def eof_received(self) -> bool:
        if not self.finished:
            self._finish(CLOSED if not self.buf else self.decide(self.buf + b"\n\x00"), True)
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.finished:
            self.finished = True
            self.timer.cancel()
            self.live.discard(self)
            self.conn.src.closed("")

    def shutdown(self) -> None:
        pass  # detection ends by itself within the detect timeout

    def _timed_out(self) -> None:
        if not self.finished:
            self._finish(READ_TIMEOUT, False)

    def _finish(self, kind: str, client_eof: bool) -> None:
        self.finished = True
        self.timer.cancel()
        self.live.discard(self)
        self.on_done(self.conn, kind, self.buf, client_eof, time.monotonic() - self.started)


def start(conn: Any, decide: Callable[[bytes], str], on_done: Callable[..., None], timeout: float, limit: int, live: set[Any]) -> None:
    proto = DetectProtocol(conn, decide, on_done, timeout, limit, live)
    conn.transport.set_protocol(proto)
