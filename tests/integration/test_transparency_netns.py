"""Transparency, "pods in network namespaces": two meshed pods joined by a veth pair.

    ns "client" (pod 1)                              ns "server" (pod 2)
    client.py --connect--> 10.x.y.2:8080             server.py listening on 10.x.y.2:8080
        | OUTPUT: redirect-all-outgoing                   ^ inbound proxy dials orig dst
        v                                                 | (uid 2102: not redirected)
    outbound proxy 127.0.0.1:4140 --veth--> PREROUTING: redirect-all-incoming
      (uid 2102: not redirected)                --> inbound proxy 0.0.0.0:4143

Each namespace gets the rules from ``python -m proxy iptables install`` and a
meshproxy running as uid 2102, exactly like a pod with linkerd-init and the proxy
container.  The app processes run as root (not 2102), so their traffic is
redirected.  Then 64 MiB of random bytes go each way at once and both ends compare
SHA-256 digests; the admin server must refuse /proxy-log-level to a caller from the
other namespace and accept it from 127.0.0.1.

Needs root, `ip netns`, iptables and setpriv; skipped otherwise.  Everything it
creates (namespaces, a veth pair, 10.x addresses inside those namespaces only,
processes) is removed in fixture teardown, whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

PROXY_UID = 2102  # Linkerd's proxy uid; the rules exempt it, so the proxy is not looped.
APP_PORT = 8080
ADMIN_PORT = 4191
PAYLOAD_BYTES = 64 * 2**20  # each way

# Bounds for every wait.  Generous for a loaded 2-core CI box, small enough that a
# hang fails the test well inside its 120 s budget.
COMMAND_TIMEOUT = 20.0  # one `ip`/iptables/helper invocation
READY_TIMEOUT = 20.0  # proxy /ready after start
TRANSFER_TIMEOUT = 60.0  # 64 MiB each way through two proxies
IO_TIMEOUT = 20.0  # a single socket operation inside the helpers
STOP_TIMEOUT = 10.0  # SIGTERM to exit, before SIGKILL


def _missing_prerequisite() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root to create network namespaces and install iptables rules"
    for tool in ("ip", "iptables", "setpriv"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found on PATH"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` does not work here: {exc}"
    return None


_SKIP_REASON = _missing_prerequisite()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or ""),
]


# --- helper programs (run with the same interpreter inside the namespaces) ------

PEER_SCRIPT = r"""
# peer.py server HOST PORT NBYTES READY_FILE | peer.py client HOST PORT NBYTES -
# Sends NBYTES random bytes and receives until EOF, at the same time; prints JSON.
import hashlib, json, os, socket, sys, threading

IO_TIMEOUT = float(os.environ["PEER_IO_TIMEOUT"])
CHUNK = 1 << 20


