"""The admin HTTP server (port 4191): paths, methods, codes and bodies of ref section 8.

Not a hot path, so it is built on h11 for clarity. What it serves comes from an
``AdminBackend`` supplied by the app layer: in a single-process proxy that is
the worker itself; with several workers it is the supervisor, which asks every
worker and sums their metrics.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import json
from typing import Any, Protocol
from urllib.parse import unquote

import h11

from proxy.log import get_logger

log = get_logger("proxy.admin")

MAX_BODY = 64 * 1024  # a log filter or a shutdown request is tiny
NOT_LOCALHOST = b"Requests are only permitted from localhost.\n"


class AdminBackend(Protocol):
    shutdown_enabled: bool

    def is_ready(self) -> bool: ...

    async def metrics_text(self) -> str: ...

    def log_level(self) -> str: ...

    async def set_log_level(self, text: str) -> None: ...  # ValueError on a bad filter

    def environment(self) -> dict[str, str]: ...

    def shutdown(self) -> None: ...


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


Response = tuple[int, list[tuple[str, str]], bytes]


def _text(status: int, body: str | bytes, extra: list[tuple[str, str]] | None = None) -> Response:
    data = body.encode() if isinstance(body, str) else body
    return status, [("content-type", "text/plain")] + (extra or []), data


def _json(status: int, obj: Any) -> Response:
    return status, [("content-type", "application/json")], json.dumps(obj).encode()


async def handle(backend: AdminBackend, method: str, target: str, headers: dict[str, str], body: bytes, client_host: str | None) -> Response:
    path, _, query = target.partition("?")
    local = is_loopback(client_host)

    if path == "/metrics":
        text = (await backend.metrics_text()).encode()
        if "gzip" in headers.get("accept-encoding", ""):
            return 200, [("content-type", "text/plain; version=0.0.4"), ("content-encoding", "gzip")], gzip.compress(text, 5)
        return 200, [("content-type", "text/plain; version=0.0.4")], text
    if path == "/ready":
        return _text(200, "ready\n") if backend.is_ready() else _text(503, "not ready\n")
    if path == "/live":
        return _text(200, "live\n")
    if path == "/proxy-log-level":
        if not local:
            return _text(403, NOT_LOCALHOST)
        if method == "GET":
            return _text(200, backend.log_level() + "\n")
        if method == "PUT":
            try:
                await backend.set_log_level(body.decode("utf-8", "replace").strip())
            except ValueError as exc:
                return _text(400, f"{exc}\n")
            return 204, [], b""
        return _text(405, "", [("allow", "GET"), ("allow", "PUT")])
    if path == "/env.json":
        if method != "GET":
            return _text(405, "", [("allow", "GET")])
        accept = headers.get("accept", "*/*")
        if not any(a.split(";")[0].strip() in ("*/*", "application/*", "application/json") for a in accept.split(",")):
            return _text(406, "env.json is only available as application/json\n")
        env = backend.environment()
        if not query:
            return _json(200, env)
        keys = [unquote(k) for k in query.split("&") if k]
        if any("=" in k for k in keys):
            return _json(400, {"error": "env.json query must be a list of variable names, not key=value pairs"})
        return _json(200, {k: env.get(k) for k in keys})
    if path == "/shutdown":
        if method != "POST":
            return _text(405, "", [("allow", "POST")])
        if not local:
            return _text(403, NOT_LOCALHOST)
        if not backend.shutdown_enabled:
            return _text(404, "shutdown endpoint is not enabled\n")
        backend.shutdown()
        return _text(200, "shutdown\n")
    return 404, [], b""


class AdminProtocol(asyncio.Protocol):
    """One admin connection: h11 in, ``handle`` out; keep-alive honoured."""

    def __init__(self, backend: AdminBackend) -> None:
        self.backend = backend
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        self.transport: Any = None
        self.client_host: str | None = None
        self.busy = False
        self.request: h11.Request | None = None
        self.body = bytearray()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_host = peer[0] if peer else None

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._pump()
        return False

    def _pump(self) -> None:
        while not self.busy:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._send_error(exc.error_status_hint, str(exc))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = event
                self.body.clear()
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > MAX_BODY:
                    self._send_error(413, "request body too large")
                    return
            elif isinstance(event, h11.EndOfMessage):
                self.busy = True
                asyncio.get_running_loop().create_task(self._respond())
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    async def _respond(self) -> None:
        req = self.request
        assert req is not None
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
        try:
            status, hdrs, body = await handle(self.backend, req.method.decode(), req.target.decode("latin-1"), headers, bytes(self.body), self.client_host)
        except Exception as exc:  # noqa: BLE001 - an admin bug must not kill the admin server
            log.error("admin request failed", path=req.target.decode("latin-1"), error=repr(exc))
            status, hdrs, body = 500, [("content-type", "text/plain")], b"internal error\n"
        if self.transport.is_closing():
            return
        hdrs = hdrs + [("content-length", str(len(body)))]
        out = self.conn.send(h11.Response(status_code=status, headers=hdrs))
        if body and req.method != b"HEAD":
            out += self.conn.send(h11.Data(data=body))
        out += self.conn.send(h11.EndOfMessage())
        self.transport.write(out)
        if self.conn.our_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        try:
            self.conn.start_next_cycle()
        except h11.LocalProtocolError:
            self.transport.close()
            return
        self.busy = False
        self._pump()

    def _send_error(self, status: int, reason: str) -> None:
        try:
            body = (reason + "\n").encode()
            out = self.conn.send(h11.Response(status_code=status, headers=[("content-type", "text/plain"), ("content-length", str(len(body))), ("connection", "close")]))
            out += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
            self.transport.write(out)
        except h11.LocalProtocolError:
            pass
        self.transport.close()
