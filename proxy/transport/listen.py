"""Listening sockets shared by the workers with SO_REUSEPORT.

Every worker binds its own socket on the same address; the kernel spreads
new connections over them. A worker that dies takes only its own backlog.
"""

from __future__ import annotations

import socket

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
