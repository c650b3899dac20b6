"""HTTP/1.1 transparency: what real clients and servers see through the proxy (issue 3).

Every test runs on both twins (httptools fast path and the h11 twin) and on two
topologies:

* ``one``:  client -> proxy outbound -> server
* ``pair``: client -> proxy A outbound -> proxy B inbound -> server

Where a response can be fetched directly too, the bytes the client gets through
the proxy are compared with the bytes it gets from the server directly. The
upstream is ``tests/fakes/h1_upstream.py``: it writes fixed bytes and records the
exact request heads it receives, so what crossed the proxy can be checked on both
sides. Proxies are shared per module and twin where a test needs no fresh one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import httpx
import pytest

from tests.fakes.h1_upstream import H1Upstream, Reader, read_response
from tests.support import (
    Proxy,
    ThreadedServer,
    http_get,
    make_proxy,
    metric_value,
    recv_all,
    wait_until,
)

# one: a single proxy; pair: A's outbound -> B's inbound in plaintext; meshed: the same with
# identities, so the hop is mTLS and HTTP/1 crosses it as HTTP/2 (the orig-proto upgrade).
TOPOLOGIES = ("one", "pair", "meshed")
CURL_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


# ---------------------------------------------------------------- processes

_ISSUER: list = []


def meshed_env(name: str, target_port: int | None = None, transport_port: int = 0) -> dict[str, str]:
    """Identity files for ``name`` (one CA per test process) and, for a client, a discovery
    file that names the endpoint at ``target_port`` as meshed (opaque traffic to it goes to
    ``transport_port`` behind a transport header when that is set)."""
    from proxy.tls import ca
    from tests.integration.test_identity_mtls import TRUST_DOMAIN, write_identity

    if not _ISSUER:
        _ISSUER.append(ca.make_ca(TRUST_DOMAIN))
    directory = tempfile.mkdtemp(prefix="meshed-")
    env = write_identity(os.path.join(directory, "id"), _ISSUER[0], f"{name}.default.serviceaccount.identity.linkerd.cluster.local")
    if target_port is not None:
        discovery = os.path.join(directory, "discovery.toml")
        with open(discovery, "w") as f:
            f.write(f'[[services]]\nauthority = "server.default.svc.cluster.local"\nport = 80\n[[services.endpoints]]\n'
                    f'addr = "127.0.0.1:{target_port}"\nidentity = "server.default.serviceaccount.identity.linkerd.cluster.local"\n')
            if transport_port:
                f.write(f'protocol = "opaque"\nopaque_transport_port = {transport_port}\n')
        env["MESHPROXY_DISCOVERY_FILE"] = discovery
    return env



def start_all(*proxies: Proxy) -> None:
    """Start proxies side by side and wait (bounded) until every one is ready."""
    for p in proxies:
        p.start(wait_ready=False)
    try:
        for p in proxies:
            wait_until(lambda p=p: _ready(p), 20, what=f"proxy on {p.outbound} ready")
    except TimeoutError:
        logs = "\n".join(p.read_output() for p in proxies)
        stop_all(*proxies)
        raise AssertionError("proxy never became ready:\n" + logs) from None


def _ready(p: Proxy) -> bool:
    return http_get(p.admin_url + "/ready", timeout=1)[0] == 200


def stop_all(*proxies: Proxy) -> list[int | None]:
    """SIGTERM every proxy at once; an idle proxy drains in well under a second, so one that
    takes over 5 s is holding something (and is killed: the exit code says so)."""
    with concurrent.futures.ThreadPoolExecutor(len(proxies)) as pool:
        return list(pool.map(lambda p: p.stop(timeout=5), proxies))


@contextlib.contextmanager
def chain(pure: bool, topology: str, target: int, outer: dict[str, str] | None = None, inner: dict[str, str] | None = None):
    """Fresh proxies in front of 127.0.0.1:``target``; yields (entry port, [proxies], the proxy next to the server).

    ``one``: the entry is the outbound of a proxy whose fallback is the target;
    ``pair``: A's outbound falls back to B's inbound, B's inbound to the target.
    ``outer`` is extra env for the entry proxy, ``inner`` for B (pair only).
    """
    if topology == "one":
        p = make_proxy(pure=pure, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{target}", **(outer or {}))
        proxies = [p]
        entry, last = p.outbound, p
    else:
        meshed = topology == "meshed"
        b = make_proxy(pure=pure, MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{target}",
                       **(meshed_env("server") if meshed else {}), **(inner or {}))
        a = make_proxy(pure=pure, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{b.inbound}",
                       **(meshed_env("client", b.inbound) if meshed else {}), **(outer or {}))
        proxies = [a, b]
        entry, last = a.outbound, b
    start_all(*proxies)
    try:
        yield entry, proxies, last
    finally:
        codes = stop_all(*proxies)
        assert codes == [0] * len(proxies), "a proxy did not exit cleanly:\n" + "\n".join(p.read_output() for p in proxies)


class World:
    """One upstream and two proxies shared by a module's tests for one twin.

    ``b`` falls back to the upstream on both listeners; ``a``'s outbound falls
    back to ``b``'s inbound. "one" enters at ``b.outbound``, "pair" at ``a.outbound``.
    "meshed" enters at ``c.outbound``: ``c`` and ``d`` have identities and ``c``'s
    outbound falls back to ``d``'s inbound, a meshed endpoint, and ``d`` to the upstream.
    """

    def __init__(self, pure: bool) -> None:
        self.up = H1Upstream()
        target = f"127.0.0.1:{self.up.port}"
        self.b = make_proxy(pure=pure, MESHPROXY_OUTBOUND_FALLBACK_ADDR=target, MESHPROXY_INBOUND_FALLBACK_ADDR=target)
        self.a = make_proxy(pure=pure, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{self.b.inbound}")
        self.d = make_proxy(pure=pure, MESHPROXY_INBOUND_FALLBACK_ADDR=target, **meshed_env("server"))
        self.c = make_proxy(pure=pure, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{self.d.inbound}",
                            **meshed_env("client", self.d.inbound))
        try:
            start_all(self.a, self.b, self.c, self.d)
        except BaseException:
            self.up.close()
            raise

    def entry(self, topology: str) -> int:
        return {"one": self.b.outbound, "pair": self.a.outbound, "meshed": self.c.outbound}[topology]

    def seen(self, token: str) -> list:
        return [r for r in list(self.up.requests) if token.encode() in r.target]

    def close(self) -> list[int | None]:
        try:
            return stop_all(self.a, self.b, self.c, self.d)
        finally:
            self.up.close()


@pytest.fixture(scope="module")
def worlds():
    made: dict[bool, World] = {}
    yield made
    for w in made.values():
        w.close()


@pytest.fixture
def world(twin, worlds) -> World:
    if twin not in worlds:
        worlds[twin] = World(twin)
    w = worlds[twin]
    for p in (w.a, w.b, w.c, w.d):
        assert p.proc.poll() is None, "a shared proxy died:\n" + p.read_output()
    return w


@pytest.fixture(params=TOPOLOGIES)
def topology(request) -> str:
    return request.param


def token() -> str:
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------- clients


def curl(*args: str, timeout: float = 30) -> bytes:
    proc = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", str(int(timeout) - 5), *args],
        capture_output=True, timeout=timeout, env=CURL_ENV,
    )
    assert proc.returncode == 0, f"curl {args} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
    return proc.stdout


def raw_exchange(port: int, data: bytes, methods: list[bytes], timeout: float = 10) -> list:
    """Send ``data`` on a fresh connection and read one response per method, in order."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        reader = Reader(s)
        return [read_response(reader, m) for m in methods]


