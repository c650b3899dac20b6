"""Identity sources against fakes that speak the real APIs over real gRPC, and
mTLS handshakes with the contexts they produce. Real crypto, real sockets."""

from __future__ import annotations

import asyncio
import os
import ssl
import time

import grpc
import pytest
import uvloop
from cryptography import x509

from proxy.config import parse
from proxy.control import protowire as pw
from proxy.control.grpc_client import GrpcChannel, GrpcError, StatusCode
from proxy.metrics.registry import Registry, render
from proxy.tls import ca, identity
from proxy.tls.credentials import Credentials, check_server_identity, peer_identity
from tests.fakes.identity_service import FakeIdentityService, make_identity_dir
from tests.fakes.spire_agent import FakeSpireAgent, svid_for

NAME = "web.default.serviceaccount.identity.linkerd.cluster.local"
OTHER = "api.default.serviceaccount.identity.linkerd.cluster.local"
SVC_NAME = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local"
SPIFFE_ID = "spiffe://root.linkerd.cluster.local/external-workload"


def run(coro, timeout: float):
    """Run ``coro`` on uvloop (the runtime's loop), bounded in time."""

    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro

    return uvloop.run(bounded())


class Installed:
    """The ``install`` callback: records (monotonic time, credentials)."""

    def __init__(self) -> None:
        self.items: list[tuple[float, Credentials]] = []
        self.changed = asyncio.Event()

    def __call__(self, creds: Credentials) -> None:
        self.items.append((time.monotonic(), creds))
        self.changed.set()

    async def wait_for(self, count: int) -> Credentials:
        while len(self.items) < count:
            self.changed.clear()
            await self.changed.wait()
        return self.items[count - 1][1]


async def start_source(source):
    installed = Installed()
    task = asyncio.create_task(source.run(installed))
    return installed, task


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


@pytest.fixture(scope="module")
def pki():
    root, root_key, issuer, issuer_key = ca.make_ca()
    return root, issuer, issuer_key


def creds_for(pki, name: str, **kw) -> Credentials:
    root, issuer, issuer_key = pki
    leaf, key = ca.issue_leaf(issuer, issuer_key, name, chain=[root], **kw)
    return Credentials.from_pem(name, ca.key_pem(key), ca.cert_pem(leaf) + ca.cert_pem(issuer), ca.cert_pem(root))


def identity_config(pki, tmp_path, port: int, **env):
    root, _, _ = pki
    os.makedirs(tmp_path / "identity", exist_ok=True)
    d = make_identity_dir(str(tmp_path / "identity"), NAME)
    token = tmp_path / "token"
    if not token.exists():
        token.write_text("service-account-token")
    base = {
        "LINKERD2_PROXY_IDENTITY_DIR": d,
        "LINKERD2_PROXY_IDENTITY_TOKEN_FILE": str(token),
        "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS": ca.cert_pem(root),
        "LINKERD2_PROXY_IDENTITY_LOCAL_NAME": NAME,
        "LINKERD2_PROXY_IDENTITY_SVC_ADDR": f"127.0.0.1:{port}",
        "LINKERD2_PROXY_IDENTITY_SVC_NAME": SVC_NAME,
    }
    base.update(env)
    return parse(base, cpus=1)


@pytest.fixture
def fake(pki):
    root, issuer, issuer_key = pki
    services: list[FakeIdentityService] = []

    def make(tls: bool, **kw) -> FakeIdentityService:
        service = FakeIdentityService(issuer, issuer_key, [root], skew_s=0, **kw)
        if tls:
            server = creds_for(pki, SVC_NAME)
            service.start(tls=(server.key_pem, server.chain_pem))
        else:
            service.start()
        services.append(service)
        return service

    yield make
    for service in services:
        service.stop()


# ---------------------------------------------------------------- Linkerd identity service

def test_linkerd_source_over_tls_without_alpn(pki, tmp_path, fake):
    service = fake(tls=True)
    config = identity_config(pki, tmp_path, service.port)
    # 127.0.0.1 would mean plaintext (Linkerd's loopback rule); force TLS to test it.
    source = identity.LinkerdIdentitySource(config, tls=True)

    async def scenario():
        installed, task = await start_source(source)
        creds = await installed.wait_for(1)
        await stop(task)
        return creds

    creds = run(scenario(), 15)
    assert creds.name == NAME and creds.sni == NAME
    creds.verify()
    leaf, issuer = x509.load_pem_x509_certificates(creds.chain_pem.encode())
    assert issuer == pki[1]
    assert service.calls[0].identity == NAME and service.calls[0].token == b"service-account-token"
    assert service.tls_alpn == [None]  # no ALPN negotiated, as with a real control plane
    assert service.tls_sni == [SVC_NAME]
    assert service.tls_peers == [None]  # no client certificate before the first one is issued


