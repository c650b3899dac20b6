"""Idle keep-alive connections to one endpoint, in one worker (HTTP/1 upstreams).

Shared by the HTTP/1 proxy (http.h1) and the HTTP/2-to-HTTP/1 downgrade (http.orig_proto):
the most recently used connection is reused first (the least likely to be closing), at most
``max_idle`` wait, and one timer per pool, not one per connection, closes those idle longer
than ``idle_timeout`` (3 s by default: shorter than common server idle timeouts, users.md A4).
A connection must have ``lost``, ``transport``, ``idle_since`` and ``close()``.

Compiled as it is (setup.py COMPILED_TWINS, proxy._native.pool, with proxy/_native/pool.pxd):
every HTTP/1 request takes a connection from a pool and gives it back.
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.config import Addr


class IdlePool:
    def __init__(self, target: Addr, connect_timeout: float, idle_timeout: float, max_idle: int,
                 identity: str = "", local: Any = None, metrics: Any = None, dst_labels: tuple[Any, ...] | None = None) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.identity = identity  # meshed endpoint: connect with mTLS and check this name
        self.local = local
        self.metrics = metrics
        self.dst_labels = dst_labels  # tcp_* labels (peer="dst") of its connections; None: not counted
        self.idle: list[Any] = []
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self._sweep: asyncio.TimerHandle | None = None

    def acquire(self) -> Any:
        """The most recently used idle connection, if any."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.lost and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    def release(self, conn: Any) -> None:
        idle = self.idle
        if self.closed or conn.lost or len(idle) >= self.max_idle:
            conn.close()
            return
        # The loop's clock: it is read once per loop iteration, and millisecond precision
        # is plenty for a timeout of seconds (time.monotonic() is a clock read per release).
        conn.idle_since = self.loop.time()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.idle_timeout, self._close_stale)

    def forget(self, conn: Any) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def _close_stale(self) -> None:
        self._sweep = None
        cutoff = self.loop.time() - self.idle_timeout
        for conn in [c for c in self.idle if c.idle_since <= cutoff]:
            self.idle.remove(conn)
            conn.close()
        if self.idle:
            oldest = min(c.idle_since for c in self.idle)
            self._sweep = self.loop.call_later(max(0.05, oldest + self.idle_timeout - self.loop.time()), self._close_stale)

    def close(self) -> None:
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
