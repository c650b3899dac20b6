"""The servers a run starts: backends (iperf3, nginx) and proxies (meshproxy, haproxy, nginx).

Every starter is a context manager yielding a ``Server``; the process is stopped by PID on
the way out, whatever happened inside. Configs and logs go to the run's temp directory.
The peer configs follow /work/shared/reference/peers-bench.md so the numbers can be set
beside the ones measured there.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import PortPool, Proc, wait_listening

# meshproxy imports and binds in well under a second; a slow shared machine gets 20 s.
READY_TIMEOUT_S = 20.0
# haproxy derives maxconn from RLIMIT_NOFILE, whose hard limit here is 20000; ask for less
# than half so it never refuses to start, and far more than any load here opens.
HAPROXY_MAXCONN = 8000
# Backend keep-alive: never the reason a connection closes during a run (as in peers-bench).
KEEPALIVE_REQUESTS = 10_000_000


@dataclass
class Env:
    """What starters need from the run: a temp dir, ports, pinning and the interpreter."""

    tmp: Path
    ports: PortPool
    python: str
    repo: Path
    proxy_cpus: str | None = None  # taskset list for single-threaded proxies
    load_cpus: str | None = None  # taskset list for backends and load generators


@dataclass
class Server:
    name: str
    ports: dict[str, int]
    procs: list[Proc] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def installed(tool: str) -> bool:
    return shutil.which(tool) is not None


@contextlib.contextmanager
def _started(proc: Proc, ports: list[int], timeout: float = 10.0) -> Iterator[Proc]:
    try:
        proc.start()
        wait_listening(proc, ports, timeout)
        yield proc
    finally:
        proc.stop()


def _dir(env: Env, name: str) -> Path:
    d = env.tmp / name
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------- backends


@contextlib.contextmanager
def iperf3_server(env: Env) -> Iterator[Server]:
    port = env.ports.take()
    d = _dir(env, f"iperf3-{port}")
    proc = Proc(
        "iperf3 -s",
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
        d / "log",
        cpus=env.load_cpus,
    )
    with _started(proc, [port]):
        yield Server("iperf3", {"iperf": port}, [proc])


NGINX_BACKEND = """\
# Backend as in peers-bench: 1 worker, `return 200 "ok"`, h1 and h2c (prior knowledge).
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests {keepalive};
    keepalive_timeout 75s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{h1};{extra_listen}
        location / {{ return 200 "ok"; }}
    }}
    server {{
        listen 127.0.0.1:{h2c} http2;
        http2_max_requests {keepalive};
        location / {{ return 200 "ok"; }}
    }}
}}
"""


def _nginx_proc(env: Env, d: Path, conf: str, name: str, cpus: str | None) -> Proc:
    path = d / "nginx.conf"
    path.write_text(conf)
    argv = ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(path)]
    return Proc(name, argv, d / "log", cpus=cpus)


@contextlib.contextmanager
def nginx_backend(env: Env, h1_ports: int = 1) -> Iterator[Server]:
    """``h1_ports`` > 1: the same h1 server also listens on that many ports in all, named
    ``ep0`` (= ``h1``) .. ``ep{n-1}``: many endpoints, one worker, equal cost per request."""
    h1, h2c = env.ports.take(), env.ports.take()
    extra = [env.ports.take() for _ in range(h1_ports - 1)]
    d = _dir(env, f"nginx-backend-{h1}")
    conf = NGINX_BACKEND.format(
        dir=d,
        h1=h1,
        h2c=h2c,
        keepalive=KEEPALIVE_REQUESTS,
        extra_listen="".join(f"\n        listen 127.0.0.1:{p};" for p in extra),
    )
    proc = _nginx_proc(env, d, conf, "nginx backend", env.load_cpus)
    ports = {"h1": h1, "h2c": h2c}
    if h1_ports > 1:
        ports.update({f"ep{i}": p for i, p in enumerate([h1, *extra])})
    with _started(proc, [h1, h2c, *extra]):
        yield Server("nginx backend", ports, [proc])


# --------------------------------------------------------------------------- peers


HAPROXY_HEAD = """\
global
    nbthread {threads}
    maxconn {maxconn}
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""