def send_all(sock, total, result):
    digest, sent = hashlib.sha256(), 0
    try:
        while sent < total:
            data = bytearray(os.urandom(min(CHUNK, total - sent)))
            if sent == 0:
                data[0] = 0  # never looks like TLS or HTTP: detection sees opaque TCP
            sock.sendall(data)
            digest.update(data)
            sent += len(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        result["send_error"] = repr(exc)
    result.update(sent=sent, sent_sha256=digest.hexdigest())


def receive_all(sock, result):
    digest, received, eof = hashlib.sha256(), 0, False
    try:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                eof = True
                break
            digest.update(data)
            received += len(data)
    except OSError as exc:  # includes socket.timeout
        result["recv_error"] = repr(exc)
    result.update(received=received, received_sha256=digest.hexdigest(), eof=eof)


def exchange(sock, total):
    sock.settimeout(IO_TIMEOUT)
    result = {}
    sender = threading.Thread(target=send_all, args=(sock, total, result), daemon=True)
    sender.start()
    receive_all(sock, result)
    sender.join(IO_TIMEOUT)
    if sender.is_alive():
        result["send_error"] = "sender still blocked"
    return result


mode, host, port, total, ready_file = sys.argv[1:6]
port, total = int(port), int(total)
if mode == "server":
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(16)
    listener.settimeout(float(os.environ["PEER_ACCEPT_TIMEOUT"]))
    with open(ready_file + ".tmp", "w") as f:
        f.write("listening\n")
    os.rename(ready_file + ".tmp", ready_file)
    conn, peer = listener.accept()
    local = conn.getsockname()
    result = exchange(conn, total)
    result["peer"], result["local"] = list(peer[:2]), list(local[:2])
    conn.close()
else:
    sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    local, peer = sock.getsockname(), sock.getpeername()  # before close: ENOTCONN after
    result = exchange(sock, total)
    result["peer"], result["local"] = list(peer[:2]), list(local[:2])
    sock.close()
print(json.dumps(result), flush=True)
"""

HTTP_SCRIPT = r"""
# httpreq.py METHOD URL [--body B] [--until STATUS --wait SECONDS]; prints JSON.
import argparse, http.client, json, time, urllib.parse

p = argparse.ArgumentParser()
p.add_argument("method")
p.add_argument("url")
p.add_argument("--body")
p.add_argument("--until", type=int)
p.add_argument("--wait", type=float, default=0.0)
p.add_argument("--timeout", type=float, default=5.0)
a = p.parse_args()
url = urllib.parse.urlsplit(a.url)
deadline = time.monotonic() + a.wait
while True:
    try:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=a.timeout)
        body = a.body.encode() if a.body is not None else None
        conn.request(a.method, url.path or "/", body=body)
        resp = conn.getresponse()
        out = {"status": resp.status, "body": resp.read().decode("utf-8", "replace")}
        conn.close()
    except OSError as exc:
        out = {"status": None, "error": repr(exc)}
    if a.until is None or out["status"] == a.until or time.monotonic() >= deadline:
        break
    time.sleep(0.1)
