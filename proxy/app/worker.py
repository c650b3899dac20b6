"""One worker: one uvloop event loop serving the inbound and outbound listeners.

With one worker this is the whole proxy and also serves the admin port; with
several, the supervisor serves admin and talks to each worker over the IPC
channel (metrics snapshots, log filter changes). Drain (SPEC 8, ref 9): stop
accepting at once, let open relays finish, exit 0 by the grace period.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from typing import Any

import uvloop

from proxy import log as logging_
from proxy.app import inbound, outbound
from proxy.config import Config
from proxy.discovery.static import StaticDiscovery
from proxy.http.admin import AdminProtocol
from proxy.http.server import HttpStage
from proxy.metrics import process
from proxy.metrics.families import ProxyMetrics
from proxy.metrics.registry import render
from proxy.native import NO_EXTENSIONS
from proxy.tls.credentials import Credentials
from proxy.tls.identity import IdentityMetrics, source_from_config
from proxy.tls.local import LocalIdentity
from proxy.transport import ipc, listen
from proxy.transport.relay import IMPLEMENTATION, RelayTracker

log = logging_.get_logger("proxy.worker")
PR_SET_PDEATHSIG = 1


class Worker:
    def __init__(self, config: Config, index: int, supervisor_socket: str | None, environment: dict[str, str]) -> None:
        self.config = config
        self.index = index
        self.supervisor_socket = supervisor_socket
        self.environ = environment
        self.metrics = ProxyMetrics(config.metrics_retain_idle)
        self.tracker = RelayTracker(config.tcp_idle_timeout, config.tcp_half_closed_timeout)
        self.metrics.registry.before_snapshot.append(self.tracker.flush_counts)
        self.metrics.registry.before_snapshot.append(self._count_tasks)
        self.http: HttpStage | None = None
        self.local = LocalIdentity()
        self.identity_ready: asyncio.Event | None = None
        self.discovery: StaticDiscovery | None = None
        self.servers: list[Any] = []  # asyncio servers and SocketAcceptors: both have close()
        self.ready = False
        self.stopping: asyncio.Event | None = None
        self.channel: ipc.Channel | None = None
        # AdminBackend, used when this worker serves admin itself.
        self.shutdown_enabled = config.shutdown_endpoint_enabled

    # -- AdminBackend
    def is_ready(self) -> bool:
        return self.ready

    async def metrics_text(self) -> str:
        snap = self.snapshot()
        return render(snap["families"]) + process.render(process.merge([snap["process"]]))

    def log_level(self) -> str:
        return logging_.current_filter()

    async def set_log_level(self, text: str) -> None:
        logging_.set_filter(text)

    def environment(self) -> dict[str, str]:
        return dict(self.environ)

    def shutdown(self) -> None:
        self.begin_shutdown("admin /shutdown")

    def _count_tasks(self) -> None:
        self.metrics.process_asyncio_tasks.labels().value = len(asyncio.all_tasks())

    # -- identity
    def install_identity(self, creds: Any) -> None:
        self.local.install(creds)
        if self.identity_ready is not None and not self.identity_ready.is_set():
            self.identity_ready.set()

    # -- lifecycle
    def snapshot(self) -> dict[str, Any]:
        return {"families": self.metrics.registry.snapshot(), "process": process.sample()}

    def begin_shutdown(self, why: str) -> None:
        if self.stopping is not None and not self.stopping.is_set():
            log.info("shutdown requested", why=why, worker=self.index)
            self.stopping.set()

    async def on_supervisor_message(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op == "snapshot":
            return self.snapshot()
        if op == "log-level":
            try:
                logging_.set_filter(message["filter"])
            except ValueError as exc:
                return {"error": str(exc)}
            return {"ok": True}
        if op == "identity":
            self.install_identity(Credentials.from_json(message["credentials"]))
            return {"ok": True}
        if op == "drain":
            self.begin_shutdown("supervisor")
            return {"ok": True}
        return {"error": f"unknown op {op!r}"}

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_shutdown, signal.Signals(sig).name)
        self.tracker.start()
        self.identity_ready = asyncio.Event()
        if self.config.identity_disabled:
            self.identity_ready.set()
        elif not self.supervisor_socket:
            # One process: this worker keeps the proxy's identity itself.
            source = source_from_config(self.config, IdentityMetrics(self.metrics.registry))
            assert source is not None  # the CLI refuses to start without one
            loop.create_task(source.run(self.install_identity))

        if self.supervisor_socket:
            self.channel = await ipc.connect(self.supervisor_socket, self.on_supervisor_message)
            self.channel.notify({"op": "hello", "index": self.index, "pid": os.getpid()})
            watcher = loop.create_task(self.channel.serve())
            # The supervisor is gone: nobody can restart or drain us, so drain now.
            watcher.add_done_callback(lambda _t: self.begin_shutdown("supervisor channel closed"))
        else:
            admin_sock = listen.bind(self.config.admin_listen, reuse_port=False)
            self.servers.append(await loop.create_server(lambda: AdminProtocol(self), sock=admin_sock))

        # Listeners are bound now (ports reserved, connections wait in the backlog) but accept
        # only once the first certificate is installed (ref 1.2, 9).
        in_sock = listen.bind(self.config.inbound_listen)
        out_socks = [listen.bind(addr) for addr in self.config.outbound_listen]
        waiting = loop.create_task(self._log_waiting())
        ready, stop = loop.create_task(self.identity_ready.wait()), loop.create_task(self.stopping.wait())
        await asyncio.wait([ready, stop], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not self.identity_ready.is_set():
            ready.cancel()
            for sock in [in_sock, *out_socks]:
                sock.close()
            return await self.drain()
        self.http = HttpStage(self.config, self.metrics, self.tracker, pure=NO_EXTENSIONS, local=self.local)
        if self.config.destination_svc_addr:
            # A control plane: the Destination API, instead of the standalone file (SPEC 6).
            from proxy.discovery.control import ControlPlaneDiscovery

            self.discovery = ControlPlaneDiscovery(self.config, self.local)  # type: ignore[assignment]
        elif self.config.discovery_file:
            self.discovery = StaticDiscovery(self.config.discovery_file)
            loop.create_task(self.discovery.watch())
        inbound_acceptor = inbound.build(self.config, self.metrics, self.tracker, self.http, self.local)
        # Inbound accepts raw sockets itself: TLS detection peeks before any transport reads.
        self.servers.append(listen.SocketAcceptor(in_sock, inbound_acceptor.accepted_socket))
        outbound_forwarder = outbound.build(self.config, self.metrics, self.tracker, self.http, self.discovery, self.local)
        for sock in out_socks:
            self.servers.append(await loop.create_server(outbound_forwarder, sock=sock))  # type: ignore[arg-type]
        loop.create_task(self._evict_idle(outbound_forwarder.backends))
        backends = outbound_forwarder.backends

        def count_backends() -> None:
            held = len(backends.by_name)
            for table in ("entries", "by_name"):
                held += len(getattr(self.discovery, table, ()) or ()) if not isinstance(self.discovery, StaticDiscovery) else 0
            self.metrics.outbound_backends.labels().value = held

        self.metrics.registry.before_snapshot.append(count_backends)

        self.ready = True  # until identity exists, ready = listening (ref 9)
        if self.channel is not None:
            self.channel.notify({"op": "ready", "index": self.index})
        log.info(
            "listening", worker=self.index, inbound=str(self.config.inbound_listen),
            outbound=",".join(str(a) for a in self.config.outbound_listen), relay=IMPLEMENTATION,
        )

        await self.stopping.wait()
        return await self.drain()

    async def _evict_idle(self, backends: Any) -> None:
        """Per-destination state unused for the discovery idle timeout is dropped (ref 3.1)."""
        idle = self.config.outbound_discovery_idle_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.5, min(5.0, idle / 2)))
            now = loop.time()
            backends.sweep(now, idle)
            sweep = getattr(self.discovery, "sweep", None)
            if sweep is not None:
                sweep(now, idle)

    async def _log_waiting(self) -> None:
        while True:
            await asyncio.sleep(15)
            log.warning("Waiting for identity to be initialized...")

    async def drain(self) -> int:
        grace = self.config.shutdown_grace_period
        admin_servers, proxy_servers = (self.servers[:1], self.servers[1:]) if not self.supervisor_socket else ([], self.servers)
        for server in proxy_servers:
            server.close()  # stop accepting: new connections are refused
        if self.http is not None:
            self.http.shutdown()  # HTTP/1: close after the request in flight; HTTP/2: GOAWAY
        waits = [self.tracker.wait_empty()] + ([self.http.wait_empty()] if self.http is not None else [])
        try:
            await asyncio.wait_for(asyncio.gather(*waits), grace)
        except TimeoutError:
            log.warning("graceful shutdown did not complete in the grace period; terminating now", open=len(self.tracker.live))
        for server in admin_servers:
            server.close()
        self.tracker.stop()
        if self.http is not None:
            self.http.close()
        return 0


def set_parent_death_signal() -> None:
    """Die with the supervisor even if it is killed with SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run(config: Config, index: int = 0, supervisor_socket: str | None = None) -> int:
    logging_.configure(config.log_filter, config.log_format, worker=index if supervisor_socket else None)
    # asyncio warns on every TLS connection whose peer half-closes ("returning true from
    # eof_received() has no effect when using ssl"): expected here, and noise in the logs.
    import logging

    logging.getLogger("asyncio").setLevel(logging.ERROR)
    if supervisor_socket:
        set_parent_death_signal()
    worker = Worker(config, index, supervisor_socket, dict(os.environ))
    code = uvloop.run(worker.run())
    sys.stdout.flush()
    return code
