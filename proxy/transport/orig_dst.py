"""The original destination of a redirected connection (ref 1.3).

iptables REDIRECT rewrites the destination to the proxy's port; the kernel
keeps the address the client asked for, readable with SO_ORIGINAL_DST (IPv4,
level SOL_IP) or IP6T_SO_ORIGINAL_DST (IPv6, level SOL_IPV6), both option 80.
A socket that was not redirected has no such entry (ENOENT): its original
destination is then the local address it was accepted on.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from proxy.config import Addr

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28


def _unmap(host: str) -> str:
    """IPv4-mapped IPv6 peers are treated as IPv4 (ref 1.3)."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def local_addr(sock: Any) -> Addr:
    name = sock.getsockname()
    return Addr(_unmap(name[0]), name[1])


def peer_addr(sock: Any) -> Addr:
    name = sock.getpeername()
    return Addr(_unmap(name[0]), name[1])


def original_dst(sock: Any) -> tuple[Addr, bool]:
    """(original destination, whether the connection was redirected)."""
    local = local_addr(sock)
    try:
        if "." in local.host:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
            port, packed = struct.unpack_from("!2xH4s", raw)
            dst = Addr(str(ipaddress.IPv4Address(packed)), port)
        else:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6)
            port, packed = struct.unpack_from("!2xH4x16s", raw)
            dst = Addr(_unmap(str(ipaddress.IPv6Address(packed))), port)
    except OSError:
        return local, False
    return dst, dst != local