HAPROXY_TCP = """\
listen fwd
    mode tcp
    bind 127.0.0.1:{front}
    server s1 127.0.0.1:{upstream}
"""

# HTTP mode as in peers-bench: forwardfor, server-side connection reuse; an h2c front
# (`proto h2`) still talks HTTP/1.1 to the backend.
HAPROXY_HTTP = """\
listen fwd
    mode http
    option forwardfor
    http-reuse always
    bind 127.0.0.1:{front}{proto}
    server s1 127.0.0.1:{upstream}
"""


@contextlib.contextmanager
def haproxy(
    env: Env, upstream: int, mode: str = "tcp", front_proto: str = "h1", threads: int = 1
) -> Iterator[Server]:
    """``mode`` tcp|http; ``front_proto`` h1|h2 (http mode: h2c with prior knowledge)."""
    front = env.ports.take()
    d = _dir(env, f"haproxy-{front}")
    body = HAPROXY_TCP if mode == "tcp" else HAPROXY_HTTP
    proto = " proto h2" if front_proto == "h2" else ""
    cfg = HAPROXY_HEAD.format(threads=threads, maxconn=HAPROXY_MAXCONN) + body.format(
        front=front, upstream=upstream, proto=proto
    )
    (d / "haproxy.cfg").write_text(cfg)
    cpus = env.proxy_cpus if threads == 1 else None
    proc = Proc(
        f"haproxy {mode}", ["haproxy", "-db", "-f", str(d / "haproxy.cfg")], d / "log", cpus=cpus
    )
    with _started(proc, [front]):
        yield Server(f"haproxy {mode}", {"front": front}, [proc])


NGINX_PROXY = """\
# Reverse proxy as in peers-bench: 1 worker, HTTP/1.1 upstream with a keep-alive pool.
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests {keepalive};
    keepalive_timeout 75s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 128;
        keepalive_requests {keepalive};
    }}
    server {{
        listen 127.0.0.1:{front}{http2};
        http2_max_requests {keepalive};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_proxy(env: Env, upstream: int, front_proto: str = "h1") -> Iterator[Server]:
    front = env.ports.take()
    d = _dir(env, f"nginx-proxy-{front}")
    conf = NGINX_PROXY.format(
        dir=d,
        front=front,
        upstream=upstream,
        keepalive=KEEPALIVE_REQUESTS,
        http2=" http2" if front_proto == "h2" else "",
    )
    proc = _nginx_proc(env, d, conf, "nginx proxy", env.proxy_cpus)
    with _started(proc, [front]):
        yield Server("nginx proxy", {"front": front}, [proc])


# A TLS pair of haproxies: the same hops as the meshproxy mTLS pair (client side originates
# TLS 1.3 with a client certificate, server side terminates it), in C. A reference for what
# this machine can relay over TLS, with the pair's certificates (made by proxy.tls.ca).
HAPROXY_TLS_SERVER = """\
listen tls_in
    mode tcp
    bind 127.0.0.1:{front} ssl crt {crt} ca-file {ca} verify optional ssl-min-ver TLSv1.3
    server s1 127.0.0.1:{upstream}
"""

HAPROXY_TLS_CLIENT = """\
listen tls_out
    mode tcp
    bind 127.0.0.1:{front}
    server s1 127.0.0.1:{upstream} ssl crt {crt} ca-file {ca} verify required sni str({sni}) verifyhost {sni} ssl-min-ver TLSv1.3
