"""HTTP/2 forwarding (proxy/http/h2.py) between real clients and real upstreams.

Every test runs against two proxies:

* ``meshproxy``: the real proxy (``python -m proxy run``); its outbound
  listener sends connections that were not redirected to the fallback
  address, the upstream under test, after HTTP/2 detection.
* ``harness``: ``tests/fakes/h2_proxy_harness.py``, the module alone: a uvloop
  server handing each connection to ``H2ServerConnection`` for one fixed
  route, the way the detection stage does.

Upstreams: nghttpd, a grpcio server, and ``tests/fakes/h2_upstream.py``
(resets, GOAWAY, delays). Clients: curl, nghttp, h2load, grpcio, and a small
h2 client over a socket for what those cannot do (stall one stream's reads,
reset one stream).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import psutil
import pytest

from tests.support import ROOT, ThreadedServer, free_port, make_proxy, metric_value

grpc = pytest.importorskip("grpc")
h2_connection = pytest.importorskip("h2.connection")
from h2.config import H2Configuration  # noqa: E402
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived  # noqa: E402

FAKES = os.path.join(ROOT, "tests", "fakes")
MiB = 1 << 20

pytestmark = pytest.mark.skipif(not all(shutil.which(tool) for tool in ("nghttp", "h2load", "nghttpd", "curl")),
                                reason="needs curl, nghttp2-client and nghttp2-server")


# ---------------------------------------------------------------- processes


class Process:
    """A helper process that prints ``listening <port>`` and reads commands on stdin."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": ROOT},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        try:
            first = self.expect("listening", 15)
        except BaseException:
            self.stop()
            raise
        self.port = int(first.split()[1])

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.log.append(line)
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {prefix!r} line in {timeout} s; output:\n" + "".join(self.log))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def command(self, line: str, reply: str, timeout: float = 10) -> str:
        self.proc.stdin.write(line + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self.expect(reply, timeout)

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Harness(Process):
    """The module alone, behind a stand-in for the detection stage."""

    def __init__(self, target: str, connect_timeout: float | None = None, response_timeout: float | None = None,
                 informational: bool = True, settings: dict[str, int] | None = None, direction: str = "outbound",
                 client_id: str = "") -> None:
        options = ["--target", target, "--direction", direction, "--client-id", client_id]
        for name, value in (settings or {}).items():
            options += ["--setting", f"{name}={value}"]
        if connect_timeout is not None:
            options += ["--connect-timeout", str(connect_timeout)]
        if response_timeout is not None:
            options += ["--response-timeout", str(response_timeout)]
        if not informational:
            options.append("--no-informational")
        super().__init__(os.path.join(FAKES, "h2_proxy_harness.py"), *options)
        self.url = f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, **want: str) -> float:
        for fam in json.loads(self.command("metrics", "[")):
            if fam["name"] != name:
                continue
            total = 0.0
            for values, value in fam["series"]:
                labels = dict(zip(fam["labels"], values, strict=True))
                if all(labels.get(k) == v for k, v in want.items()):
                    total += value["count"] if isinstance(value, dict) else value
            return total
        raise KeyError(name)

    def drain(self, timeout: float) -> None:
        self.command("shutdown", "drained", timeout)


