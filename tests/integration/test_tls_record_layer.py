"""The record layer (proxy.tls.transport over proxy.tls.records) against real OpenSSL peers.

Each test runs on both record twins, in one uvloop loop on loopback: our TlsTransport on one side, and on
the other uvloop's SSL transport or the ``openssl`` command (s_client and
s_server, which send session tickets and KeyUpdates on request). A small TCP
relay between the two sees every byte on the wire: it checks that no plaintext
crosses it and can corrupt a record on its way.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.tls import ca
from proxy.tls import transport as tt
from proxy.tls.credentials import Credentials, check_server_identity, peer_identity


@pytest.fixture(params=["cython", "python"], autouse=True)
def records_twin(request, monkeypatch):
    """Every test runs on both record twins (the compiled one seals with libcrypto's EVP)."""
    if request.param == "cython":
        try:
            mod = importlib.import_module("proxy._native.records")
        except ImportError:
            pytest.fail("proxy._native.records is not built; run `python setup.py build_ext --inplace`")
    else:
        mod = importlib.import_module("proxy.tls.records")
    monkeypatch.setattr(tt, "_twin", mod)
    return mod


SERVER, CLIENT = "server.ns.serviceaccount.identity.linkerd.cluster.local", "client.ns.serviceaccount.identity.linkerd.cluster.local"
MARKER = b"PLAINTEXT-MARKER-" * 64


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Any]:
    root, root_key, issuer, issuer_key = ca.make_ca()
    out: dict[str, Any] = {"dir": tmp_path_factory.mktemp("pki")}
    for who, name in (("server", SERVER), ("client", CLIENT)):
        leaf, key = ca.issue_leaf(issuer, issuer_key, name, 3600, chain=[root])
        chain = ca.cert_pem(leaf) + ca.cert_pem(issuer)
        out[who] = Credentials.from_pem(name, ca.key_pem(key), chain, ca.cert_pem(root))
        (out["dir"] / f"{who}.crt").write_text(chain)
        (out["dir"] / f"{who}.key").write_text(ca.key_pem(key))
    (out["dir"] / "roots.pem").write_text(ca.cert_pem(root))
    return out


def contexts(pki, logged: bool = True) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_ctx, client_ctx = pki["server"].server_context(), pki["client"].client_context()
    klog = tt.keylog()
    assert klog is not None
    if logged:
        klog.attach(server_ctx)
        klog.attach(client_ctx)
    return server_ctx, client_ctx


class Collect(asyncio.Protocol):
    """Keeps what it receives; ``ended`` resolves to "eof" or the connection's error."""

    def __init__(self, echo: bool = False) -> None:
        self.data = bytearray()
        self.echo = echo
        self.transport: Any = None
        self.ended: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.echo:
            self.transport.write(data)

    def eof_received(self) -> bool:
        if not self.ended.done():
            self.ended.set_result("eof")
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.ended.done():
            self.ended.set_result(exc or "lost")


class BufferedCollect(asyncio.BufferedProtocol):
    """The same as Collect for the buffered path (what the opaque relay uses)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.buf = bytearray(300 * 1024)
        self.ended: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buf[:nbytes]

    def eof_received(self) -> bool:
        if not self.ended.done():
            self.ended.set_result("eof")
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.ended.done():
            self.ended.set_result(exc or "lost")


class Wire:
    """A TCP relay in front of ``target`` that records both directions and can flip one
    byte of the client's stream at ``corrupt_at`` (an offset into what the client sends)."""

    def __init__(self, target: int, corrupt_at: int | None = None) -> None:
        self.target = target
        self.corrupt_at = corrupt_at
        self.up = bytearray()
        self.down = bytearray()
        self.server: Any = None
        self.port = 0

    async def start(self) -> Wire:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, seen: bytearray, corrupt: bool) -> None:
            while data := await src.read(65536):
                start = len(seen)
                seen += data
                if corrupt and self.corrupt_at is not None and start <= self.corrupt_at < len(seen):
                    data = bytearray(data)
                    data[self.corrupt_at - start] ^= 0x40
                dst.write(bytes(data))
                await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer, self.up, True), pump(up_reader, writer, self.down, False), return_exceptions=True)

    def close(self) -> None:
        self.server.close()