print(json.dumps(out), flush=True)
"""


# --- namespaces and processes ----------------------------------------------------


def _run(
    argv: Sequence[str],
    timeout: float = COMMAND_TIMEOUT,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run a command to completion (bounded); fail the test with its output if it fails."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=cwd,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        output = [
            o.decode(errors="replace") if isinstance(o, bytes) else o or ""
            for o in (exc.stdout, exc.stderr)
        ]
        pytest.fail(f"timed out after {timeout}s: {' '.join(argv)}\n" + "\n".join(output))
    if done.returncode != 0:
        pytest.fail(
            f"exit {done.returncode}: {' '.join(argv)}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return done.stdout


@dataclass
class Netns:
    """One network namespace: a pod."""

    name: str
    addr: str  # this pod's IP on the veth

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, timeout: float = COMMAND_TIMEOUT) -> str:
        return _run(self.argv(*argv), timeout=timeout, cwd=REPO, env=_env())


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINKERD2_", "MESHPROXY_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


@dataclass
class Processes:
    """Background processes started by the test, with their logs; all stopped in teardown."""

    logdir: Path
    running: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, label: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.logdir / f"{label}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: teardown signals it and its children
            )
        self.running.append((label, proc, log))
        return proc

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for label, proc, log in self.running:
            text = log.read_text(errors="replace") if log.exists() else ""
            state = "running" if proc.poll() is None else f"exited {proc.returncode}"
            parts.append(f"--- {label} ({state}) ---\n{text[-tail:]}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        for _, proc, _ in self.running:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for _, proc, _ in self.running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _delete_netns(name: str) -> None:
    # Anything still inside the namespace was started by this test; it must go
    # before the namespace (and with it the veth pair and the rules) can vanish.
    found = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10, check=False
    )
    for pid in found.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)


@pytest.fixture
def lone_netns() -> Iterator[Netns]:
    """A fresh, empty namespace for exercising the iptables CLI on real iptables."""
    ns = Netns(f"mp-ipt-{os.getpid() % 100000}{secrets.token_hex(2)}", "")
    _run(["ip", "netns", "add", ns.name])
    try:
        yield ns
    finally:
        _delete_netns(ns.name)


@dataclass
class Mesh:
    client: Netns
    server: Netns
    procs: Processes
    helpers: Path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("netns")
    helpers = workdir / "helpers"
    helpers.mkdir()
    (helpers / "peer.py").write_text(PEER_SCRIPT)
    (helpers / "httpreq.py").write_text(HTTP_SCRIPT)

    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    subnet = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
    client = Netns(f"mp-cli-{tag}", f"{subnet}.1")
    server = Netns(f"mp-srv-{tag}", f"{subnet}.2")
    veth_client, veth_server = f"mpv{tag[-6:]}c", f"mpv{tag[-6:]}s"  # <= 15 chars
    procs = Processes(workdir)
    created: list[str] = []
    try:
        for ns in (client, server):
            _run(["ip", "netns", "add", ns.name])
            created.append(ns.name)
        _run(
            ["ip", "link", "add", veth_client, "netns", client.name, "type", "veth",
             "peer", "name", veth_server, "netns", server.name]
        )  # fmt: skip
        for ns, dev in ((client, veth_client), (server, veth_server)):
            ns.run("ip", "link", "set", "lo", "up")
            ns.run("ip", "addr", "add", f"{ns.addr}/24", "dev", dev)
            ns.run("ip", "link", "set", dev, "up")

        # linkerd-init: the rules, from our own CLI.  The client pod also skips
        # outbound 4191 so the admin check below talks to the server's admin port
        # directly (a non-loopback peer) rather than through its own outbound proxy.
        ipv6 = "true" if shutil.which("ip6tables") else "false"
        base = [PYTHON, "-m", "proxy", "iptables", "install", "--proxy-uid", str(PROXY_UID),
                f"--ipv6={ipv6}"]  # fmt: skip
        client.run(*base, "--outbound-ports-to-ignore", f"4567,4568,{ADMIN_PORT}")
        server.run(*base)

        # The proxy containers.
        for ns, admin in ((client, "127.0.0.1"), (server, "0.0.0.0")):
            env = _env(
                {
                    "LINKERD2_PROXY_INBOUND_LISTEN_ADDR": "0.0.0.0:4143",
                    "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR": "127.0.0.1:4140",
                    "LINKERD2_PROXY_ADMIN_LISTEN_ADDR": f"{admin}:{ADMIN_PORT}",
                    "LINKERD2_PROXY_LOG": "warn,linkerd=info",
                    # No control plane and plain TCP between the pods in this suite.
                    "MESHPROXY_IDENTITY_DISABLED": "true",
                }
            )
            procs.start(
                f"proxy-{ns.name}",
                ns.argv(
                    "setpriv",
                    f"--reuid={PROXY_UID}",
                    f"--regid={PROXY_UID}",
                    "--clear-groups",
                    # /root is 0700 and the interpreter may live below it.
                    "--inh-caps=+dac_read_search",
                    "--ambient-caps=+dac_read_search",
                    PYTHON,
                    "-m",
                    "proxy",
                    "run",
                ),
                env,
            )
        for ns in (client, server):
            ready = http(ns, helpers, "GET", f"http://127.0.0.1:{ADMIN_PORT}/ready",
                         until=200, wait=READY_TIMEOUT)  # fmt: skip
            assert ready["status"] == 200, (
                f"proxy in {ns.name} not ready after {READY_TIMEOUT}s: {ready}\n{procs.logs()}"
            )
        yield Mesh(client, server, procs, helpers)
    finally:
        try:
            print(procs.logs())
            procs.stop_all()
        finally:
            for name in created:
                _delete_netns(name)


def http(
    ns: Netns,
    helpers: Path,
    method: str,
    url: str,
    body: str | None = None,
    until: int | None = None,
    wait: float = 0.0,
) -> dict[str, object]:
    argv = [PYTHON, str(helpers / "httpreq.py"), method, url]
    if body is not None:
        argv += ["--body", body]
    if until is not None:
        argv += ["--until", str(until), "--wait", str(wait)]
    out = ns.run(*argv, timeout=COMMAND_TIMEOUT + wait)
    return dict(json.loads(out))


def metric_samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of `name` in Prometheus text format."""
    samples = []
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{.*\}})?\s+(\S+)", line)
        if m:
            samples.append((m.group(1) or "", float(m.group(2))))
    return samples