class Meshproxy:
    """The real proxy; its outbound listener forwards to ``target`` (the fallback)."""

    ENV_NAMES = {"max_concurrent_streams": "MAX_CONCURRENT_STREAMS", "initial_stream_window": "INITIAL_STREAM_WINDOW_SIZE",
                 "initial_connection_window": "INITIAL_CONNECTION_WINDOW_SIZE", "max_frame_size": "MAX_FRAME_SIZE"}

    def __init__(self, target: str, connect_timeout: float | None = None, response_timeout: float | None = None,
                 informational: bool = True, settings: dict[str, int] | None = None) -> None:
        env = {"MESHPROXY_OUTBOUND_FALLBACK_ADDR": target}
        for name, value in (settings or {}).items():
            env[f"LINKERD2_PROXY_OUTBOUND_SERVER_HTTP2_{self.ENV_NAMES[name]}"] = str(value)
        if connect_timeout is not None:
            env["LINKERD2_PROXY_OUTBOUND_CONNECT_TIMEOUT"] = f"{int(connect_timeout * 1000)}ms"
        if response_timeout is not None:
            env["MESHPROXY_HTTP_RESPONSE_TIMEOUT"] = f"{int(response_timeout * 1000)}ms"
        if not informational:
            env["LINKERD2_PROXY_INGRESS_MODE"] = "true"  # ref 1.5: informational headers are off in ingress mode
        self.proxy = make_proxy(**env)
        self.proxy.start()
        self.port = self.proxy.outbound
        self.url = f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, **want: str) -> float:
        try:
            return metric_value(self.proxy.metrics(), name, **want)
        except KeyError:
            return 0.0

    def _processes(self) -> list[psutil.Process]:
        main = psutil.Process(self.proxy.proc.pid)  # type: ignore[union-attr]
        return [main, *main.children(recursive=True)]

    def cpu_seconds(self) -> float:
        return sum(p.cpu_times().user + p.cpu_times().system for p in self._processes())

    def rss(self) -> int:
        return self.proxy.rss_bytes()

    def drain(self, timeout: float) -> None:
        proc = self.proxy.proc
        proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert proc.wait(timeout) == 0  # type: ignore[union-attr]

    def stop(self) -> None:
        self.proxy.stop()


def run(cmd: list[str], timeout: float = 30, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=timeout, input=input)


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_bytes(b"hello\n")
    (root / "1m").write_bytes(os.urandom(MiB))
    return root