def test_linkerd_source_refuses_a_server_with_another_name(pki, tmp_path, fake):
    service = fake(tls=True)
    config = identity_config(pki, tmp_path, service.port, LINKERD2_PROXY_IDENTITY_SVC_NAME="linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local")
    source = identity.LinkerdIdentitySource(config, tls=True)
    with pytest.raises(GrpcError) as info:
        run(source.certify(), 10)
    assert info.value.code == StatusCode.UNAVAILABLE and "did not prove" in info.value.message
    assert service.calls == []


def test_linkerd_source_plaintext_on_loopback(pki, tmp_path, fake):
    service = fake(tls=False)
    config = identity_config(pki, tmp_path, service.port)
    source = identity.LinkerdIdentitySource(config)  # loopback address: plaintext
    creds, expiry = run(source.certify(), 10)
    assert creds.name == NAME
    assert abs(expiry - (time.time() + 86400)) < 5


def test_refresh_at_70_percent_of_a_20s_leaf(pki, tmp_path, fake):
    service = fake(tls=True, lifetime_s=20)
    config = identity_config(pki, tmp_path, service.port)
    registry = Registry()
    source = identity.LinkerdIdentitySource(config, tls=True, metrics=identity.IdentityMetrics(registry))

    async def scenario():
        installed, task = await start_source(source)
        await installed.wait_for(2)
        await stop(task)
        return installed.items

    items = run(scenario(), 25)
    (t1, first), (t2, second) = items[:2]
    lifetime = first.not_after - time.time() + (time.monotonic() - t1)  # ~20 s at issue time
    assert 17 < lifetime <= 21
    assert 0.6 * 20 - 1.5 < t2 - t1 < 0.7 * 20 + 1.5, t2 - t1
    assert second.leaf() != first.leaf() and second.not_after > first.not_after
    # The renewal connection presented the first certificate.
    assert service.tls_peers == [None, NAME]
    text = render(registry.snapshot())
    for prefix in ("control_", ""):
        assert f'{prefix}identity_cert_refreshes_total{{result="ok"}} 2' in text
        assert f"{prefix}identity_cert_expiration_timestamp_seconds {int(second.not_after)}" in text
        assert f"# TYPE {prefix}identity_cert_refresh_timestamp_seconds gauge" in text


def test_slow_identity_service_delays_the_first_certificate(pki, tmp_path, fake):
    service = fake(tls=False, delay_s=3)
    config = identity_config(pki, tmp_path, service.port)
    source = identity.LinkerdIdentitySource(config)

    async def scenario():
        start = time.monotonic()
        installed, task = await start_source(source)
        await asyncio.sleep(2.5)
        early = len(installed.items)
        await installed.wait_for(1)
        await stop(task)
        return early, installed.items[0][0] - start

    early, elapsed = run(scenario(), 15)
    assert early == 0
    assert 2.9 < elapsed < 5


def test_errors_are_retried_after_min_refresh(pki, tmp_path, fake):
    service = fake(tls=False)
    service.fail_with = grpc.StatusCode.UNAVAILABLE
    config = identity_config(pki, tmp_path, service.port, LINKERD2_PROXY_IDENTITY_MIN_REFRESH="1s")
    registry = Registry()
    source = identity.LinkerdIdentitySource(config, metrics=identity.IdentityMetrics(registry))

    async def scenario():
        installed, task = await start_source(source)
        await asyncio.sleep(0.5)
        assert installed.items == []
        service.fail_with = None
        await installed.wait_for(1)
        await stop(task)

    run(scenario(), 10)
    assert len(service.calls) >= 2
    text = render(registry.snapshot())
    assert 'control_identity_cert_refreshes_total{result="error"}' in text
    assert 'identity_cert_refreshes_total{result="ok"} 1' in text


def test_empty_token_is_an_error(pki, tmp_path, fake):
    service = fake(tls=False)
    config = identity_config(pki, tmp_path, service.port)
    (tmp_path / "token").write_text("")
    with pytest.raises(ValueError, match="empty"):
        run(identity.LinkerdIdentitySource(config).certify(), 5)
    assert service.calls == []


# ---------------------------------------------------------------- SPIRE

