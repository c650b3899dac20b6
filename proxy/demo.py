"""``meshproxy demo``: a small mesh on loopback, with traffic and a live summary.

It starts, with no root and no iptables:
  dev CA         a trust anchor and issuer made for this run; a leaf for each proxy
  app            an HTTP/1.1 server and a raw TCP echo on one port (it looks at the first bytes)
  server proxy   a real ``meshproxy run``; its inbound listener terminates mTLS and forwards to the app
  client proxy   a real ``meshproxy run``; its outbound listener dials the server proxy over mTLS,
                 knowing the server's identity from a standalone discovery file
  traffic        HTTP/1.1 keep-alive requests and TCP echo exchanges through client -> server

Without iptables nothing is redirected, so each proxy is told where non-redirected
connections go (MESHPROXY_*_FALLBACK_ADDR). It prints the admin URLs, a summary
every second (with the TLS identities the proxies report in their metrics), and
with ``--duration`` exits 0 after that time, or 1 if any exchange failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

HTTP_BODY = b"hello from the meshproxy demo app\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the app

async def serve_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 if the first bytes look like a request line, else a TCP echo."""
    try:
        first = await reader.read(4096)
        if first[:4] in (b"GET ", b"POST", b"HEAD", b"PUT "):
            buf = first
            while True:
                while b"\r\n\r\n" not in buf:
                    more = await reader.read(4096)
                    if not more:
                        return
                    buf += more
                _head, _, buf = buf.partition(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(HTTP_BODY), HTTP_BODY))
                await writer.drain()
                if not buf:
                    buf = await reader.read(4096)
                    if not buf:
                        return
        else:
            data = first
            while data:
                writer.write(data)
                await writer.drain()
                data = await reader.read(65536)
            writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


# ------------------------------------------------------------------ the proxies

@dataclass
class DemoProxy:
    name: str
    env: dict[str, str]
    admin: int
    log: str
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "run"], env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.returncode if self.proc else None