"""


@contextlib.contextmanager
def haproxy_tls_pair(env: Env, upstream: int) -> Iterator[Server]:
    """Two single-threaded haproxies in a row (client -> TLS 1.3 -> server -> ``upstream``)."""
    ids = pair_identities(env)
    s_in, c_out = env.ports.take(), env.ports.take()
    d = _dir(env, f"haproxy-tls-pair-{c_out}")
    head = HAPROXY_HEAD.format(threads=1, maxconn=HAPROXY_MAXCONN)
    procs = []
    for role, body, front, up in (
        ("server", HAPROXY_TLS_SERVER, s_in, upstream),
        ("client", HAPROXY_TLS_CLIENT, c_out, s_in),
    ):
        idd = ids[role]
        crt = d / f"{role}.pem"  # haproxy wants the chain and the key in one file
        crt.write_text(
            Path(idd["MESHPROXY_IDENTITY_CERT_FILE"]).read_text()
            + Path(idd["MESHPROXY_IDENTITY_KEY_FILE"]).read_text()
        )
        ca = d / "roots.pem"
        ca.write_text(idd["LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS"])
        cfg = head + body.format(front=front, upstream=up, crt=crt, ca=ca, sni=PAIR_SERVER_ID)
        (d / f"{role}.cfg").write_text(cfg)
        procs.append(
            Proc(
                f"haproxy tls {role}",
                ["haproxy", "-db", "-f", str(d / f"{role}.cfg")],
                d / f"{role}.log",
                cpus=env.proxy_cpus,
            )
        )
    with _started(procs[0], [s_in]), _started(procs[1], [c_out]):
        yield Server("haproxy tls pair", {"front": c_out}, [procs[1], procs[0]])


# --------------------------------------------------------------------------- meshproxy


def meshproxy_env(
    out_port: int,
    in_port: int,
    admin_port: int,
    fallback: int,
    workers: int,
    pure: bool,
    repo: Path,
    opaque: bool = False,
) -> dict[str, str]:
    # Start from a clean slate: a LINKERD2_*/MESHPROXY_* variable in the caller's shell
    # must not change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINKERD2_", "MESHPROXY_"))}
    env.update(
        LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR=f"127.0.0.1:{out_port}",
        MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{fallback}",
        LINKERD2_PROXY_INBOUND_LISTEN_ADDR=f"127.0.0.1:{in_port}",
        LINKERD2_PROXY_ADMIN_LISTEN_ADDR=f"127.0.0.1:{admin_port}",
        LINKERD2_PROXY_CORES=str(workers),
        LINKERD2_PROXY_LOG="warn",
        # Plaintext between app and proxy and to the backend: no identity source here. (The
        # mTLS pair, meshproxy_pair(), drops this and gives each proxy a certificate.)
        MESHPROXY_IDENTITY_DISABLED="true",
        PYTHONPATH=os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p),
    )
    if pure:
        env["MESHPROXY_NO_EXTENSIONS"] = "1"
    if opaque:
        # The backend port is marked opaque (what a user does for a non-HTTP port): no
        # protocol detection, bytes relayed as they come. Without it an HTTP load is
        # detected as HTTP/1 and served by the HTTP stage.
        env["MESHPROXY_OUTBOUND_PORTS_DISABLE_PROTOCOL_DETECTION"] = str(fallback)
    return env


def http_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(proc: Proc, admin_port: int, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            tail = proc.log_tail()
            last = tail.splitlines()[-1] if tail else "(empty log)"
            rc = proc.popen.returncode if proc.popen else "?"
            raise RuntimeError(f"meshproxy exited with {rc} before ready: {last}\n{tail}")
        try:
            status, _ = http_get(admin_port, "/ready")
            if status == 200:
                return
            last = f"GET /ready -> {status}"
        except OSError as e:
            last = f"GET /ready: {e}"
        time.sleep(0.1)
    tail = proc.log_tail()
    lines = [ln for ln in tail.splitlines() if ln.strip() and "identity is disabled" not in ln]
    hint = f"; last log line: {lines[-1].strip()}" if lines else ""
    raise RuntimeError(f"meshproxy not ready after {timeout}s ({last}){hint}\n{tail}")


@contextlib.contextmanager
def meshproxy(
    env: Env,
    upstream: int,
    workers: int = 1,
    pure: bool = False,
    opaque: bool = False,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``python -m proxy run`` with its outbound listener forwarding to ``upstream``
    (the fallback used when a connection was not redirected by iptables); ``opaque``
    turns protocol detection off for that port; ``extra_env`` is added last."""
    out_port, in_port, admin = env.ports.take(), env.ports.take(), env.ports.take()
    d = _dir(env, f"meshproxy-{out_port}")
    penv = meshproxy_env(out_port, in_port, admin, upstream, workers, pure, env.repo, opaque)
    penv.update(extra_env or {})
    cpus = env.proxy_cpus if workers == 1 else None
    proc = Proc(
        f"meshproxy {workers}w",
        [env.python, "-m", "proxy", "run"],
        d / "log",
        env=penv,
        cwd=str(env.repo),
        cpus=cpus,
    )
    try:
        proc.start()
        wait_ready(proc, admin)
        yield Server(proc.name, {"front": out_port, "inbound": in_port, "admin": admin}, [proc])
    finally:
        proc.stop()