async def serve_ours(server_ctx: ssl.SSLContext, make: Any, delay: float = 0.0) -> tuple[Any, list[Any]]:
    """A listener whose connections get our server side; the TlsTransports go in the list.
    ``delay``: seconds between the end of the handshake and the protocol taking over."""
    loop = asyncio.get_running_loop()
    made: list[Any] = []
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)

    async def accept_forever() -> None:
        while True:
            sock, _ = await loop.sock_accept(lsock)
            tls = await tt.handshake(lambda f, s=sock: loop.connect_accepted_socket(f, s), server_ctx, True)
            made.append(tls)
            if delay:
                await asyncio.sleep(delay)
            tt.start(tls, make())

    task = loop.create_task(accept_forever())
    return (task, lsock), made


async def dial_ours(port: int, client_ctx: ssl.SSLContext, proto: Any) -> Any:
    loop = asyncio.get_running_loop()
    tls = await asyncio.wait_for(tt.handshake(lambda f: loop.create_connection(f, "127.0.0.1", port), client_ctx, False, SERVER), 10)
    tt.start(tls, proto)
    return tls


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------ against uvloop's SSL (OpenSSL)


def test_our_client_to_an_openssl_server_both_ways_with_no_plaintext_on_the_wire(pki):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server_ctx, client_ctx = contexts(pki)
        echo: list[Collect] = []
        srv = await loop.create_server(lambda: echo.append(Collect(echo=True)) or echo[-1], "127.0.0.1", 0, ssl=server_ctx)
        wire = await Wire(srv.sockets[0].getsockname()[1]).start()
        got = BufferedCollect()
        tls = await dial_ours(wire.port, client_ctx, got)
        assert tls.offloaded, "the secrets should be found in the key log"
        assert check_server_identity(tls.get_extra_info("ssl_object"), SERVER)
        payload = MARKER + os.urandom(6 << 20) + MARKER
        for off in range(0, len(payload), 100_000):
            tls.write(payload[off:off + 100_000])
        await until(lambda: len(got.data) >= len(payload))
        assert bytes(got.data) == payload
        tls.close()
        await until(lambda: echo[0].ended.done())
        assert echo[0].ended.result() == "eof"  # our close_notify reads as the end
        assert MARKER[:32] not in wire.up and MARKER[:32] not in wire.down
        assert peer_identity(echo[0].transport.get_extra_info("ssl_object")) == CLIENT
        wire.close()
        srv.close()

    uvloop.run(main())


def test_an_openssl_client_to_our_server_and_the_end_of_stream_each_way(pki):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server_ctx, client_ctx = contexts(pki)
        ours: list[Collect] = []
        (task, lsock), made = await serve_ours(server_ctx, lambda: ours.append(Collect(echo=True)) or ours[-1])
        t, theirs = await loop.create_connection(Collect, "127.0.0.1", lsock.getsockname()[1], ssl=client_ctx, server_hostname=SERVER)
        payload = os.urandom(3 << 20)
        t.write(payload)
        await until(lambda: len(theirs.data) >= len(payload))
        assert bytes(theirs.data) == payload
        assert made[0].offloaded
        assert peer_identity(made[0].get_extra_info("ssl_object")) == CLIENT
        made[0].close()  # close_notify from us: the OpenSSL side sees the end
        assert await asyncio.wait_for(theirs.ended, 10) == "eof"
        task.cancel()
        lsock.close()

    uvloop.run(main())


def test_our_client_to_our_server(pki):
    async def main() -> None:
        server_ctx, client_ctx = contexts(pki)
        ours: list[Collect] = []
        (task, lsock), made = await serve_ours(server_ctx, lambda: ours.append(Collect(echo=True)) or ours[-1])
        got = Collect()
        tls = await dial_ours(lsock.getsockname()[1], client_ctx, got)
        payload = os.urandom(2 << 20)
        tls.write(payload)
        await until(lambda: len(got.data) >= len(payload))
        assert bytes(got.data) == payload
        tls.close()
        assert await asyncio.wait_for(ours[0].ended, 10) == "eof"
        task.cancel()
        lsock.close()

    uvloop.run(main())