def names(headers) -> set[bytes]:
    return {n.lower() for n, _ in headers}


# ---------------------------------------------------------------- curl


def test_curl_keep_alive_uses_one_connection(world, topology):
    t = token()
    direct = f"http://127.0.0.1:{world.up.port}"
    proxied = f"http://127.0.0.1:{world.entry(topology)}"
    args = ["-i", "-w", "[connects=%{num_connects}]\n"]
    want = curl(*args, f"{direct}/ka/1?t=d{t}", f"{direct}/ka/2?t=d{t}")
    got = curl(*args, f"{proxied}/ka/1?t=d{t}", f"{proxied}/ka/2?t=d{t}")  # same targets: same bytes back
    assert got == want
    assert got.count(b"[connects=1]") == 1 and got.count(b"[connects=0]") == 1  # curl reused its connection
    proxied_seen = world.seen(f"d{t}")[2:]
    assert [r.target for r in proxied_seen] == [f"/ka/1?t=d{t}".encode(), f"/ka/2?t=d{t}".encode()]
    # The proxy's pool kept its upstream connection too: both requests came on one.
    assert proxied_seen[0].conn == proxied_seen[1].conn


def test_curl_chunked_upload_arrives_exact(world, topology, tmp_path):
    t = token()
    body = os.urandom(3 << 20)
    path = tmp_path / "upload.bin"
    path.write_bytes(body)
    args = ["-i", "-H", "Transfer-Encoding: chunked", "-H", "Expect:", "--data-binary", f"@{path}"]
    want = curl(*args, f"http://127.0.0.1:{world.up.port}/hash?t={t}")
    got = curl(*args, f"http://127.0.0.1:{world.entry(topology)}/hash?t={t}")
    assert got == want
    assert f"sha256={hashlib.sha256(body).hexdigest()} len={len(body)} framing=chunked".encode() in got
    direct, proxied = world.seen(t)
    assert proxied.framing == "chunked" and proxied.body_sha256 == direct.body_sha256