def meshproxy_counters(admin_port: int) -> dict[str, Any] | None:
    """Sums of a few Linkerd TCP counters from GET /metrics: a check that the load went
    through the proxy (connections accepted, connections closed on an error, bytes)."""
    try:
        status, body = http_get(admin_port, "/metrics", timeout=5.0)
    except OSError:
        return None
    if status != 200:
        return None
    out: dict[str, Any] = {
        "accepted": 0.0,
        "connected": 0.0,
        "closed_with_errno": 0.0,
        "bytes_from_clients": 0.0,
        "accepted_tls": 0.0,  # mTLS between proxies: connections terminated (inbound)
        "connected_tls": 0.0,  # ... and originated (outbound)
    }
    errnos: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        src = 'peer="src"' in series
        if series.startswith("tcp_open_total{"):
            out["accepted" if src else "connected"] += v
            if 'tls="true"' in series:
                out["accepted_tls" if src else "connected_tls"] += v
        elif series.startswith("tcp_close_total{") and 'errno=""' not in series:
            out["closed_with_errno"] += v
            m = re.search(r'errno="([^"]*)"', series)
            key = f"{'src' if src else 'dst'}:{m.group(1) if m else '?'}"
            errnos[key] = errnos.get(key, 0.0) + v
        elif series.startswith("tcp_read_bytes_total{") and src:
            out["bytes_from_clients"] += v
    out["errnos"] = errnos  # "src|dst:ERRNO" -> count (src = the client side)
    return out


# --------------------------------------------------------------------------- a pair


PAIR_CLIENT_ID = "client.bench.serviceaccount.identity.linkerd.cluster.local"
PAIR_SERVER_ID = "server.bench.serviceaccount.identity.linkerd.cluster.local"


def pair_identities(env: Env) -> dict[str, dict[str, str]]:
    """A CA for this run (``python -m proxy identity init``) and a leaf for each proxy of a
    pair (``identity issue``), made once per run; the file-identity variables of each."""
    base = env.tmp / "identity"
    out: dict[str, dict[str, str]] = {}
    penv = {k: v for k, v in os.environ.items() if not k.startswith(("LINKERD2_", "MESHPROXY_"))}
    penv["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(env.repo), os.environ.get("PYTHONPATH", "")) if p
    )
    cmds = [] if (base / "ca").is_dir() else [["init", "--dir", str(base / "ca")]]
    cmds += [
        ["issue", "--dir", str(base / "ca"), "--name", name, "--out", str(base / role)]
        for role, name in (("client", PAIR_CLIENT_ID), ("server", PAIR_SERVER_ID))
        if not (base / role / "cert.pem").is_file()
    ]
    for cmd in cmds:
        cp = subprocess.run(
            [env.python, "-m", "proxy", "identity", *cmd],
            capture_output=True,
            text=True,
            timeout=60,
            env=penv,
            cwd=str(env.repo),
        )
        if cp.returncode != 0:
            raise RuntimeError(
                f"meshproxy identity {cmd[0]} failed: {(cp.stderr or cp.stdout)[-300:]}"
            )
    for role, name in (("client", PAIR_CLIENT_ID), ("server", PAIR_SERVER_ID)):
        d = base / role
        out[role] = {
            "MESHPROXY_IDENTITY_CERT_FILE": str(d / "cert.pem"),
            "MESHPROXY_IDENTITY_KEY_FILE": str(d / "key.pem"),
            "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS": (d / "roots.pem").read_text(),
            "LINKERD2_PROXY_IDENTITY_LOCAL_NAME": name,
        }
    return out