def test_records_sent_before_the_protocol_takes_over_wait_in_the_socket(pki):
    """A client that sends at once must not overflow a transport with no protocol yet."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server_ctx, client_ctx = contexts(pki)
        ours: list[Collect] = []
        (task, lsock), made = await serve_ours(server_ctx, lambda: ours.append(Collect()) or ours[-1], delay=0.5)
        t, _ = await loop.create_connection(Collect, "127.0.0.1", lsock.getsockname()[1], ssl=client_ctx, server_hostname=SERVER)
        payload = os.urandom(8 << 20)
        t.write(payload)
        t.close()
        assert await asyncio.wait_for(_ended(ours), 20) == "eof"
        assert bytes(ours[0].data) == payload
        task.cancel()
        lsock.close()

    uvloop.run(main())


class PausingCollect(BufferedCollect):
    """A buffered protocol with one record's worth of buffer (so records wait in the
    transport) that pauses at its first bytes and notes any delivery made from inside
    ``resume_reading``."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray(17 * 1024)
        self.resuming = False
        self.delivered_while_resuming = 0

    def buffer_updated(self, nbytes: int) -> None:
        if self.resuming:
            self.delivered_while_resuming += nbytes
        first = not self.data
        super().buffer_updated(nbytes)
        if first:
            self.transport.pause_reading()

    def resume(self) -> None:
        self.resuming = True
        try:
            self.transport.resume_reading()
        finally:
            self.resuming = False


def test_resume_reading_delivers_on_a_later_turn_never_from_inside_the_call(pki):
    """The relay resumes a paused end and then writes what it held (RelayEnd.link): records
    delivered from inside resume_reading would overtake those bytes (a stream through a proxy
    pair arrived with a record moved to its front). asyncio's transports never call the
    protocol from resume_reading; neither may ours."""

    async def main() -> None:
        server_ctx, client_ctx = contexts(pki)
        ours: list[PausingCollect] = []
        (task, lsock), made = await serve_ours(server_ctx, lambda: ours.append(PausingCollect()) or ours[-1])
        tls = await dial_ours(lsock.getsockname()[1], client_ctx, Collect())
        payload = os.urandom(1 << 20)
        tls.write(payload)
        await until(lambda: ours and ours[0].data)
        await asyncio.sleep(0.3)  # records pile up in the paused transport
        ours[0].resume()
        assert ours[0].delivered_while_resuming == 0
        await until(lambda: len(ours[0].data) >= len(payload))
        assert bytes(ours[0].data) == payload
        tls.close()
        task.cancel()
        lsock.close()

    uvloop.run(main())


async def _ended(protos: list[Any]) -> Any:
    await until(lambda: bool(protos))
    return await protos[0].ended


def test_a_corrupted_record_closes_the_connection_and_is_never_delivered(pki):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server_ctx, client_ctx = contexts(pki)
        ours: list[Collect] = []
        (task, lsock), made = await serve_ours(server_ctx, lambda: ours.append(Collect()) or ours[-1])
        wire = await Wire(lsock.getsockname()[1]).start()
        t, theirs = await loop.create_connection(Collect, "127.0.0.1", wire.port, ssl=client_ctx, server_hostname=SERVER)
        await until(lambda: bool(made))
        payload = os.urandom(1 << 20)
        handshake_bytes = len(wire.up)
        wire.corrupt_at = handshake_bytes + 300_000  # inside an application record
        t.write(payload)
        ended = await asyncio.wait_for(ours[0].ended, 10)
        assert isinstance(ended, ConnectionError), ended
        received = bytes(ours[0].data)
        assert len(received) < 300_000 and payload.startswith(received)
        assert made[0].is_closing()
        t.abort()
        wire.close()
        task.cancel()
        lsock.close()

    uvloop.run(main())


def test_without_logged_secrets_the_openssl_records_carry_the_connection(pki):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server_ctx, client_ctx = contexts(pki, logged=False)
        echo: list[Collect] = []
        srv = await loop.create_server(lambda: echo.append(Collect(echo=True)) or echo[-1], "127.0.0.1", 0, ssl=server_ctx)
        got = Collect()
        tls = await dial_ours(srv.sockets[0].getsockname()[1], client_ctx, got)
        assert not tls.offloaded
        payload = os.urandom(1 << 20)
        tls.write(payload)
        await until(lambda: len(got.data) >= len(payload))
        assert bytes(got.data) == payload
        tls.close()
        assert await asyncio.wait_for(echo[0].ended, 10) == "eof"
        srv.close()

    uvloop.run(main())


def test_the_key_log_is_emptied_as_it_is_read(pki):
    klog = tt.keylog()
    assert klog is not None
    test_our_client_to_our_server(pki)
    klog.take(b"")  # reads whatever is left
    assert os.fstat(klog.fd).st_size == 0


# ------------------------------------------------------------------ against the openssl command

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