@contextlib.contextmanager
def start_nghttpd(www, *options: str):
    port = free_port()
    proc = subprocess.Popen(["nghttpd", "--no-tls", "-a", "127.0.0.1", *options, "-d", str(www), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise TimeoutError("nghttpd did not listen")
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def nghttpd(www):
    with start_nghttpd(www) as target:
        yield target


@pytest.fixture(scope="module")
def upstream():
    proc = Process(os.path.join(FAKES, "h2_upstream.py"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(params=["meshproxy", "harness"])
def proxy(request):
    """``proxy(target, connect_timeout=, response_timeout=, informational=)`` starts the proxy under test."""
    kind = Meshproxy if request.param == "meshproxy" else Harness
    started: list = []

    def start(target: str, **options) -> Harness | Meshproxy:
        p = kind(target, **options)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.stop()


def upstream_stats(upstream: Process) -> dict:
    out = run(["curl", "-sS", "--max-time", "5", "--http2-prior-knowledge", f"http://127.0.0.1:{upstream.port}/stats"])
    return json.loads(out.stdout)


# ---------------------------------------------------------------- a raw client


class RawClient:
    """An HTTP/2 client on a real socket, for what curl and nghttp cannot do:
    leave one stream unread, or reset one stream."""

    def __init__(self, port: int, connection_window: int = 0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2_connection.H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        if connection_window:
            self.conn.increment_flow_control_window(connection_window)
        self.bodies: dict[int, int] = {}
        self.status: dict[int, str] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.trailers: dict[int, dict] = {}
        self.outgoing: dict[int, memoryview] = {}  # request bodies still to send
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "test")], end_stream=end)
        self.bodies[sid] = 0
        self.flush()
        return sid

    def post(self, path: str, body: bytes) -> int:
        sid = self.request(path, end=False)
        self.outgoing[sid] = memoryview(body)
        self.send_bodies()
        return sid

    def send_bodies(self) -> None:
        """Send request bodies as far as the proxy's windows allow."""
        for sid, data in list(self.outgoing.items()):
            while data:
                n = min(len(data), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if n <= 0:
                    break
                self.conn.send_data(sid, bytes(data[:n]), end_stream=n == len(data))
                data = data[n:]
            if data:
                self.outgoing[sid] = data
            else:
                del self.outgoing[sid]
        self.flush()

    def reset(self, sid: int, code: int) -> None:
        self.conn.reset_stream(sid, code)
        self.flush()

    def pump(self, done, timeout: float, stalled: frozenset[int] = frozenset()) -> None:
        """Read until ``done()``; never acknowledge DATA of ``stalled`` streams."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("raw client: condition not reached")
            self.sock.settimeout(min(left, 1.0))
            try:
                data = self.sock.recv(1 << 18)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionError("proxy closed the connection")
            for event in self.conn.receive_data(data):
                if isinstance(event, ResponseReceived):
                    self.status[event.stream_id] = dict(event.headers)[":status"]
                elif isinstance(event, DataReceived):
                    self.bodies[event.stream_id] = self.bodies.get(event.stream_id, 0) + len(event.data)
                    if event.stream_id not in stalled:
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, TrailersReceived):
                    self.trailers[event.stream_id] = dict(event.headers)
                elif isinstance(event, StreamEnded):
                    self.ended.add(event.stream_id)
                elif isinstance(event, StreamReset):
                    self.resets[event.stream_id] = int(event.error_code)
                    self.outgoing.pop(event.stream_id, None)
            self.send_bodies()

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- plain HTTP/2


def curl(url: str, *options: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return run(["curl", "-sS", "--max-time", str(timeout), "--http2-prior-knowledge", *options, url], timeout=timeout + 5)


def conn_numbers(text: str) -> list[int]:
    """The upstream connection numbers in /conn answers."""
    return [int(n) for n in re.findall(r"conn=(\d+)", text)]


def test_curl_get_and_large_body(nghttpd, www, proxy):
    p = proxy(nghttpd)
    out = curl(p.url + "/index.html", "-D", "-")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"HTTP/2 200"), out.stdout
    assert out.stdout.endswith(b"\r\n\r\nhello\n")
    out = curl(p.url + "/1m", timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (www / "1m").read_bytes()
    assert p.metric("request_total", direction="outbound") == 2
    assert p.metric("response_total", status_code="200", classification="success") == 2
    if isinstance(p, Meshproxy):  # the app counts connections; the harness does not
        assert p.metric("tcp_open_total", peer="dst") == 1  # one upstream connection for both requests
        assert p.metric("tcp_read_bytes_total", peer="dst") > MiB


def test_streams_of_all_clients_share_one_upstream_connection(upstream, proxy):
    p = proxy(f"127.0.0.1:{upstream.port}")
    out = run(["nghttp", *(f"{p.url}/conn?{i}" for i in range(8)), *(f"{p.url}/size/300000?{i}" for i in range(4))], timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    numbers = conn_numbers(out.stdout.decode(errors="replace"))
    numbers += conn_numbers(curl(p.url + "/conn").stdout.decode()) + conn_numbers(curl(p.url + "/conn").stdout.decode())
    assert len(numbers) == 10 and len(set(numbers)) == 1, numbers


def test_multiplexed_large_bodies(nghttpd, proxy):
    p = proxy(nghttpd)
    urls = [f"{p.url}/1m?{i}" for i in range(8)] + [f"{p.url}/index.html?{i}" for i in range(8)]
    out = run(["nghttp", "-ns", *urls], timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(b" 200 ") == 16, out.stdout


def test_streams_wait_for_the_upstreams_concurrency_limit(www, proxy):
    with start_nghttpd(www, "--max-concurrent-streams=2") as target:
        p = proxy(target)
        urls = [f"{p.url}/1m?{i}" for i in range(10)]
        out = run(["nghttp", "-ns", *urls], timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.count(b" 200 ") == 10, out.stdout


def test_upload_through_echo(upstream, proxy, tmp_path):
    p = proxy(f"127.0.0.1:{upstream.port}")
    body = os.urandom(3 * MiB + 12345)
    path = tmp_path / "body"
    path.write_bytes(body)
    out = curl(p.url + "/echo", "--data-binary", f"@{path}", timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout == body


def test_connection_specific_headers_are_not_forwarded(upstream, proxy):
    p = proxy(f"127.0.0.1:{upstream.port}")
    out = curl(p.url + "/headers", "-H", "te: trailers", "-H", "x-keep: 1")
    names = [k for k, _ in json.loads(out.stdout)]
    assert "x-keep" in names and "te" in names
    assert not {"connection", "keep-alive", "transfer-encoding", "upgrade"} & set(names)


def test_response_trailers_reach_the_client(upstream, proxy):
    p = proxy(f"127.0.0.1:{upstream.port}")
    out = run(["nghttp", "-v", p.url + "/trailers"])
    assert "x-trailer: yes" in out.stdout.decode(), out.stdout
    assert out.returncode == 0


def test_server_settings_are_advertised_and_honoured(upstream, proxy):
    p = proxy(f"127.0.0.1:{upstream.port}", settings={"max_concurrent_streams": 7, "initial_stream_window": 1 << 20,
                                                      "initial_connection_window": 4 << 20, "max_frame_size": 32768})
    out = run(["nghttp", "-v", *(f"{p.url}/conn?{i}" for i in range(20))], timeout=30)
    text = out.stdout.decode()
    assert "SETTINGS_MAX_CONCURRENT_STREAMS(0x03):7" in text, text
    assert "SETTINGS_INITIAL_WINDOW_SIZE(0x04):1048576" in text
    assert "SETTINGS_MAX_FRAME_SIZE(0x05):32768" in text
    assert re.search(r"recv WINDOW_UPDATE frame <length=4, flags=0x00, stream_id=0>\n\s+\(window_size_increment=4128769\)", text), text
    assert len(conn_numbers(text)) == 20


def test_settings_from_config():
    from proxy.config import parse
    from proxy.http.h2 import H2Settings

    config = parse({"LINKERD2_PROXY_INBOUND_SERVER_HTTP2_MAX_CONCURRENT_STREAMS": "50",
                    "LINKERD2_PROXY_INBOUND_SERVER_HTTP2_KEEP_ALIVE_INTERVAL": "10s",
                    "LINKERD2_PROXY_HTTP2_INITIAL_STREAM_WINDOW_SIZE": "131072"})
    inbound, outbound = H2Settings.from_config(config, "inbound"), H2Settings.from_config(config, "outbound")
    assert inbound.max_concurrent_streams == 50 and inbound.keep_alive_interval == 10.0
    assert outbound.max_concurrent_streams is None and outbound.keep_alive_interval is None
    assert inbound.client_stream_window == outbound.client_stream_window == 131072
    assert inbound.client_connection_window == 1048576


def test_h2load_bounded_and_cpu_per_request(nghttpd, proxy):
    p = proxy(nghttpd)
    n = 3000
    run(["h2load", "-n", "200", "-c", "2", "-m", "10", p.url + "/index.html"], timeout=60)  # warm up
    before = p.cpu_seconds()
    t0 = time.monotonic()
    out = run(["h2load", "-n", str(n), "-c", "2", "-m", "10", p.url + "/index.html"], timeout=120)
    wall = time.monotonic() - t0
    cpu = p.cpu_seconds() - before
    text = out.stdout.decode()
    assert f"{n} succeeded" in text, text
    direct = run(["h2load", "-n", str(n), "-c", "2", "-m", "10", f"http://{nghttpd}/index.html"], timeout=60).stdout.decode()
    print(f"\n{type(p).__name__}: h2load -n {n} -c 2 -m 10 in {wall:.2f}s through the proxy, proxy CPU {cpu * 1e6 / n:.0f} us/request;",
          "direct:", " ".join(line for line in direct.splitlines() if line.startswith("finished")))
    assert p.metric("response_total", status_code="200") == n + 200


def test_inbound_client_id_is_set_by_the_proxy_alone(upstream):
    # Harness only: the real proxy sets a client id on mTLS connections alone.
    client_id = "web.default.serviceaccount.identity.linkerd.cluster.local"
    h = Harness(f"127.0.0.1:{upstream.port}", direction="inbound", client_id=client_id)
    try:
        out = curl(h.url + "/headers", "-H", "l5d-client-id: spoofed")
        assert [v for k, v in json.loads(out.stdout) if k == "l5d-client-id"] == [client_id]
        h_anonymous = Harness(f"127.0.0.1:{upstream.port}", direction="inbound")
        try:
            out = curl(h_anonymous.url + "/headers", "-H", "l5d-client-id: spoofed")
            assert [v for k, v in json.loads(out.stdout) if k == "l5d-client-id"] == []
        finally:
            h_anonymous.stop()
    finally:
        h.stop()


# ---------------------------------------------------------------- resets and GOAWAY


@pytest.mark.parametrize("path,code", [("/reset/11", "ENHANCE_YOUR_CALM(0x0b)"), ("/reset/2", "INTERNAL_ERROR(0x02)"),
                                       ("/reset-after/8", "CANCEL(0x08)")])
def test_upstream_reset_reaches_client_with_same_code(upstream, proxy, path, code):
    p = proxy(f"127.0.0.1:{upstream.port}")
    out = run(["nghttp", "-v", p.url + path])
    text = out.stdout.decode()
    assert "recv RST_STREAM" in text and f"error_code={code}" in text, text
    name = code.split("(")[0]
    assert p.metric("response_total", error=f"h2({name})", classification="failure") == 1


def test_client_reset_reaches_upstream_with_same_code(upstream, proxy):
    p = proxy(f"127.0.0.1:{upstream.port}")
    client = RawClient(p.port)
    path = f"/delay/3000?{time.monotonic()}"
    try:
        sid = client.request(path)
        time.sleep(0.3)  # let the request reach the upstream
        client.reset(sid, 0xB)  # ENHANCE_YOUR_CALM
        other = client.request("/conn")
        client.pump(lambda: other in client.ended, 10)
    finally:
        client.close()
    deadline = time.monotonic() + 5
    while [path, 0xB] not in upstream_stats(upstream)["resets"]:
        assert time.monotonic() < deadline, upstream_stats(upstream)
        time.sleep(0.05)
    assert p.metric("response_total", error="h2(ENHANCE_YOUR_CALM)") == 1


def test_upstream_goaway_refuses_newer_streams_and_redials(upstream, proxy):
    p = proxy(f"127.0.0.1:{upstream.port}")
    [before] = conn_numbers(curl(p.url + "/conn").stdout.decode())
    out = run(["nghttp", "-v", p.url + "/hold", p.url + "/second"], timeout=20)
    text = out.stdout.decode()
    assert "error_code=REFUSED_STREAM" in text, text  # /second, above the upstream's last_stream_id
    assert "held" in text  # /hold, below it, completed on the old connection
    after = conn_numbers(curl(p.url + "/conn").stdout.decode()) + conn_numbers(curl(p.url + "/conn").stdout.decode())
    assert after[0] == after[1] > before, (before, after)
    assert p.metric("response_total", error="h2(REFUSED_STREAM)") == 1


# ---------------------------------------------------------------- errors the proxy makes


def test_refused_upstream_is_502_with_l5d_proxy_error(proxy):
    p = proxy(f"127.0.0.1:{free_port()}")
    head = curl(p.url + "/", "-D", "-").stdout.decode().lower()
    assert head.startswith("http/2 502"), head
    assert "l5d-proxy-error:" in head and "content-length: 0" in head
    assert p.metric("outbound_http_errors_total", error="i/o") == 1
    assert p.metric("response_total", status_code="502", classification="failure") == 1


def test_no_informational_headers_when_route_forbids(proxy):
    p = proxy(f"127.0.0.1:{free_port()}", informational=False)
    head = curl(p.url + "/", "-D", "-").stdout.decode().lower()
    assert head.startswith("http/2 502") and "l5d-proxy-error" not in head, head


def test_connect_timeout_is_504(proxy):
    # A listener whose accept queue is full: the kernel drops further SYNs, so
    # connecting hangs until the proxy's connect timeout.
    lsock = socket.socket()
    fillers = []
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)
        p = proxy(f"127.0.0.1:{port}", connect_timeout=0.3)
        t0 = time.monotonic()
        head = curl(p.url + "/", "-D", "-").stdout.decode().lower()
        assert head.startswith("http/2 504"), head
        assert "l5d-proxy-error: connect timed out" in head
        assert time.monotonic() - t0 < 5
    finally:
        for s in fillers:
            s.close()
        lsock.close()


@pytest.mark.parametrize("kind,status", [("http1", "502"), ("silent", "504")])
def test_upstream_that_is_not_http2(proxy, kind, status):
    """An HTTP/1 server answers the preface with an error and closes; a silent
    one never sends SETTINGS: the first is a 502, the second a 504 after the
    connect timeout."""

    def handler(conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            conn.recv(1024)
            if kind == "http1":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            else:
                conn.recv(1024)
        except OSError:
            pass

    server = ThreadedServer(handler)
    try:
        p = proxy(f"127.0.0.1:{server.port}", connect_timeout=0.5)
        t0 = time.monotonic()
        head = curl(p.url + "/", "-D", "-").stdout.decode().lower()
        assert head.startswith(f"http/2 {status}") and "l5d-proxy-error" in head, head
        assert time.monotonic() - t0 < 4
    finally:
        server.close()


def test_response_timeout_is_504_and_cancels_upstream(upstream, proxy):
    p = proxy(f"127.0.0.1:{upstream.port}", response_timeout=0.3)
    path = f"/delay/3000?{time.monotonic()}"
    t0 = time.monotonic()
    head = curl(p.url + path, "-D", "-").stdout.decode().lower()
    assert head.startswith("http/2 504"), head
    assert "l5d-proxy-error: response timeout" in head
    assert time.monotonic() - t0 < 2.5
    deadline = time.monotonic() + 5
    while [path, 8] not in upstream_stats(upstream)["resets"]:  # CANCEL
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ---------------------------------------------------------------- gRPC


SERVICE = "meshproxy.test.Echo"


@pytest.fixture(scope="module")
def grpc_server():
    def unary(request: bytes, context) -> bytes:
        return request[::-1]

    def server_stream(request: bytes, context):
        for i in range(int(request)):
            yield str(i).encode() * 1000

    def client_stream(requests, context) -> bytes:
        return b"|".join(requests)

    def bidi(requests, context):
        for r in requests:
            yield r.upper()

    def fail(request: bytes, context) -> bytes:
        context.abort(grpc.StatusCode.UNAVAILABLE, "upstream says no")

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(5)


def grpc_channel(p):
    return grpc.insecure_channel(f"127.0.0.1:{p.port}", options=[("grpc.enable_http_proxy", 0)])


def test_grpc_all_four_kinds_and_failure_status(grpc_server, proxy):
    p = proxy(grpc_server)
    with grpc_channel(p) as channel:
        assert channel.unary_unary(f"/{SERVICE}/Unary")(b"abc", timeout=10) == b"cba"
        assert list(channel.unary_stream(f"/{SERVICE}/ServerStream")(b"50", timeout=10)) == [str(i).encode() * 1000 for i in range(50)]
        assert channel.stream_unary(f"/{SERVICE}/ClientStream")(iter([b"a", b"b" * 100000, b"c"]), timeout=10) == b"a|" + b"b" * 100000 + b"|c"
        assert list(channel.stream_stream(f"/{SERVICE}/Bidi")(iter([b"x", b"y" * 70000, b"z"]), timeout=10)) == [b"X", b"Y" * 70000, b"Z"]
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(f"/{SERVICE}/Fail")(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "upstream says no"
    assert p.metric("response_total", grpc_status="0", classification="success") == 4
    assert p.metric("response_total", grpc_status="14", classification="failure") == 1


def test_grpc_refused_upstream_is_unavailable_trailers_only(proxy):
    p = proxy(f"127.0.0.1:{free_port()}")
    with grpc_channel(p) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(f"/{SERVICE}/Unary")(b"abc", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    trailing = dict(info.value.trailing_metadata() or ())
    assert "l5d-proxy-error" in trailing, trailing
    assert p.metric("response_total", status_code="200", grpc_status="14", classification="failure") == 1
    assert p.metric("outbound_http_errors_total", error="i/o") == 1


# ---------------------------------------------------------------- flow control


def test_one_stalled_reader_among_100_streams(nghttpd, proxy):
    p = proxy(nghttpd)
    client = RawClient(p.port, connection_window=1 << 30)
    try:
        rss_before = p.rss()
        sids = [client.request(f"/1m?{i}") for i in range(100)]
        stalled = frozenset(sids[37:38])
        others = set(sids) - stalled
        t0 = time.monotonic()
        client.pump(lambda: others <= client.ended, 60, stalled)
        elapsed = time.monotonic() - t0
        time.sleep(0.3)  # whatever the proxy still buffers for the stalled stream is in by now
        rss_after = p.rss()
        assert all(client.bodies[s] == MiB for s in others)
        stuck = next(iter(stalled))
        assert stuck not in client.ended and client.bodies[stuck] <= 65535
        print(f"\n{type(p).__name__}: 99 x 1 MiB in {elapsed:.2f}s beside one stalled stream; "
              f"proxy RSS {rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB")
        assert rss_after - rss_before < 48 * MiB
        # The stalled stream resumes once it is read.
        client.conn.acknowledge_received_data(client.bodies[stuck], stuck)
        client.flush()
        client.pump(lambda: stuck in client.ended, 30)
        assert client.bodies[stuck] == MiB
    finally:
        client.close()


def test_stalled_upstream_reader_stalls_only_its_own_upload(upstream, proxy):
    p = proxy(f"127.0.0.1:{upstream.port}")
    client = RawClient(p.port)
    try:
        stalled_before = upstream_stats(upstream)["stalled_bytes"][0]
        rss_before = p.rss()
        stuck = client.post("/stall-read", os.urandom(8 * MiB))
        bodies = [os.urandom(MiB) for _ in range(3)]
        echoes = [client.post("/echo", body) for body in bodies]
        client.pump(lambda: set(echoes) <= client.ended, 30)
        assert [client.bodies[s] for s in echoes] == [MiB] * 3
        time.sleep(0.3)
        assert stuck not in client.ended and stuck in client.outgoing
        # The upstream got at most its stream window; the proxy holds at most its own.
        assert upstream_stats(upstream)["stalled_bytes"][0] - stalled_before <= 65535
        assert len(client.outgoing[stuck]) >= 8 * MiB - 2 * 65535
        assert p.rss() - rss_before < 32 * MiB
    finally:
        client.close()


# ---------------------------------------------------------------- upstream failures


def test_upstream_dying_before_and_after_the_response_head(upstream, proxy):
    p = proxy(f"127.0.0.1:{upstream.port}")
    head = curl(p.url + "/die", "-D", "-").stdout.decode().lower()
    assert head.startswith("http/2 502") and "l5d-proxy-error" in head, head
    out = run(["nghttp", "-v", p.url + "/die-after-headers"])
    assert "error_code=INTERNAL_ERROR" in out.stdout.decode(), out.stdout
    assert conn_numbers(curl(p.url + "/conn").stdout.decode())  # a fresh upstream connection
    assert p.metric("response_total", status_code="502") == 1
    assert p.metric("response_total", status_code="200", error="unclassified") == 1


# ---------------------------------------------------------------- drain


def test_drain_sends_goaway_and_finishes_in_flight(upstream, proxy):
    p = proxy(f"127.0.0.1:{upstream.port}")
    nghttp = subprocess.Popen(["nghttp", "-v", p.url + "/delay/800"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        p.drain(timeout=10)
        assert 0.3 < time.monotonic() - t0 < 5
        out, _ = nghttp.communicate(timeout=10)
    finally:
        if nghttp.poll() is None:
            nghttp.kill()
            nghttp.wait(5)
    text = out.decode()
    assert "recv GOAWAY" in text and ":status: 200" in text, text
    assert nghttp.returncode == 0