@contextlib.contextmanager
def meshproxy_pair(
    env: Env, upstream: int, mtls: bool, opaque: bool = False, pure: bool = False
) -> Iterator[Server]:
    """Two single-worker meshproxies in a row, as between two pods: load -> client proxy's
    outbound -> server proxy's inbound -> ``upstream``.

    Plaintext: both with ``MESHPROXY_IDENTITY_DISABLED=true``, the client's fallback is the
    server's inbound port. mTLS: each proxy has a file identity from this run's CA, and the
    client's discovery file names the server's inbound address as an endpoint with the
    server's identity, so the client originates mTLS to it (SNI = that identity) and the
    server terminates it. ``opaque``: the client skips protocol detection for that port
    (the server still peeks the ClientHello and detects inside TLS: iperf3 speaks first).
    The Server's procs are [client, server]; ``admin`` is the client's admin port."""
    s_out, s_in, s_admin = env.ports.take(), env.ports.take(), env.ports.take()
    c_out, c_in, c_admin = env.ports.take(), env.ports.take(), env.ports.take()
    d = _dir(env, f"meshproxy-pair-{c_out}")
    ids = pair_identities(env) if mtls else None
    s_env = meshproxy_env(s_out, s_in, s_admin, upstream, 1, pure, env.repo)
    s_env["MESHPROXY_INBOUND_FALLBACK_ADDR"] = f"127.0.0.1:{upstream}"
    c_env = meshproxy_env(c_out, c_in, c_admin, s_in, 1, pure, env.repo, opaque)
    if ids is not None:
        del s_env["MESHPROXY_IDENTITY_DISABLED"], c_env["MESHPROXY_IDENTITY_DISABLED"]
        s_env.update(ids["server"])
        c_env.update(ids["client"])
        disco = d / "discovery.toml"
        disco.write_text(
            '[[services]]\nauthority = "server.bench.svc.cluster.local"\nport = 80\n'
            f'[[services.endpoints]]\naddr = "127.0.0.1:{s_in}"\nidentity = "{PAIR_SERVER_ID}"\n'
        )
        c_env["MESHPROXY_DISCOVERY_FILE"] = str(disco)
    kind = "mTLS" if mtls else "plaintext"
    server = Proc(
        f"meshproxy pair server ({kind})",
        [env.python, "-m", "proxy", "run"],
        d / "server.log",
        env=s_env,
        cwd=str(env.repo),
        cpus=env.proxy_cpus,
    )
    client = Proc(
        f"meshproxy pair client ({kind})",
        [env.python, "-m", "proxy", "run"],
        d / "client.log",
        env=c_env,
        cwd=str(env.repo),
        cpus=env.proxy_cpus,
    )
    try:
        server.start()
        client.start()
        wait_ready(server, s_admin)
        wait_ready(client, c_admin)
        yield Server(
            f"meshproxy pair {kind}",
            {"front": c_out, "admin": c_admin, "server_admin": s_admin, "server_inbound": s_in},
            [client, server],
        )
    finally:
        client.stop()
        server.stop()
