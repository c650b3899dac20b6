"""Real processes for the integration suites: a meshproxy on free loopback ports,
small servers, and helpers to wait with a bound."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORT_CEILING = min(_ephemeral_floor(), 32768)
_handed_out: set[int] = set()
_port_rng = random.Random(os.getpid())


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a server a test starts a moment later.

    Picked below the kernel's ephemeral range (as bench/ does): a port from that range
    can be taken as the source port of one of the many connections the suite opens
    between the pick and the bind ("address already in use"). A port is handed out
    once per test process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if _PORT_CEILING > 20500:
        for _ in range(500):
            port = _port_rng.randrange(20000, _PORT_CEILING)
            if port in _handed_out:
                continue
            with socket.socket(family, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(url: str, method: str = "GET", data: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached in {timeout} s (last error: {last_exc!r})")


@dataclass
class Proxy:
    env: dict[str, str]
    inbound: int
    outbound: int
    admin: int
    proc: subprocess.Popen | None = None
    log_path: str = ""

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    def start(self, wait_ready: bool = True) -> Proxy:
        fd, self.log_path = tempfile.mkstemp(prefix="meshproxy-test-", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run"], env=self.env, cwd=ROOT, stdout=fd, stderr=subprocess.STDOUT,
        )
        os.close(fd)
        if wait_ready:
            try:
                wait_until(lambda: http_get(self.admin_url + "/ready", timeout=1)[0] == 200, 20, what="proxy /ready")
            except TimeoutError:
                self.stop()
                raise AssertionError("proxy never became ready:\n" + self.read_output()) from None
        return self

    def read_output(self) -> str:
        if not self.log_path:
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children() if self.proc else []

    def rss_bytes(self) -> int:
        p = psutil.Process(self.proc.pid)
        return sum(x.memory_info().rss for x in [p] + p.children(recursive=True))

    def metrics(self) -> str:
        return http_get(self.admin_url + "/metrics")[2].decode()

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    child.kill()
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def make_proxy(pure: bool = False, workers: int = 1, **extra: str) -> Proxy:
    inbound, outbound, admin = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINKERD2_PROXY_", "MESHPROXY_"))}
    env.update(
        LINKERD2_PROXY_INBOUND_LISTEN_ADDR=f"127.0.0.1:{inbound}",
        LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR=f"127.0.0.1:{outbound}",
        LINKERD2_PROXY_ADMIN_LISTEN_ADDR=f"127.0.0.1:{admin}",
        LINKERD2_PROXY_CORES=str(workers),
        LINKERD2_PROXY_LOG="warn,linkerd=info",
        PYTHONPATH=ROOT,
        # Plaintext unless a test gives the proxy an identity (tests/support.with_identity).
        MESHPROXY_IDENTITY_DISABLED="true",
    )
    if pure:
        env["MESHPROXY_NO_EXTENSIONS"] = "1"
    env.update(extra)
    return Proxy(env, inbound, outbound, admin)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
            found = True
    if not found:
        raise KeyError(f"no series {name} with {labels}")
    return total


class ThreadedServer:
    """A real TCP server on 127.0.0.1 running ``handler(conn)`` per connection in a thread."""

    def __init__(self, handler, host: str = "127.0.0.1") -> None:
        import threading

        self.handler = handler
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import threading

        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handler(conn)
        except Exception as exc:  # noqa: BLE001 - surfaced to the test through .errors
            self.errors.append(exc)

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def recv_all(conn: socket.socket, limit: int | None = None) -> bytes:
    chunks = []
    got = 0
    while limit is None or got < limit:
        chunk = conn.recv(1 << 20 if limit is None else min(1 << 20, limit - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def echo_handler(conn: socket.socket) -> None:
    while True:
        data = conn.recv(1 << 18)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
