"""Dial an endpoint: plain TCP, or mTLS to a meshed peer (ref 5.4).

For a meshed endpoint the SNI is the peer's identity; the chain is verified
against our trust anchors by the TLS context, and the expected name must then
be among the leaf's SANs (hostname checking is off: Linkerd ignores the SNI
match and checks the identity after the handshake). When this process logs the
context's secrets, the handshake is OpenSSL's over memory BIOs and the records
after it are protected by proxy.tls.records (proxy.tls.transport); otherwise
uvloop's SSL transport carries the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from proxy.config import Addr
from proxy.tls import transport as tls_transport
from proxy.tls.credentials import check_server_identity, peer_identity
from proxy.tls.local import IdentityMismatch, LocalIdentity


class _Unverified(asyncio.Protocol):
    """Holds a fresh mTLS connection, unread, while the peer's identity is checked."""

    def connection_made(self, transport: Any) -> None:
        transport.pause_reading()


async def connect(factory: Callable[[], Any], addr: Addr, timeout: float, identity: str = "", local: LocalIdentity | None = None) -> tuple[Any, Any]:
    loop = asyncio.get_running_loop()
    if identity and local is not None and local.client_ctx is not None and local.records_usable(local.client_ctx):
        return await _connect_records(factory, addr, timeout, identity, local.client_ctx)
    if identity and local is not None and local.client_ctx is not None:
        # The protocol meets the transport only once the peer's name is checked: a protocol
        # that speaks first (the HTTP/2 preface) must not say anything to an impostor.
        transport, _ = await asyncio.wait_for(
            loop.create_connection(_Unverified, addr.host, addr.port, ssl=local.client_ctx, server_hostname=identity,
                                   ssl_handshake_timeout=timeout),
            timeout,
        )
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or not check_server_identity(ssl_object, identity):
            got = peer_identity(ssl_object) if ssl_object is not None else None
            transport.abort()
            raise IdentityMismatch(identity, got)
        if transport.is_closing():
            raise ConnectionResetError(f"{addr} closed the connection after the TLS handshake")
        proto = factory()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        transport.resume_reading()
        return transport, proto
    # One timer cancelling this task is much cheaper than wait_for's extra task and futures.
    task = asyncio.current_task()
    assert task is not None
    expired = []

    def expire() -> None:
        expired.append(True)
        task.cancel()

    timer = loop.call_later(timeout, expire)
    try:
        return await loop.create_connection(factory, addr.host, addr.port)
    except asyncio.CancelledError:
        if not expired:
            raise  # cancelled by someone else (the client left)
        task.uncancel()
        raise TimeoutError(f"connect to {addr} timed out after {timeout:g}s") from None
    finally:
        timer.cancel()


async def _connect_records(factory: Callable[[], Any], addr: Addr, timeout: float, identity: str, ctx: Any) -> tuple[Any, Any]:
    loop = asyncio.get_running_loop()
    tls = await asyncio.wait_for(
        tls_transport.handshake(lambda f: loop.create_connection(f, addr.host, addr.port), ctx, False, identity),
        timeout,
    )
    # As above: the protocol meets the transport only once the peer's name is checked.
    ssl_object = tls.get_extra_info("ssl_object")
    if not check_server_identity(ssl_object, identity):
        tls.abort()
        raise IdentityMismatch(identity, peer_identity(ssl_object))
    if tls.is_closing():
        raise ConnectionResetError(f"{addr} closed the connection after the TLS handshake")
    proto = factory()
    tls_transport.start(tls, proto)
    return tls, proto