def proxy_env(inbound: int, outbound: int, admin: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINKERD2_PROXY_", "MESHPROXY_"))}
    env.update(
        LINKERD2_PROXY_INBOUND_LISTEN_ADDR=f"127.0.0.1:{inbound}",
        LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR=f"127.0.0.1:{outbound}",
        LINKERD2_PROXY_ADMIN_LISTEN_ADDR=f"127.0.0.1:{admin}",
        LINKERD2_PROXY_LOG="warn",
        LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD="5s",
    )
    env.update(extra)
    return env


SERVER_ID = "app.demo.serviceaccount.identity.linkerd.cluster.local"
CLIENT_ID = "client.demo.serviceaccount.identity.linkerd.cluster.local"


def dev_identities(workdir: str) -> dict[str, dict[str, str]]:
    """A dev CA for this run and a leaf per proxy, written as ``meshproxy identity issue`` writes them."""
    from proxy.tls import ca

    root, _root_key, issuer, issuer_key = ca.make_ca("cluster.local")
    envs = {}
    for role, name in (("server", SERVER_ID), ("client", CLIENT_ID)):
        leaf, key = ca.issue_leaf(issuer, issuer_key, name, 24 * 3600)
        out = os.path.join(workdir, role)
        ca.write_leaf(out, leaf, key, issuer, [root])
        with open(os.path.join(out, "roots.pem")) as f:
            roots = f.read()
        envs[role] = {
            "MESHPROXY_IDENTITY_CERT_FILE": os.path.join(out, "cert.pem"),
            "MESHPROXY_IDENTITY_KEY_FILE": os.path.join(out, "key.pem"),
            "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS": roots,
            "LINKERD2_PROXY_IDENTITY_LOCAL_NAME": name,
        }
    return envs


def tls_identities_seen(admin: int) -> set[str]:
    """server_id / client_id label values of tls="true" series in a proxy's /metrics."""
    import re

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return set()
    return set(re.findall(r'tls="true",(?:server_id|client_id)="([^"]+)"', text))


# ------------------------------------------------------------------ traffic

@dataclass
class Stats:
    ok: int = 0
    failed: int = 0
    bytes: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    last_error: str = ""

    def record(self, kind: str, started: float, nbytes: int) -> None:
        self.ok += 1
        self.bytes += nbytes
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.latencies_ms.append((time.monotonic() - started) * 1000)

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms[-5000:])
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def http_client(port: int, stats: Stats, stop: asyncio.Event) -> None:
    """Keep-alive HTTP/1.1 requests, paced to a few hundred per second."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(50):
                if stop.is_set():
                    break
                started = time.monotonic()
                writer.write(b"GET /hello HTTP/1.1\r\nHost: app.demo.svc.cluster.local\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
                body = await asyncio.wait_for(reader.readexactly(length), 5)
                if not head.startswith(b"HTTP/1.1 200") or body != HTTP_BODY:
                    raise ValueError(f"unexpected response {head[:40]!r}")
                stats.record("http/1", started, len(head) + len(body))
                await asyncio.sleep(0.005)
            writer.close()
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
            if stop.is_set():
                return
            stats.failed += 1
            stats.last_error = f"http/1: {exc!r}"
            await asyncio.sleep(0.1)


async def tcp_client(port: int, stats: Stats, stop: asyncio.Event) -> None:
    """Raw TCP: send 64 KiB, expect the same bytes back, close.

    The client reads a known length rather than waiting for EOF: a half-close does
    not cross the mTLS hop (TLS transports here cannot shut down one direction)."""
    payload = os.urandom(64 * 1024)
    while not stop.is_set():
        started = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"TCP!" + payload)
            echoed = await asyncio.wait_for(reader.readexactly(4 + len(payload)), 5)
            writer.close()
            if echoed != b"TCP!" + payload:
                raise ValueError(f"echo mismatch ({len(echoed)} bytes)")
            stats.record("tcp", started, 2 * len(echoed))
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
            if stop.is_set():
                return
            stats.failed += 1
            stats.last_error = f"tcp: {exc!r}"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ main

async def run_demo(duration: float | None) -> int:
    loop = asyncio.get_running_loop()
    app_port = free_port()
    app = await asyncio.start_server(serve_app, "127.0.0.1", app_port)
    logdir = tempfile.mkdtemp(prefix="meshproxy-demo-")
    s_in, s_out, s_admin = free_port(), free_port(), free_port()
    c_in, c_out, c_admin = free_port(), free_port(), free_port()
    ids = dev_identities(logdir)
    discovery = os.path.join(logdir, "discovery.toml")
    with open(discovery, "w") as f:
        f.write(f'[[services]]\nauthority = "app.demo.svc.cluster.local"\nport = 80\n'
                f'[[services.endpoints]]\naddr = "127.0.0.1:{s_in}"\nidentity = "{SERVER_ID}"\n')
    server = DemoProxy("server", proxy_env(s_in, s_out, s_admin, MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{app_port}", **ids["server"]),
                       s_admin, os.path.join(logdir, "server.log"))
    client = DemoProxy("client", proxy_env(c_in, c_out, c_admin, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{s_in}",
                                           MESHPROXY_DISCOVERY_FILE=discovery, **ids["client"]),
                       c_admin, os.path.join(logdir, "client.log"))
    proxies = [server, client]
    for p in proxies:
        p.start()
    stats = Stats()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        deadline = time.monotonic() + 30
        while not all(p.ready() for p in proxies):
            if time.monotonic() > deadline or any(p.proc and p.proc.poll() is not None for p in proxies):
                print(f"demo: a proxy did not become ready; logs in {logdir}", file=sys.stderr)
                return 1
            await asyncio.sleep(0.1)
        print("meshproxy demo: app -> client proxy (outbound) -> server proxy (inbound) -> app, on loopback")
        print(f"  client proxy admin: http://127.0.0.1:{c_admin}/metrics   (outbound listener 127.0.0.1:{c_out})")
        print(f"  server proxy admin: http://127.0.0.1:{s_admin}/metrics   (inbound listener 127.0.0.1:{s_in})")
        print(f"  app: 127.0.0.1:{app_port} (HTTP/1.1 and TCP echo); proxy logs in {logdir}")
        print(f"  mTLS between the proxies: client {CLIENT_ID} -> server {SERVER_ID} (dev CA in {logdir})")
        print("  Ctrl-C stops" + (f"; stopping by itself after {duration:g} s" if duration else ""))
        clients = [loop.create_task(http_client(c_out, stats, stop)) for _ in range(2)] + [loop.create_task(tcp_client(c_out, stats, stop))]
        started = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
            elapsed = time.monotonic() - started
            total = stats.ok + stats.failed
            rate = 100.0 * stats.ok / total if total else 100.0
            kinds = " ".join(f"{k}={v}" for k, v in sorted(stats.by_kind.items()))
            print(
                f"[{elapsed:5.1f}s] requests ok={stats.ok} failed={stats.failed} success={rate:.2f}% "
                f"p50={stats.percentile(50):.2f}ms p99={stats.percentile(99):.2f}ms bytes={stats.bytes} ({kinds})",
                flush=True,
            )
            if duration is not None and elapsed >= duration:
                stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        seen = tls_identities_seen(c_admin) | tls_identities_seen(s_admin)
        print("TLS identities seen in the proxies' metrics: " + (", ".join(sorted(seen)) if seen else "none"))
        if stats.last_error:
            print(f"last error: {stats.last_error}")
        meshed = {SERVER_ID, CLIENT_ID} <= seen
        print(f"done: {stats.ok} successful exchanges through the proxy pair{' over mTLS' if meshed else ''}, {stats.failed} failed")
        return 0 if stats.failed == 0 and stats.ok > 0 and meshed else 1
    finally:
        codes = [p.stop() for p in proxies]
        app.close()
        if any(c not in (0, None) for c in codes):
            print(f"demo: a proxy exited with {codes}; logs in {logdir}", file=sys.stderr)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="meshproxy demo", description="a proxy pair, an app and traffic on loopback")
    ap.add_argument("--duration", type=float, default=None, help="seconds to run, then exit 0 if every exchange succeeded")
    args = ap.parse_args(argv)
    import uvloop

    return uvloop.run(run_demo(args.duration))