def test_curl_expect_100_continue(world, topology, tmp_path):
    t = token()
    body = os.urandom(2 << 20)
    path = tmp_path / "upload.bin"
    path.write_bytes(body)
    # curl waits this long for the 100 before sending anyway: a lost 100 shows as a slow upload.
    args = ["-i", "-H", "Expect: 100-continue", "--expect100-timeout", "4", "--data-binary", f"@{path}"]
    want = curl(*args, f"http://127.0.0.1:{world.up.port}/hash?t={t}")
    started = time.monotonic()
    got = curl(*args, f"http://127.0.0.1:{world.entry(topology)}/hash?t={t}")
    elapsed = time.monotonic() - started
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert got == want
    assert f"sha256={hashlib.sha256(body).hexdigest()} len={len(body)}".encode() in got
    assert elapsed < 3, f"upload took {elapsed:.1f}s: the 100 Continue did not come through"
    proxied = world.seen(t)[1]
    assert proxied.get(b"expect").lower() == b"100-continue"


def test_curl_large_download_matches(world, topology, tmp_path):
    t = token()
    blob_file = tmp_path / "blob.bin"
    blob_file.write_bytes(world.up.blob)
    heads = {}
    for name, port in (("direct", world.up.port), ("proxied", world.entry(topology))):
        out = tmp_path / f"{name}.bin"
        hdr = tmp_path / f"{name}.hdr"
        curl("-D", str(hdr), "-o", str(out), f"http://127.0.0.1:{port}/big?t={t}")
        heads[name] = hdr.read_bytes()
        assert out.stat().st_size == blob_file.stat().st_size
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob_file.read_bytes()).digest()
    assert heads["proxied"] == heads["direct"]
    assert b"Content-Length: %d\r\n" % len(world.up.blob) in heads["proxied"]


def test_head_has_length_and_no_body(world, topology):
    t = token()
    want = curl("-I", f"http://127.0.0.1:{world.up.port}/big?t={t}")
    got = curl("-I", f"http://127.0.0.1:{world.entry(topology)}/big?t={t}")
    assert got == want
    assert b"Content-Length: %d\r\n" % len(world.up.blob) in got
    # On a raw connection: nothing follows the HEAD response's head, and the connection carries on.
    request = f"HEAD /big?t={t} HTTP/1.1\r\nHost: x\r\n\r\nGET /after-head?t={t} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    direct = raw_exchange(world.up.port, request, [b"HEAD", b"GET"])
    proxied = raw_exchange(world.entry(topology), request, [b"HEAD", b"GET"])
    assert [r.message() for r in proxied] == [r.message() for r in direct]
    assert proxied[0].body == b"" and proxied[1].body == f"GET /after-head?t={t}\n".encode()


