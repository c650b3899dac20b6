"""The supervisor: N worker processes, the admin port, signals and drain.

Each worker is a fresh interpreter (``python -m proxy worker``) that binds its
own SO_REUSEPORT listeners, so a worker's death loses only its own
connections. The supervisor restarts a dead worker at once, serves the admin
port, sums the workers' metrics on each scrape, forwards log-level changes to
every worker (and to the ones it starts later), and on SIGTERM / SIGINT /
``POST /shutdown`` asks every worker to drain and exits 0 when they are done.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import uvloop

from proxy import log as logging_
from proxy.config import Config
from proxy.http.admin import AdminProtocol
from proxy.metrics import process
from proxy.metrics.registry import Registry, merge, render
from proxy.tls.identity import IdentityMetrics, source_from_config
from proxy.transport import ipc, listen

log = logging_.get_logger("proxy.supervisor")
RESTART_DELAY = 0.05  # a crash loop must not spin the CPU; still well under the 1 s promise
SNAPSHOT_TIMEOUT = 3.0  # a worker that cannot answer a scrape in 3 s is left out of that scrape


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.shutdown_enabled = config.shutdown_endpoint_enabled
        self.channels: dict[int, ipc.Channel] = {}
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.ready_workers: set[int] = set()
        self.ready = False
        self.stopping = False
        self.stop_event: asyncio.Event | None = None
        # An abstract unix socket: no file, so a read-only root filesystem (Linkerd's injector sets
        # readOnlyRootFilesystem) is no obstacle; the workers share our network namespace.
        # Written "@name" (environment variables cannot hold the leading NUL); see ipc.socket_address.
        self.socket_path = f"@meshproxy-supervisor-{os.getpid()}"
        self.restarts = 0
        self.credentials: Any = None
        self.registry = Registry(config.metrics_retain_idle)  # the supervisor's own families (identity)

    # -- AdminBackend
    def is_ready(self) -> bool:
        return self.ready

    async def metrics_text(self) -> str:
        channels = list(self.channels.values())
        replies = await asyncio.gather(*(c.request({"op": "snapshot"}, SNAPSHOT_TIMEOUT) for c in channels), return_exceptions=True)
        snaps = [r for r in replies if isinstance(r, dict) and "families" in r]
        text = render(merge([self.registry.snapshot()] + [s["families"] for s in snaps]))
        return text + process.render(process.merge([process.sample()] + [s["process"] for s in snaps]))

    def log_level(self) -> str:
        return logging_.current_filter()

    async def set_log_level(self, text: str) -> None:
        logging_.set_filter(text)  # validates; ValueError -> 400
        os.environ["LINKERD2_PROXY_LOG"] = text  # workers started later inherit it
        await asyncio.gather(*(c.request({"op": "log-level", "filter": text}) for c in self.channels.values()), return_exceptions=True)

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def shutdown(self) -> None:
        self.begin_shutdown("admin /shutdown")

    # -- identity: one key and certificate per proxy, shared by every worker (SPEC 8)
    def install_identity(self, creds: Any) -> None:
        self.credentials = creds
        message = {"op": "identity", "credentials": creds.to_json()}
        for channel in self.channels.values():
            channel.notify(message)

    # -- workers
    async def on_worker_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state: dict[str, Any] = {}

        def on_message(message: dict[str, Any]) -> dict[str, Any]:
            if message.get("op") == "hello":
                state["index"] = message["index"]
                self.channels[message["index"]] = channel
                if self.credentials is not None:  # a (re)started worker gets the current identity at once
                    channel.notify({"op": "identity", "credentials": self.credentials.to_json()})
            elif message.get("op") == "ready":
                self.ready_workers.add(message["index"])
                if len(self.ready_workers) >= self.config.workers:
                    self.ready = True  # never reverts (ref 9)
            return {}

        channel = ipc.Channel(reader, writer, on_message)
        await channel.serve()
        index = state.get("index")
        if index is not None and self.channels.get(index) is channel:
            del self.channels[index]

    async def keep_worker(self, index: int) -> None:
        """Run worker ``index`` and start it again whenever it dies, until shutdown."""
        while not self.stopping:
            env = dict(os.environ, MESHPROXY_WORKER_INDEX=str(index), MESHPROXY_SUPERVISOR_SOCKET=self.socket_path)
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "worker", env=env)
            self.processes[index] = proc
            code = await proc.wait()
            if self.stopping:
                return
            self.restarts += 1
            log.warning("worker exited; restarting", worker=index, code=code, restarts=self.restarts)
            await asyncio.sleep(RESTART_DELAY)

    def begin_shutdown(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("shutdown requested", why=why)
        for proc in self.processes.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        assert self.stop_event is not None
        self.stop_event.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_shutdown, signal.Signals(sig).name)
        ipc_server = await asyncio.start_unix_server(self.on_worker_connected, sock=ipc.listening_socket(self.socket_path), limit=ipc.MAX_LINE)
        admin = await loop.create_server(lambda: AdminProtocol(self), sock=listen.bind(self.config.admin_listen, reuse_port=False))
        log.info("starting workers", workers=self.config.workers, admin=str(self.config.admin_listen))
        keepers = [loop.create_task(self.keep_worker(i)) for i in range(self.config.workers)]
        if not self.config.identity_disabled:
            source = source_from_config(self.config, IdentityMetrics(self.registry))
            assert source is not None  # the CLI refuses to start without one
            keepers.append(loop.create_task(source.run(self.install_identity)))

        await self.stop_event.wait()
        deadline = self.config.shutdown_grace_period + 5.0  # workers enforce the grace period; this is a backstop
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in self.processes.values())), deadline)
        except TimeoutError:
            for proc in self.processes.values():
                if proc.returncode is None:
                    proc.kill()
        for task in keepers:
            task.cancel()
        admin.close()
        ipc_server.close()
        return 0


def run(config: Config) -> int:
    logging_.configure(config.log_filter, config.log_format)
    return uvloop.run(Supervisor(config).run())