def rule_packets(ns: Netns, chain: str, comment: str) -> int:
    """Packet counter of the proxy-init rule with this comment name."""
    listing = ns.run("iptables", "-t", "nat", "-S", chain, "-v")
    for line in listing.splitlines():
        if f"proxy-init/{comment}" in line:
            m = re.search(r" -c (\d+) (\d+)", line)
            assert m, line
            return int(m.group(1))
    raise AssertionError(f"no rule proxy-init/{comment} in {chain}:\n{listing}")


# --- the tests ------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_rules_installed_in_each_pod(mesh: Mesh) -> None:
    for ns in (mesh.client, mesh.server):
        listing = ns.run("iptables", "-t", "nat", "-S")
        assert (
            '-A PREROUTING -m comment --comment "proxy-init/install-proxy-init-prerouting" -j PROXY_INIT_REDIRECT'
            in listing
        )
        assert (
            '-A OUTPUT -m comment --comment "proxy-init/install-proxy-init-output" -j PROXY_INIT_OUTPUT'
            in listing
        )
        assert f"--uid-owner {PROXY_UID}" in listing
        assert "--to-ports 4143" in listing and "--to-ports 4140" in listing
    assert "--dports 4567,4568,4191" in mesh.client.run("iptables", "-t", "nat", "-S")


