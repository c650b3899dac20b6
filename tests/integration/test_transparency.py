"""Transparency: what goes in one side comes out the other, byte for byte (loopback)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading

import pytest

from tests.support import (
    ThreadedServer,
    echo_handler,
    make_proxy,
    metric_value,
    recv_all,
    wait_until,
)


@pytest.fixture
def echo():
    server = ThreadedServer(echo_handler)
    yield server
    server.close()


def test_bytes_are_exact_both_ways(twin):
    """8 MiB each way at once through the outbound listener; both ends compare SHA-256."""
    size = 8 << 20
    from_server = os.urandom(size)
    seen = {}

    def handler(conn):
        sender = threading.Thread(target=conn.sendall, args=(from_server,))
        sender.start()
        seen["server_got"] = hashlib.sha256(recv_all(conn, size)).hexdigest()
        sender.join()

    server = ThreadedServer(handler)
    proxy = make_proxy(pure=twin, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{server.port}").start()
    try:
        to_server = os.urandom(size)
        with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=20) as c:
            sender = threading.Thread(target=c.sendall, args=(to_server,))
            sender.start()
            got = recv_all(c, size)
            sender.join()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(from_server).hexdigest()
        wait_until(lambda: "server_got" in seen, 10, what="server finished reading")
        assert seen["server_got"] == hashlib.sha256(to_server).hexdigest()
        assert server.accepted == 1
        text = wait_until(lambda: (t := proxy.metrics()) and metric_value(t, "tcp_close_total", direction="outbound", peer="src") >= 1 and t, 5, what="close counted")
        assert metric_value(text, "tcp_read_bytes_total", direction="outbound", peer="src") == size
        assert metric_value(text, "tcp_write_bytes_total", direction="outbound", peer="src") == size
        assert metric_value(text, "tcp_open_connections", direction="outbound", peer="src") == 0
    finally:
        assert proxy.stop() == 0
        server.close()


def test_half_close_is_passed_through(twin):
    """The client shuts its write side; the server then sends 1 MiB and closes; the client gets all of it."""
    reply = os.urandom(1 << 20)
    got_request = {}

    def handler(conn):
        got_request["data"] = recv_all(conn)  # returns at the client's FIN, passed on by the proxy
        conn.sendall(reply)

    server = ThreadedServer(handler)
    proxy = make_proxy(pure=twin, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{server.port}").start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as c:
            c.sendall(b"request then FIN")
            c.shutdown(socket.SHUT_WR)
            received = recv_all(c)
        assert got_request["data"] == b"request then FIN"
        assert received == reply
    finally:
        assert proxy.stop() == 0
        server.close()


def test_200_concurrent_connections_keep_every_byte_and_bounded_memory(twin, echo):
    """200 connections, each 1 MiB up and the same 1 MiB echoed back, through one proxy."""
    proxy = make_proxy(pure=twin, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{echo.port}").start()
    peak_rss = [proxy.rss_bytes()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak_rss.append(proxy.rss_bytes())
            stop.wait(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()

    async def one(i: int) -> bool:
        payload = hashlib.sha256(str(i).encode()).digest() * (1 << 15)  # 1 MiB, distinct per connection
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound)

        async def send():
            for off in range(0, len(payload), 64 << 10):
                writer.write(payload[off:off + (64 << 10)])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        got = await reader.read(-1)
        await sender
        writer.close()
        return got == payload

    async def all_of_them():
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 120)

    try:
        results = asyncio.run(all_of_them())
        stop.set()
        sampler.join()
        assert all(results), f"{results.count(False)} connections got wrong bytes"
        peak_mb = max(peak_rss) / 2**20
        print(f"\npeak proxy RSS with 200 x 1 MiB connections ({'pure' if twin else 'cython'}): {peak_mb:.1f} MB")
        # 200 connections x (64 KiB write buffers per side + 256 KiB read) is ~100 MB at worst; a leak or an
        # unbounded buffer would hold the whole 400 MiB that crossed.
        assert peak_mb < 150
    finally:
        stop.set()
        assert proxy.stop() == 0


def test_unreachable_target_resets_the_client_and_is_counted(twin):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    dead = port.getsockname()[1]
    port.close()  # nothing listens there: connect is refused
    # A few bytes that could still become a request line: detection ends at its (short) timeout.
    proxy = make_proxy(pure=twin, LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT="200ms", MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{dead}").start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=5) as c:
            c.sendall(b"hello")
            with pytest.raises(ConnectionResetError):
                while c.recv(100):
                    pass
        text = proxy.metrics()
        assert metric_value(text, "outbound_tcp_errors_total", error="i/o") == 1
        assert metric_value(text, "tcp_close_total", direction="outbound", peer="src", errno="ECONNREFUSED") == 1
    finally:
        assert proxy.stop() == 0


def test_peer_reset_is_passed_on_and_other_connections_are_untouched(twin, echo):
    """A server that resets one connection: that client sees a reset; a parallel stream is intact."""

    def resetter(conn):
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    rst_server = ThreadedServer(resetter)
    proxy_rst = make_proxy(pure=twin, LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT="200ms", MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{rst_server.port}").start()
    try:
        with socket.create_connection(("127.0.0.1", proxy_rst.outbound), timeout=5) as c:
            c.sendall(b"x" * 10)
            with pytest.raises(ConnectionResetError):
                while c.recv(100):
                    pass
    finally:
        assert proxy_rst.stop() == 0
        rst_server.close()