def test_204_and_304_have_no_body(world, topology):
    t = token()
    urls = [f"/status/204?t={t}", f"/status/304?t={t}", f"/status/200?t={t}"]
    args = ["-i", "-w", "[connects=%{num_connects}]\n"]
    want = curl(*args, *(f"http://127.0.0.1:{world.up.port}{u}" for u in urls))
    got = curl(*args, *(f"http://127.0.0.1:{world.entry(topology)}{u}" for u in urls))
    assert got == want
    assert got.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert got.count(b"[connects=1]") == 1 and got.count(b"[connects=0]") == 2
    request = b"".join(f"GET {u} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for u in urls)
    direct = raw_exchange(world.up.port, request, [b"GET"] * 3)
    proxied = raw_exchange(world.entry(topology), request, [b"GET"] * 3)
    assert [r.message() for r in proxied] == [r.message() for r in direct]
    assert [r.status for r in proxied] == [204, 304, 200]
    assert proxied[0].body == proxied[1].body == b""
    assert b"content-length" not in names(proxied[0].headers) and b"transfer-encoding" not in names(proxied[0].headers)


# ---------------------------------------------------------------- httpx


def test_httpx_matches_direct(world, topology):
    t = token()
    upload = os.urandom(300_000)

    def gen():
        for off in range(0, len(upload), 40_000):
            yield upload[off:off + 40_000]

    # Framing headers may legitimately differ between hops; everything else must not.
    framing = {b"connection", b"keep-alive", b"transfer-encoding"}

    def run(port: int) -> list:
        out = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as c:
            for method, url, kwargs in (
                ("GET", f"/plain?t={t}", {}),
                ("GET", f"/chunked/300000?t={t}", {}),
                ("GET", f"/close/200000?t={t}", {}),
                ("GET", f"/status/404?t={t}", {}),
                ("POST", f"/hash?t={t}", {"content": upload}),
                ("POST", f"/hash?t={t}", {"content": gen()}),
                ("PUT", f"/put?t={t}", {"content": b"x" * 10}),
            ):
                r = c.request(method, url, **kwargs)
                out.append((r.status_code, r.reason_phrase, [(n, v) for n, v in r.headers.raw if n.lower() not in framing], r.content))
        return out

    want = run(world.up.port)
    got = run(world.entry(topology))
    assert got == want
    assert got[1][3] == world.up.blob[:300000] and got[2][3] == world.up.blob[:200000]
    sha = hashlib.sha256(upload).hexdigest().encode()
    assert sha in got[4][3] and b"framing=length" in got[4][3]
    assert sha in got[5][3] and b"framing=chunked" in got[5][3]


# ---------------------------------------------------------------- headers and targets


def test_header_name_case_is_preserved_both_ways(world, topology):
    t = token()
    request = f"GET /case?t={t} HTTP/1.1\r\nHost: case.test\r\nX-MiXeD-Case: 1\r\nuser-AGENT: raw\r\n\r\n".encode()
    (resp,) = raw_exchange(world.entry(topology), request, [b"GET"])
    assert resp.status == 200
    assert b"\r\nX-Reply-CaSe: 2\r\n" in resp.raw
    (seen,) = world.seen(t)
    assert b"\r\nX-MiXeD-Case: 1\r\n" in seen.head
    assert b"\r\nuser-AGENT: raw\r\n" in seen.head
    assert b"\r\nHost: case.test\r\n" in seen.head


def test_hop_by_hop_headers_are_not_forwarded(world, topology):
    t = token()
    request = (
        f"GET /hop?t={t} HTTP/1.1\r\nHost: x\r\nConnection: X-Drop, keep-alive\r\nX-Drop: 1\r\n"
        "Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Keep: yes\r\n\r\n"
    ).encode()
    (resp,) = raw_exchange(world.entry(topology), request, [b"GET"])
    (seen,) = world.seen(t)
    got = names(seen.headers)
    assert not got & {b"connection", b"x-drop", b"keep-alive", b"proxy-connection"}, seen.head
    assert {b"host", b"x-keep"} <= got
    # The server's own hop-by-hop headers stop at the proxy too.
    assert resp.status == 200 and resp.body == b"hop\n"
    assert not names(resp.headers) & {b"x-srv-drop", b"keep-alive"}, resp.raw
    assert resp.get(b"x-srv-keep") == b"yes"
    assert (resp.get(b"connection") or b"").lower() in (b"", b"keep-alive")


def test_absolute_form_target_reaches_the_server(world, topology):
    t = token()
    target = f"http://127.0.0.1:{world.up.port}/abs/path?t={t}&x=1"
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{world.up.port}\r\n\r\n".encode()
    (want,) = raw_exchange(world.up.port, request, [b"GET"])
    (got,) = raw_exchange(world.entry(topology), request, [b"GET"])
    assert got.message() == want.message()
    direct, proxied = world.seen(t)
    # Linkerd keeps absolute-form end to end (hyper's WasAbsoluteForm; "absolute-form" in l5d-orig-proto).
    assert proxied.method == b"GET" and proxied.target == target.encode()
    assert proxied.get(b"host") == f"127.0.0.1:{world.up.port}".encode()


def test_pipelined_requests_are_answered_in_order(world, topology):
    t = token()
    body = b"pipelined body"
    request = (
        f"GET /p/1?t={t} HTTP/1.1\r\nHost: x\r\n\r\n"
        f"POST /hash?t={t} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body.decode()}"
        f"HEAD /big?t={t} HTTP/1.1\r\nHost: x\r\n\r\n"
        f"GET /status/204?t={t} HTTP/1.1\r\nHost: x\r\n\r\n"
        f"GET /chunked/70000?t={t} HTTP/1.1\r\nHost: x\r\n\r\n"
        f"GET /p/6?t={t} HTTP/1.1\r\nHost: x\r\n\r\n"
    ).encode()
    methods = [b"GET", b"POST", b"HEAD", b"GET", b"GET", b"GET"]
    direct = raw_exchange(world.up.port, request, methods)
    proxied = raw_exchange(world.entry(topology), request, methods)
    assert [r.message() for r in proxied] == [r.message() for r in direct]
    assert [r.status for r in proxied] == [200, 200, 200, 204, 200, 200]
    assert proxied[0].body == f"GET /p/1?t={t}\n".encode() and proxied[5].body == f"GET /p/6?t={t}\n".encode()
    assert [r.target.split(b"?")[0] for r in world.seen(t)[6:]] == [b"/p/1", b"/hash", b"/big", b"/status/204", b"/chunked/70000", b"/p/6"]


# ---------------------------------------------------------------- protocol switches


def test_connect_tunnel_carries_bytes_both_ways(world, topology):
    t = token()
    payload = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", world.entry(topology)), timeout=10) as s:
        s.sendall(f"CONNECT tunnel-{t}.test:443 HTTP/1.1\r\nHost: tunnel-{t}.test:443\r\n\r\n".encode())
        reader = Reader(s)
        resp = read_response(reader, b"CONNECT")
        assert resp.raw == b"HTTP/1.1 200 Connection established\r\n\r\n"
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        echoed = reader.exact(len(payload))
        sender.join(10)
        s.shutdown(socket.SHUT_WR)
        assert reader.to_eof() == b""  # the server's FIN comes back through the tunnel
    assert echoed == payload
    (seen,) = world.seen(t)
    assert seen.method == b"CONNECT" and seen.target == f"tunnel-{t}.test:443".encode()


@pytest.fixture
def ws_server():
    websockets_server = pytest.importorskip("websockets.sync.server")
    heads = []

    def echo(ws):
        heads.append(ws.request.headers)
        for message in ws:
            ws.send(message)

    server = websockets_server.serve(echo, "127.0.0.1", 0, compression=None, max_size=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.heads = heads
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(10)


def test_websocket_echo(twin, topology, ws_server):
    from websockets.sync.client import connect

    port = ws_server.socket.getsockname()[1]
    with chain(twin, topology, port) as (entry, _proxies, _last):
        with connect(f"ws://127.0.0.1:{entry}/echo", proxy=None, open_timeout=5, close_timeout=5,
                     compression=None, max_size=None, additional_headers={"X-Ws-CaSe": "1"}) as ws:
            assert ws.response.status_code == 101
            assert ws.response.headers["Upgrade"].lower() == "websocket"
            ws.send("hello through the mesh")
            assert ws.recv(timeout=5) == "hello through the mesh"
            big = os.urandom(1 << 20)
            ws.send(big)
            assert ws.recv(timeout=10) == big
            for i in range(50):
                ws.send(f"m{i}")
            assert [ws.recv(timeout=5) for _ in range(50)] == [f"m{i}" for i in range(50)]
            ws.ping(b"are you there").wait(5)
        assert ws.close_code == 1000
    (request_headers,) = ws_server.heads
    assert request_headers["Upgrade"].lower() == "websocket" and "upgrade" in request_headers["Connection"].lower()
    assert request_headers["X-Ws-CaSe"] == "1"


# ---------------------------------------------------------------- server speaks first

GREETING = b"J\x00\x00\x00\n8.0.36-meshproxy-fake\x00\x01\x00\x00\x00abcdefgh\x00"


@pytest.fixture
def mysqlish():
    """A server that writes a greeting on accept, then answers every read with OK + the bytes."""

    def handler(conn):
        conn.sendall(GREETING)
        while data := conn.recv(65536):
            conn.sendall(b"OK " + data)

    server = ThreadedServer(handler)
    yield server
    server.close()


def greet(port: int, timeout: float = 8) -> float:
    """Connect without sending; return how long the greeting took; then check an exchange."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        started = time.monotonic()
        got = b""
        while len(got) < len(GREETING):
            chunk = s.recv(4096)
            assert chunk, f"closed after {got!r}"
            got += chunk
        elapsed = time.monotonic() - started
        assert got == GREETING
        s.sendall(b"\x20\x00\x00\x01login-packet")
        assert recv_all(s, len(b"OK \x20\x00\x00\x01login-packet")) == b"OK \x20\x00\x00\x01login-packet"
    return elapsed


def test_server_speaks_first_on_an_opaque_port_greets_at_once(twin, topology, mysqlish):
    """Inbound opaque port: no detection at all. A non-redirected connection targets the proxy's own
    inbound address, so that port is the one listed as opaque."""
    if topology == "one":
        p = make_proxy(pure=twin, MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{mysqlish.port}")
        p.env["LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION"] = str(p.inbound)
        proxies, entry = [p], p.inbound
    elif topology == "pair":
        b = make_proxy(pure=twin, MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{mysqlish.port}")
        b.env["LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION"] = str(b.inbound)
        # The control plane marks a server-first port opaque for its clients too.
        a = make_proxy(pure=twin, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{b.inbound}",
                       MESHPROXY_OUTBOUND_PORTS_DISABLE_PROTOCOL_DETECTION=str(b.inbound))
        proxies, entry = [a, b], a.outbound
    else:
        # Meshed clients reach an opaque port through the peer's inbound port (ref 2.1, 3.7):
        # discovery marks the endpoint opaque with its transport port; the peer reads the
        # transport header after the mTLS handshake and connects to the port it names.
        b = make_proxy(pure=twin, **meshed_env("server"))
        a = make_proxy(pure=twin, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{mysqlish.port}",
                       **meshed_env("client", mysqlish.port, transport_port=b.inbound))
        proxies, entry = [a, b], a.outbound
    start_all(*proxies)
    try:
        elapsed = greet(entry)
        assert elapsed < 0.5, f"greeting took {elapsed:.2f}s on an opaque port"
        if topology == "meshed":
            server_id = "server.default.serviceaccount.identity.linkerd.cluster.local"
            client_id = "client.default.serviceaccount.identity.linkerd.cluster.local"
            assert metric_value(a.metrics(), "tcp_open_total", direction="outbound", peer="dst", tls="true", server_id=server_id) == 1
            assert metric_value(b.metrics(), "tcp_open_total", direction="inbound", peer="src", tls="true", client_id=client_id) == 1
    finally:
        assert stop_all(*proxies) == [0] * len(proxies)


def test_server_speaks_first_works_after_the_detect_timeout(twin, topology, mysqlish):
    """A detected port with a 1 s detect timeout: nothing comes from the client, so after 1 s the
    connection is forwarded as opaque TCP; the greeting arrives then and the exchange works."""
    outer = {"LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT": "1s", "MESHPROXY_OUTBOUND_PORTS_DISABLE_PROTOCOL_DETECTION": ""}
    inner = {"LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT": "1s"}
    with chain(twin, topology, mysqlish.port, outer=outer, inner=inner) as (entry, proxies, last):
        elapsed = greet(entry)
        assert 0.8 <= elapsed <= 5, f"greeting after {elapsed:.2f}s"
        text = proxies[0].metrics()
        assert metric_value(text, "outbound_tcp_detect_http_results_total", result="read_timeout") == 1
        if topology != "one":
            assert metric_value(last.metrics(), "inbound_tcp_detect_http_results_total", result="read_timeout") == 1