async def _read_until(stream: asyncio.StreamReader, needle: bytes, seen: bytearray, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{needle!r} not seen; got {bytes(seen[-500:])!r}")
        try:
            chunk = await asyncio.wait_for(stream.read(4096), left)
        except TimeoutError:
            continue
        if not chunk:
            raise EOFError(f"{needle!r} not seen before the end; got {bytes(seen[-500:])!r}")
        seen += chunk


@needs_openssl
def test_s_client_with_a_key_update_request_against_our_server(pki):
    d: Path = pki["dir"]

    async def main() -> None:
        server_ctx, _ = contexts(pki)
        ours: list[Collect] = []
        (task, lsock), made = await serve_ours(server_ctx, lambda: ours.append(Collect(echo=True)) or ours[-1])
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{lsock.getsockname()[1]}", "-servername", SERVER, "-tls1_3",
            "-cert", str(d / "client.crt"), "-cert_chain", str(d / "client.crt"), "-key", str(d / "client.key"), "-CAfile", str(d / "roots.pem"), "-no_ign_eof",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdin is not None and proc.stdout is not None
        seen = bytearray()
        try:
            proc.stdin.write(b"before-the-update\n")
            await _read_until(proc.stdout, b"before-the-update", seen)  # our echo (s_client prints what it receives)
            proc.stdin.write(b"K\n")  # s_client: KeyUpdate, update_requested
            await _read_until(proc.stdout, b"KEYUPDATE", seen)
            proc.stdin.write(b"after-the-update\n")
            await _read_until(proc.stdout, b"after-the-update", seen)
            await _read_until(proc.stdout, b"after-the-update", seen)  # our echo, under our new keys
            proc.stdin.close()  # s_client sends close_notify and leaves
            assert await asyncio.wait_for(ours[0].ended, 10) == "eof"
            assert made[0].offloaded
            assert made[0]._sealer.keys.seq >= 1 and made[0]._records_in.keys.seq >= 1
            assert bytes(ours[0].data) == b"before-the-update\nafter-the-update\n"
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            task.cancel()
            lsock.close()

    uvloop.run(main())


@needs_openssl
def test_s_server_with_tickets_and_a_key_update_request_against_our_client(pki):
    d: Path = pki["dir"]
    port_sock = socket.socket()
    port_sock.bind(("127.0.0.1", 0))
    port = port_sock.getsockname()[1]
    port_sock.close()

    async def main() -> None:
        _, client_ctx = contexts(pki)
        # s_server sends two session tickets after the handshake (its default), under the new keys.
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-naccept", "1", "-Verify", "1",
            "-cert", str(d / "server.crt"), "-cert_chain", str(d / "server.crt"), "-key", str(d / "server.key"), "-CAfile", str(d / "roots.pem"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdin is not None and proc.stdout is not None
        seen = bytearray()
        try:
            await _read_until(proc.stdout, b"ACCEPT", seen)
            got = Collect()
            tls = await dial_ours(port, client_ctx, got)
            assert tls.offloaded
            tls.write(b"from-us\n")
            await _read_until(proc.stdout, b"from-us", seen)
            proc.stdin.write(b"K\n")  # s_server: KeyUpdate, update_requested, to us
            await _read_until(proc.stdout, b"SSL_do_handshake -> 1", seen)
            proc.stdin.write(b"from-them\n")
            await until(lambda: b"from-them\n" in got.data)
            tls.write(b"from-us-after\n")  # under our new keys, after our answer
            await _read_until(proc.stdout, b"from-us-after", seen)
            assert bytes(got.data) == b"from-them\n"
            assert tls._sealer.keys.seq >= 1
            tls.close()
            await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    uvloop.run(main())


def test_every_context_of_the_identity_takes_the_record_layer(pki):
    """The contexts LocalIdentity makes (ALPN ones for the opaque transport too) log their
    secrets here; a context made elsewhere does not, and gets OpenSSL's records."""
    from proxy.tls.local import LocalIdentity

    local = LocalIdentity()
    local.install(pki["client"])
    alpn_ctx = local.make_client_context(alpn=["transport.l5d.io/v1"])
    assert local.records_usable(local.client_ctx) and local.records_usable(local.server_ctx)
    assert local.records_usable(alpn_ctx)
    assert not local.records_usable(pki["client"].client_context())
    local.record_layer = False
    assert not local.records_usable(local.client_ctx)