def test_spire_source_installs_and_rotates(pki, tmp_path):
    root, issuer, issuer_key = pki
    socket_path = str(tmp_path / "agent.sock")
    agent = FakeSpireAgent(socket_path)
    agent.push([svid_for(issuer, issuer_key, "spiffe://root.linkerd.cluster.local/someone-else", roots=[root]), svid_for(issuer, issuer_key, SPIFFE_ID, roots=[root])])
    agent.start()
    config = parse({
        "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS": f"unix://{socket_path}",
        "LINKERD2_PROXY_IDENTITY_SERVER_ID": SPIFFE_ID,
        "LINKERD2_PROXY_IDENTITY_SERVER_NAME": "external-workload.cluster.local",
        "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS": ca.cert_pem(root),
    }, cpus=1)
    source = identity.source_from_config(config)
    assert isinstance(source, identity.SpireSource) and source.socket_path == socket_path

    async def scenario():
        installed, task = await start_source(source)
        first = await installed.wait_for(1)
        await asyncio.to_thread(agent.push, [svid_for(issuer, issuer_key, SPIFFE_ID, roots=[root], lifetime_s=7200)])
        second = await installed.wait_for(2)
        await stop(task)
        return first, second

    try:
        first, second = run(scenario(), 15)
    finally:
        agent.stop()
    assert first.name == SPIFFE_ID and first.sni == "external-workload.cluster.local"
    assert second.leaf() != first.leaf() and second.not_after > first.not_after + 3000
    second.verify()
    assert agent.rejected == 0


def test_spire_source_ignores_other_ids_and_reconnects(pki, tmp_path):
    root, issuer, issuer_key = pki
    socket_path = str(tmp_path / "agent.sock")
    config = parse({
        "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS": f"unix:{socket_path}",
        "LINKERD2_PROXY_IDENTITY_SERVER_ID": SPIFFE_ID,
    }, cpus=1)  # no trust anchors: the SVID's bundle is used
    source = identity.SpireSource(config)
    agents: list[FakeSpireAgent] = []

    async def scenario():
        installed, task = await start_source(source)
        await asyncio.sleep(0.3)  # nothing listens yet: the source backs off and retries
        agent = FakeSpireAgent(socket_path)
        agents.append(agent)
        agent.push([svid_for(issuer, issuer_key, "spiffe://root.linkerd.cluster.local/other", roots=[root])])
        agent.start()
        while agent.calls < 1:  # the source reconnects by itself (bounded by run's timeout)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert installed.items == []  # no matching SVID
        await asyncio.to_thread(agent.push, [svid_for(issuer, issuer_key, SPIFFE_ID, roots=[root])])
        creds = await installed.wait_for(1)
        await stop(task)
        return creds

    try:
        creds = run(scenario(), 15)
    finally:
        for agent in agents:
            agent.stop()
    assert creds.name == SPIFFE_ID
    assert creds.roots_pem == ca.cert_pem(root)


# ---------------------------------------------------------------- files

def test_files_source_reloads_on_change(pki, tmp_path):
    root, issuer, issuer_key = pki
    out = str(tmp_path / "files")

    def issue(lifetime=3600):
        leaf, key = ca.issue_leaf(issuer, issuer_key, NAME, lifetime, chain=[root])
        ca.write_leaf(out, leaf, key, issuer, [root])
        return leaf

    first_leaf = issue()
    config = parse({
        "MESHPROXY_IDENTITY_CERT_FILE": os.path.join(out, "cert.pem"),
        "MESHPROXY_IDENTITY_KEY_FILE": os.path.join(out, "key.pem"),
        "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS": ca.cert_pem(root),
        "LINKERD2_PROXY_IDENTITY_LOCAL_NAME": NAME,
    }, cpus=1)
    source = identity.source_from_config(config)
    assert isinstance(source, identity.FilesSource)
    source.poll_interval = 0.05

    async def scenario():
        installed, task = await start_source(source)
        first = await installed.wait_for(1)
        second_leaf = issue(7200)
        second = await installed.wait_for(2)
        # A broken update keeps the old credentials.
        with open(os.path.join(out, "cert.pem"), "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        await asyncio.sleep(0.3)
        broken_kept = len(installed.items) == 2 and source.current == second
        third_leaf = issue(10800)
        third = await installed.wait_for(3)
        await stop(task)
        return first, second, second_leaf, broken_kept, third, third_leaf

    first, second, second_leaf, broken_kept, third, third_leaf = run(scenario(), 10)
    assert first.leaf() == first_leaf
    assert second.leaf() == second_leaf
    assert broken_kept
    assert third.leaf() == third_leaf


def test_files_source_roots_beside_the_certificate(pki, tmp_path):
    root, issuer, issuer_key = pki
    leaf, key = ca.issue_leaf(issuer, issuer_key, NAME, chain=[root])
    ca.write_leaf(str(tmp_path), leaf, key, issuer, [root])
    source = identity.FilesSource(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), "", "")
    creds = source.load()
    assert creds.name == NAME and creds.roots_pem == ca.cert_pem(root)


