"""Inbound TLS: peek at a ClientHello without consuming it, and terminate mTLS for our name (ref 2.2, 5.5).

``peek_client_hello`` peeks (MSG_PEEK) at an accepted socket before any
transport exists (uvloop starts reading a new transport at once, pause or
not), until the first bytes say "TLS with SNI x", "not TLS", or the
timeout/EOF comes. No byte is consumed, so the TLS handshake (or the HTTP
detection) afterwards reads the connection from its first byte. ``adopt``
makes the transport, running the server handshake for our own name (OpenSSL's
handshake and our record layer, proxy.tls.transport, when the context's
secrets are logged here; uvloop's SSL transport otherwise); bytes that arrive
before the next stage is in place are held and replayed.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from proxy.core.detect import NEED_MORE, client_hello_sni
from proxy.tls import transport as tls_transport

PEEK_SIZE = 512  # a proxy's ClientHello is < ~300 bytes (ref 2.2)
NOT_TLS = "not_tls"
UNDECIDED = "undecided"


async def peek_client_hello(sock: socket.socket, timeout: float) -> tuple[str, str]:
    """(kind, sni) of an accepted socket that no transport reads yet: kind is "tls"
    (sni "" when absent), NOT_TLS, or UNDECIDED (timeout, EOF, or a hello too big to peek)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[tuple[str, str]] = loop.create_future()
    # Poll a duplicate: the transport made from ``sock`` later must not share our poll handle.
    fd = os.dup(sock.fileno())
    peek = socket.socket(fileno=fd)
    peek.setblocking(False)

    def finish(kind: str, sni: str = "") -> None:
        if not fut.done():
            fut.set_result((kind, sni))

    def readable() -> None:
        try:
            data = peek.recv(PEEK_SIZE, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            finish(UNDECIDED)
            return
        if not data:
            finish(UNDECIDED)  # EOF: the next stage sees it
            return
        sni = client_hello_sni(data)
        if sni is None:
            finish(NOT_TLS)
        elif sni == NEED_MORE:
            if len(data) >= PEEK_SIZE:
                finish(UNDECIDED)  # a ClientHello larger than the peek: not a proxy's
            else:
                # Level-triggered: wait a little for the rest rather than spin on the same bytes.
                loop.remove_reader(fd)
                loop.call_later(0.005, lambda: fut.done() or loop.add_reader(fd, readable))
        else:
            finish("tls", sni)

    loop.add_reader(fd, readable)
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        return UNDECIDED, ""
    finally:
        loop.remove_reader(fd)
        peek.close()


class _Hold:
    """Holds decrypted bytes until the next stage replaces it."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True


async def adopt(sock: socket.socket, server_ctx: Any | None, timeout: float) -> tuple[Any, _Hold]:
    """Make a transport of an accepted socket, terminating TLS when a context is given;
    returns (transport, holder of the bytes read before the next stage takes over)."""
    hold = _Hold()
    loop = asyncio.get_running_loop()
    if server_ctx is None:
        transport, _ = await loop.connect_accepted_socket(lambda: hold, sock)  # type: ignore[type-var]
    elif tls_transport.usable(server_ctx):
        # OpenSSL's handshake, then our record layer (proxy.tls.transport).
        tls = await asyncio.wait_for(
            tls_transport.handshake(lambda f: loop.connect_accepted_socket(f, sock), server_ctx, True), timeout)
        tls_transport.start(tls, hold)
        return tls, hold
    else:
        transport, _ = await loop.connect_accepted_socket(lambda: hold, sock, ssl=server_ctx, ssl_handshake_timeout=timeout)  # type: ignore[type-var]
    return transport, hold


def hand_over(tls_transport: Any, hold: _Hold, protocol: Any) -> None:
    """Give the TLS transport to ``protocol`` and replay what was held."""
    tls_transport.set_protocol(protocol)
    for chunk in hold.chunks:
        protocol.data_received(chunk)
    if hold.eof:
        protocol.eof_received()