@pytest.mark.timeout(120)
def test_64mib_each_way_through_both_proxies(mesh: Mesh) -> None:
    client, server, procs = mesh.client, mesh.server, mesh.procs
    peer = str(mesh.helpers / "peer.py")
    ready_file = mesh.helpers / "server.ready"
    peer_env = _env(
        {"PEER_IO_TIMEOUT": str(IO_TIMEOUT), "PEER_ACCEPT_TIMEOUT": str(TRANSFER_TIMEOUT)}
    )

    server_proc = subprocess.Popen(
        server.argv(PYTHON, peer, "server", server.addr, str(APP_PORT), str(PAYLOAD_BYTES),
                    str(ready_file)),
        cwd=REPO, env=peer_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    client_proc: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not ready_file.exists():
            assert server_proc.poll() is None, server_proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "app server did not start listening"
            time.sleep(0.05)

        client_proc = subprocess.Popen(
            client.argv(PYTHON, peer, "client", server.addr, str(APP_PORT), str(PAYLOAD_BYTES), "-"),
            cwd=REPO, env=peer_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            c_out, c_err = client_proc.communicate(timeout=TRANSFER_TIMEOUT)
            s_out, s_err = server_proc.communicate(timeout=TRANSFER_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"transfer did not finish in {TRANSFER_TIMEOUT}s\n{procs.logs()}")
    finally:
        for proc in (server_proc, client_proc):
            if proc is not None and proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)

    assert client_proc.returncode == 0, f"client failed: {c_err.decode()}\n{procs.logs()}"
    assert server_proc.returncode == 0, f"server failed: {s_err.decode()}\n{procs.logs()}"
    c, s = json.loads(c_out), json.loads(s_out)
    context = f"client={c}\nserver={s}\n{procs.logs()}"

    # Every byte arrived, intact, both ways.
    assert c["sent"] == s["sent"] == PAYLOAD_BYTES, context
    assert s["received"] == PAYLOAD_BYTES, context
    assert c["received"] == PAYLOAD_BYTES, context
    assert s["received_sha256"] == c["sent_sha256"], context
    assert c["received_sha256"] == s["sent_sha256"], context
    # Half-close travels through both proxies: each side saw the other's FIN.
    assert s["eof"] and c["eof"], context

    # The app saw one connection to its own address, and it came from the inbound
    # proxy in its own pod (dialling podIP:port), not from the client pod directly.
    assert s["local"] == [server.addr, APP_PORT], context
    assert s["peer"][0] == server.addr, context
    # The client thinks it talked to the server's address.
    assert c["peer"] == [server.addr, APP_PORT], context

    # The rules did the redirecting, on both sides.
    assert rule_packets(client, "PROXY_INIT_OUTPUT", "redirect-all-outgoing-to-proxy-port") >= 1
    assert rule_packets(server, "PROXY_INIT_REDIRECT", "redirect-all-incoming-to-proxy-port") >= 1

    # Telemetry: the client pod's proxy counted an outbound TCP connection, and the
    # server pod's proxy an inbound one.
    for ns, direction in ((client, "outbound"), (server, "inbound")):
        metrics = http(ns, mesh.helpers, "GET", f"http://127.0.0.1:{ADMIN_PORT}/metrics")
        assert metrics["status"] == 200, metrics
        samples = metric_samples(str(metrics["body"]), "tcp_open_total")
        matching = [v for labels, v in samples if f'direction="{direction}"' in labels]
        assert matching and sum(matching) >= 1, (
            f'no tcp_open_total{{direction="{direction}"}} >= 1 in {ns.name}: {samples}'
        )


@pytest.mark.timeout(120)
def test_log_level_endpoint_is_localhost_only(mesh: Mesh) -> None:
    remote = f"http://{mesh.server.addr}:{ADMIN_PORT}/proxy-log-level"
    local = f"http://127.0.0.1:{ADMIN_PORT}/proxy-log-level"

    # From the other pod: refused, for reading and for writing.
    got = http(mesh.client, mesh.helpers, "GET", remote)
    assert got["status"] == 403, got
    got = http(mesh.client, mesh.helpers, "PUT", remote, body="trace")
    assert got["status"] == 403, got

    # From inside the server pod on loopback: allowed.
    got = http(mesh.server, mesh.helpers, "GET", local)
    assert got["status"] == 200, got
    level = str(got["body"]).strip()
    assert level, got
    # Writing back the same filter (so the proxy's verbosity does not change): 204.
    put = http(mesh.server, mesh.helpers, "PUT", local, body=level)
    assert put["status"] == 204, put
    again = http(mesh.server, mesh.helpers, "GET", local)
    assert again["status"] == 200 and str(again["body"]).strip() == level, again
    # The refused PUT above did not change anything.
    assert "trace" not in level


@pytest.mark.timeout(60)
def test_iptables_cli_install_twice_show_remove(lone_netns: Netns) -> None:
    ns = lone_netns
    families = ["iptables"] + (["ip6tables"] if shutil.which("ip6tables") else [])
    ipv6 = f"--ipv6={'true' if len(families) == 2 else 'false'}"
    cli = [PYTHON, "-m", "proxy", "iptables"]
    pristine = {f: ns.run(f, "-t", "nat", "-S") for f in families}

    ns.run(*cli, "install", ipv6, "--subnets-to-ignore", "10.99.0.0/16,fd00:99::/32")
    first = {f: ns.run(f, "-t", "nat", "-S") for f in families}
    # Installing again (here with another uid) replaces the rules instead of adding to them.
    ns.run(*cli, "install", ipv6, "--subnets-to-ignore", "10.99.0.0/16,fd00:99::/32",
           "--proxy-uid", "2103")  # fmt: skip
    second = {f: ns.run(f, "-t", "nat", "-S") for f in families}
    for f in families:
        assert first[f].count("\n") == second[f].count("\n"), (first[f], second[f])
        assert "--uid-owner 2103" in second[f] and "--uid-owner 2102" not in second[f]
        assert second[f].count("-j PROXY_INIT_REDIRECT") == 1
        assert second[f].count("-j PROXY_INIT_OUTPUT") == 1
    assert (
        '-s 10.99.0.0/16 -m comment --comment "proxy-init/ignore-subnet-10.99.0.0/16"'
        in second["iptables"]
    )
    assert "fd00:99::/32" not in second["iptables"]
    if "ip6tables" in second:
        assert "-s fd00:99::/32" in second["ip6tables"] and "10.99.0.0" not in second["ip6tables"]

    shown = ns.run(*cli, "show", ipv6).splitlines()
    assert "-N PROXY_INIT_REDIRECT" in shown and "-N PROXY_INIT_OUTPUT" in shown
    assert not any(line.startswith("-P ") for line in shown)

    ns.run(*cli, "remove", ipv6)
    assert {f: ns.run(f, "-t", "nat", "-S") for f in families} == pristine
    ns.run(*cli, "remove", ipv6)  # removing nothing is not an error