def test_source_from_config_precedence(pki, tmp_path):
    root, _, _ = pki
    common = {"LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS": ca.cert_pem(root), "LINKERD2_PROXY_IDENTITY_LOCAL_NAME": NAME}
    files = {"MESHPROXY_IDENTITY_CERT_FILE": "/c", "MESHPROXY_IDENTITY_KEY_FILE": "/k"}
    svc = {"LINKERD2_PROXY_IDENTITY_SVC_ADDR": "linkerd-identity-headless.linkerd.svc.cluster.local:8080", "LINKERD2_PROXY_IDENTITY_SVC_NAME": SVC_NAME}
    spire = {"LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS": "unix:///run/spire.sock", "LINKERD2_PROXY_IDENTITY_SERVER_ID": SPIFFE_ID}
    assert identity.source_from_config(parse(common, cpus=1)) is None
    assert isinstance(identity.source_from_config(parse({**common, **files}, cpus=1)), identity.FilesSource)
    assert isinstance(identity.source_from_config(parse({**common, **files, **svc}, cpus=1)), identity.LinkerdIdentitySource)
    assert isinstance(identity.source_from_config(parse({**common, **files, **svc, **spire}, cpus=1)), identity.SpireSource)


# ---------------------------------------------------------------- mTLS between two proxies' contexts

async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, sni: str):
    seen: dict[str, object] = {}

    async def handle(reader, writer):
        ssl_object = writer.get_extra_info("ssl_object")
        seen["client_id"] = peer_identity(ssl_object)
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=sni)
        ssl_object = writer.get_extra_info("ssl_object")
        seen["version"] = ssl_object.version()
        seen["server_id"] = peer_identity(ssl_object)
        seen["ssl_object"] = ssl_object
        seen["data"] = await reader.read()
        writer.close()
    finally:
        server.close()
    return seen


def test_mtls_handshake_between_two_leaves(pki):
    server, client = creds_for(pki, NAME), creds_for(pki, "spiffe://root.linkerd.cluster.local/external-workload")
    seen = run(_handshake(server.server_context(), client.client_context(), NAME), 10)
    assert seen["version"] == "TLSv1.3"
    assert seen["server_id"] == NAME and check_server_identity(seen["ssl_object"], NAME)
    assert not check_server_identity(seen["ssl_object"], OTHER)
    assert seen["client_id"] == "spiffe://root.linkerd.cluster.local/external-workload"
    assert seen["data"] == b"ok"


def test_client_without_certificate_is_accepted(pki):
    server = creds_for(pki, NAME)
    from proxy.tls.credentials import roots_client_context

    seen = run(_handshake(server.server_context(), roots_client_context(server.roots_pem), NAME), 10)
    assert seen["client_id"] is None and seen["server_id"] == NAME


def test_leaf_from_another_ca_is_refused(pki):
    server = creds_for(pki, NAME)
    root, _, issuer, issuer_key = ca.make_ca()
    stranger = creds_for((root, issuer, issuer_key), OTHER)
    with pytest.raises(ssl.SSLError):  # the client does not trust the stranger's chain
        run(_handshake(stranger.server_context(), server.client_context(), OTHER), 10)


def test_server_with_another_name_fails_the_identity_check(pki):
    # Same CA, wrong identity: the chain verifies, the name check refuses it.
    impostor, client = creds_for(pki, OTHER), creds_for(pki, NAME)
    seen = run(_handshake(impostor.server_context(), client.client_context(), NAME), 10)
    assert not check_server_identity(seen["ssl_object"], NAME)


def test_tls_12_is_refused(pki):
    server = creds_for(pki, NAME)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        run(_handshake(server.server_context(), old, NAME), 10)


# ---------------------------------------------------------------- gRPC client details

