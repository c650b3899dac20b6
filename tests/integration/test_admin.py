"""Admin endpoints (ref section 8): every path and method with its status code and body."""

from __future__ import annotations

import gzip
import json
import socket

import pytest

from tests.support import ThreadedServer, echo_handler, http_get, make_proxy, recv_all, wait_until


@pytest.fixture(params=[1, 2], ids=["1worker", "2workers"])
def proxy(request, twin):
    echo = ThreadedServer(echo_handler)
    p = make_proxy(pure=twin, workers=request.param, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{echo.port}",
                   MESHPROXY_TEST_MARKER="present").start()
    yield p
    p.stop()
    echo.close()


def roundtrip(port: int, data: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        return recv_all(c)


def test_live_ready_and_unknown(proxy):
    assert http_get(proxy.admin_url + "/live")[::2] == (200, b"live\n")
    assert http_get(proxy.admin_url + "/ready")[::2] == (200, b"ready\n")
    assert http_get(proxy.admin_url + "/ready", method="POST", data=b"")[0] == 200  # any method
    assert http_get(proxy.admin_url + "/nope")[::2] == (404, b"")


def test_metrics_sum_over_workers_and_gzip(proxy):
    for _ in range(6):
        assert roundtrip(proxy.outbound) == b"ping"
    text = wait_until(lambda: (t := proxy.metrics()) and 'tcp_close_total{direction="outbound",peer="src"' in t and t, 5)
    # One series per label set, summed over every worker: six connections in all.
    lines = [line for line in text.splitlines() if line.startswith('tcp_open_total{direction="outbound",peer="src"')]
    assert len(lines) == 1 and lines[0].endswith(" 6")
    assert 'tcp_open_total{direction="outbound",peer="src",target_addr=' in text
    assert "# TYPE tcp_open_total counter" in text and "process_resident_memory_bytes" in text
    status, headers, body = http_get(proxy.admin_url + "/metrics", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("content-encoding") == "gzip"
    assert b"tcp_open_total" in gzip.decompress(body)


def test_log_level_get_put_and_errors(proxy):
    status, _, body = http_get(proxy.admin_url + "/proxy-log-level")
    assert status == 200 and body == b"warn,linkerd=info\n"
    assert http_get(proxy.admin_url + "/proxy-log-level", method="PUT", data=b"info,linkerd=debug")[0] == 204
    assert http_get(proxy.admin_url + "/proxy-log-level")[2] == b"info,linkerd=debug\n"
    status, _, body = http_get(proxy.admin_url + "/proxy-log-level", method="PUT", data=b"linkerd=loud")
    assert status == 400 and b"loud" in body
    status, headers, _ = http_get(proxy.admin_url + "/proxy-log-level", method="DELETE")
    assert status == 405


def test_log_level_put_changes_what_workers_log(proxy):
    roundtrip(proxy.outbound)
    assert "accepted" not in proxy.read_output()
    assert http_get(proxy.admin_url + "/proxy-log-level", method="PUT", data=b"warn,linkerd=debug")[0] == 204
    for _ in range(4):  # with two workers, enough connections that each worker is likely to take one
        roundtrip(proxy.outbound)
    wait_until(lambda: "accepted" in proxy.read_output(), 5, what="debug line from a worker")
    assert http_get(proxy.admin_url + "/proxy-log-level", method="PUT", data=b"warn")[0] == 204


def test_env_json(proxy):
    status, headers, body = http_get(proxy.admin_url + "/env.json")
    assert status == 200 and headers["content-type"] == "application/json"
    env = json.loads(body)
    assert env["MESHPROXY_TEST_MARKER"] == "present"
    status, _, body = http_get(proxy.admin_url + "/env.json?MESHPROXY_TEST_MARKER&NOT_SET_AT_ALL")
    assert status == 200 and json.loads(body) == {"MESHPROXY_TEST_MARKER": "present", "NOT_SET_AT_ALL": None}
    assert http_get(proxy.admin_url + "/env.json?A=B")[0] == 400
    assert http_get(proxy.admin_url + "/env.json", headers={"Accept": "text/html"})[0] == 406
    assert http_get(proxy.admin_url + "/env.json", method="POST", data=b"")[0] == 405


def test_shutdown_disabled_by_default(proxy):
    assert http_get(proxy.admin_url + "/shutdown")[0] == 405
    status, _, body = http_get(proxy.admin_url + "/shutdown", method="POST", data=b"")
    assert status == 404 and body == b"shutdown endpoint is not enabled\n"
    assert proxy.proc.poll() is None


@pytest.mark.parametrize("workers", [1, 2])
def test_shutdown_endpoint_drains_and_exits_0(twin, workers):
    p = make_proxy(pure=twin, workers=workers, LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED="true").start()
    try:
        status, _, body = http_get(p.admin_url + "/shutdown", method="POST", data=b"")
        assert (status, body) == (200, b"shutdown\n")
        assert p.proc.wait(15) == 0
    finally:
        p.stop()
