"""This proxy's own identity as the data path sees it: credentials and their TLS contexts.

One identity per proxy: the supervisor (or the single worker) runs the
identity source and installs every new certificate here; contexts are built
once per certificate, not per connection. Until the first certificate, the
proxy is not ready (ref 9) and meshed connections cannot be made.
"""

from __future__ import annotations

from typing import Any

from proxy.log import get_logger
from proxy.tls import transport as tls_transport

log = get_logger("proxy.tls")


class LocalIdentity:
    def __init__(self) -> None:
        self.creds: Any = None
        self.server_ctx: Any = None
        self.client_ctx: Any = None
        self.generation = 0
        # Protect the records of meshed connections ourselves after OpenSSL's handshake
        # (proxy.tls.transport): the contexts log their secrets to this process's key log.
        self.record_layer = True

    @property
    def name(self) -> str:
        """Our identity (metrics, l5d-client-id on the peer side)."""
        return self.creds.name if self.creds is not None else ""

    @property
    def server_name(self) -> str:
        """The SNI peers use to reach us: equal to the name for Linkerd identities."""
        return self.creds.sni if self.creds is not None else ""

    def install(self, creds: Any) -> None:
        # The inbound server offers ALPN transport.l5d.io/v1 (ref 3.7): a meshed client connecting to the
        # inbound port directly negotiates it; ordinary mesh connections offer no ALPN and get none.
        self.server_ctx = creds.server_context(alpn=["transport.l5d.io/v1"])
        self.client_ctx = creds.client_context()
        klog = tls_transport.keylog() if self.record_layer else None
        if klog is not None:
            klog.attach(self.server_ctx)
            klog.attach(self.client_ctx)
        self.creds = creds
        self.generation += 1
        log.info("identity installed", name=creds.name, not_after=int(creds.not_after), generation=self.generation)


    def make_client_context(self, alpn: list[str] | None = None) -> Any:
        """Another client context of the current identity (e.g. offering ALPN), with its
        secrets logged like the others, so its connections take the record layer too."""
        ctx = self.creds.client_context(alpn=alpn)
        klog = tls_transport.keylog() if self.record_layer else None
        if klog is not None:
            klog.attach(ctx)
        return ctx

    def records_usable(self, ctx: Any) -> bool:
        """Whether connections with ``ctx`` take the record layer (proxy.tls.transport)."""
        return self.record_layer and tls_transport.usable(ctx)


class IdentityMismatch(Exception):
    def __init__(self, expected: str, got: str | None) -> None:
        super().__init__(f"server identity {got!r} is not the expected {expected!r}")
        self.expected = expected
        self.got = got