def test_grpc_errors_and_deadlines(pki, tmp_path, fake):
    service = fake(tls=False, delay_s=1.0)

    async def scenario():
        channel = GrpcChannel(f"127.0.0.1:{service.port}")
        try:
            with pytest.raises(GrpcError) as deadline:
                await channel.unary("/io.linkerd.proxy.identity.Identity/Certify", b"", timeout=0.2)
            with pytest.raises(GrpcError) as unimplemented:
                await channel.unary("/io.linkerd.proxy.identity.Identity/Nope", b"", timeout=5)
            service.delay_s = 0
            with pytest.raises(GrpcError) as bad_token:  # an empty request has no token
                await channel.unary("/io.linkerd.proxy.identity.Identity/Certify", b"", timeout=5)
        finally:
            await channel.close()
        closed = GrpcChannel(f"127.0.0.1:{_free_port()}")
        with pytest.raises(GrpcError) as refused:
            await closed.unary("/x/y", b"", timeout=5)
        return deadline.value, unimplemented.value, bad_token.value, refused.value

    deadline, unimplemented, bad_token, refused = run(scenario(), 15)
    assert deadline.code == StatusCode.DEADLINE_EXCEEDED
    assert unimplemented.code == StatusCode.UNIMPLEMENTED
    assert bad_token.code == StatusCode.UNAUTHENTICATED and bad_token.message == "token rejected"
    assert refused.code == StatusCode.UNAVAILABLE


def test_grpc_stream_messages_larger_than_the_windows(pki, tmp_path):
    # ~1.2 MB per message: beyond the 64 KiB default stream window and our 1 MiB
    # connection window, so flow control has to be given back as we go.
    root, issuer, issuer_key = pki
    socket_path = str(tmp_path / "agent.sock")
    agent = FakeSpireAgent(socket_path)
    svid = svid_for(issuer, issuer_key, SPIFFE_ID, roots=[root])
    agent.push([svid] * 800)
    agent.start()

    async def scenario():
        channel = GrpcChannel(f"unix://{socket_path}")
        sizes = []
        try:
            async with channel.server_stream(pw.FETCH_X509_SVID_METHOD, b"", metadata=pw.WORKLOAD_API_METADATA) as stream:
                async for raw in stream:
                    sizes.append(len(pw.X509SVIDResponse.decode(raw).svids))
                    if len(sizes) == 2:
                        break
                    await asyncio.to_thread(agent.push, [svid] * 801)
        finally:
            await channel.close()
        return sizes

    try:
        assert run(scenario(), 15) == [800, 801]
    finally:
        agent.stop()


def _free_port() -> int:
    from tests.support import free_port

    return free_port()


# ---------------------------------------------------------------- expiry warnings

def test_expiry_warnings_once_per_threshold(pki, monkeypatch):
    root, issuer, issuer_key = pki
    messages: list[tuple[str, str]] = []

    class Recorder:
        def warning(self, event, **kw):
            messages.append(("warning", event))

        def error(self, event, **kw):
            messages.append(("error", event))

        def info(self, event, **kw):
            pass

    monkeypatch.setattr(identity, "log", Recorder())
    creds = creds_for(pki, NAME, lifetime_s=20 * 86400)
    day, now = 86400, time.time()
    metrics = identity.IdentityMetrics()
    metrics.refreshed(creds, renewing=True)  # a renewed leaf is not warned about
    metrics.check_expiry(creds)  # 20 days left, but not yet past half its life
    assert messages == []
    metrics.check_expiry(creds, now=now + 11 * day)  # 9 days left: the 30-day threshold
    metrics.check_expiry(creds, now=now + 12 * day)  # same threshold: no repeat
    assert messages == [("warning", "leaf certificate expires soon")]
    metrics.check_expiry(creds, now=now + 14 * day)  # 6 days: the 7-day threshold
    metrics.check_expiry(creds, now=now + 19.5 * day)  # half a day: the 1-day threshold
    assert len(messages) == 3
    metrics.check_expiry(creds, now=now + 21 * day)
    assert messages[-1][0] == "error" and "EXPIRED" in messages[-1][1]
    metrics.failed("boom", creds)
    assert ("warning", "identity certificate refresh failed; keeping the current certificate") in messages


def test_refresh_delay_clamps():
    assert identity.refresh_delay(100.0 + 86400, 100.0, 10, 86400) == pytest.approx(0.7 * 86400)
    assert identity.refresh_delay(105.0, 100.0, 10, 86400) == 10  # MIN_REFRESH
    assert identity.refresh_delay(100.0 + 10 * 86400, 100.0, 10, 86400) == 86400  # MAX_REFRESH
    assert identity.refresh_delay(50.0, 100.0, 10, 86400) == 10  # already expired
