"""Listening sockets shared by the workers with SO_REUSEPORT.

Every worker binds its own socket on the same address; the kernel spreads
new connections over them. A worker that dies takes only its own backlog.
"""

from __future__ import annotations

import socket
from typing import Any

from proxy.config import Addr

LISTEN_BACKLOG = 4096  # a burst of redirected connects waits here rather than being refused


def bind(addr: Addr, reuse_port: bool = True) -> socket.socket:
    family = socket.AF_INET6 if addr.family_is_ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and addr.host == "::":
            # [::] takes IPv4 too (dual stack), as Linkerd's chart default `[::]:4143` expects.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((addr.host, addr.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class SocketAcceptor:
    """Accepts on a listening socket itself, handing each raw socket to ``on_socket``.

    Used where the first bytes must be peeked before a transport exists (inbound
    TLS detection): uvloop's servers start reading as soon as a connection is made.
    """

    def __init__(self, sock: socket.socket, on_socket: Any) -> None:
        import asyncio

        self.sock = sock
        self.on_socket = on_socket
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._accept)
        self.closed = False

    def _accept(self) -> None:
        for _ in range(64):  # a burst is taken in one wake-up, bounded so other work runs
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. ECONNABORTED, EMFILE: the next wake-up tries again
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.on_socket(conn)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
