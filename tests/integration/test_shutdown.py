"""Shutdown and supervision: drain on SIGTERM, restart of dead workers, bad configuration."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.support import (
    ROOT,
    ThreadedServer,
    echo_handler,
    http_get,
    make_proxy,
    recv_all,
    wait_until,
)


def test_kill_9_of_a_worker_is_survived(twin):
    echo = ThreadedServer(echo_handler)
    proxy = make_proxy(pure=twin, workers=2, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{echo.port}").start()
    try:
        workers = proxy.workers()
        assert len(workers) == 2
        victim = workers[0]
        victim.kill()
        killed_at = time.monotonic()
        # New connections succeed within 1 s of the kill.
        ok = 0
        while time.monotonic() - killed_at < 1.0:
            try:
                with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=1) as c:
                    c.sendall(b"ping")
                    c.shutdown(socket.SHUT_WR)
                    if recv_all(c) == b"ping":
                        ok += 1
                        break
            except OSError:
                time.sleep(0.02)
        assert ok == 1, "no connection succeeded within 1 s of killing a worker"
        # The dead worker is replaced (a new pid), within 1 s as well.
        wait_until(lambda: len([w for w in proxy.workers() if w.pid != victim.pid and w.is_running()]) == 2, 1.0, what="worker restarted")
        status, _, body = http_get(proxy.admin_url + "/metrics")
        assert status == 200 and b"process_cpu_seconds_total" in body
    finally:
        assert proxy.stop() == 0
        echo.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_a_long_stream_and_refuses_new_connections(twin, workers):
    total = 24 << 20
    chunk = os.urandom(1 << 20)

    def slow_sender(conn):
        for _ in range(total // len(chunk)):
            conn.sendall(chunk)
            time.sleep(0.1)  # about 2.4 s in all: SIGTERM lands in the middle

    server = ThreadedServer(slow_sender)
    # The server speaks first: outbound detection waits for client bytes, so keep it short.
    proxy = make_proxy(pure=twin, workers=workers, LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD="20s", LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT="200ms",
                       MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{server.port}").start()
    received = {}
    try:
        client = socket.create_connection(("127.0.0.1", proxy.outbound), timeout=20)
        reader = threading.Thread(target=lambda: received.setdefault("n", len(recv_all(client))))
        reader.start()
        time.sleep(0.5)
        proxy.proc.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        time.sleep(0.3)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.outbound), timeout=2).close()
        reader.join(20)
        assert received.get("n") == total, "the open stream was cut short by the drain"
        client.close()  # the client's side was still open: the relay (and the drain) ends with it
        assert proxy.proc.wait(20) == 0
        assert time.monotonic() - sent_at < 20
    finally:
        proxy.stop()
        server.close()


def test_grace_period_bounds_the_drain(twin):
    hold = threading.Event()
    server = ThreadedServer(lambda conn: hold.wait(30))
    proxy = make_proxy(pure=twin, LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD="1s",
                       MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{server.port}").start()
    try:
        client = socket.create_connection(("127.0.0.1", proxy.outbound), timeout=5)
        client.sendall(b"x")
        time.sleep(0.3)
        start = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(10) == 0
        assert time.monotonic() - start < 4
        client.close()
    finally:
        hold.set()
        proxy.stop()
        server.close()


def test_bad_configuration_exits_64_naming_every_problem():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKERD2_PROXY_")}
    env.update(LINKERD2_PROXY_INBOUND_CONNECT_TIMEOUT="abc", LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR="not-an-address", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-m", "proxy", "run"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 64
    assert "LINKERD2_PROXY_INBOUND_CONNECT_TIMEOUT" in result.stderr and "'abc'" in result.stderr
    assert "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR" in result.stderr and "not-an-address" in result.stderr


def test_supervisor_exit_takes_its_workers_along():
    proxy = make_proxy(workers=2).start()
    workers = proxy.workers()
    proxy.proc.kill()
    proxy.proc.wait(5)
    wait_until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), 5, what="orphan workers gone")
