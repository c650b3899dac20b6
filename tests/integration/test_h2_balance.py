"""HTTP/2 to a balanced service: one client connection, each stream balanced on its own (ref 4)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.integration.test_discovery_balance import vip_port
from tests.support import ROOT, make_proxy, metric_value, wait_until


def start_upstream() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "tests/fakes/h2_upstream.py", "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    port = int(re.search(r"listening (\d+)", line).group(1))
    return proc, port


def test_streams_of_one_connection_are_spread_over_the_endpoints(tmp_path):
    ups = [start_upstream() for _ in range(2)]
    vip = vip_port()
    disc = tmp_path / "d.toml"
    disc.write_text(f'[[services]]\nauthority = "grpc.default.svc.cluster.local"\nport = 80\nvip = "127.0.0.1:{vip}"\n'
                    + "".join(f'[[services.endpoints]]\naddr = "127.0.0.1:{port}"\nprotocol = "http2"\n' for _, port in ups))
    proxy = make_proxy(MESHPROXY_DISCOVERY_FILE=str(disc), MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{vip}").start()
    try:
        # h2load: ONE connection, 200 requests, 4 at a time.
        out = subprocess.run(["h2load", "-n", "200", "-c", "1", "-m", "4", f"http://127.0.0.1:{proxy.outbound}/delay/2"],
                             capture_output=True, text=True, timeout=60).stdout
        assert re.search(r"200 succeeded", out) or "succeeded, 0 failed" in out, out
        text = wait_until(lambda: (t := proxy.metrics()) and "request_total" in t and t, 5)
        per_endpoint = [metric_value(text, "request_total", direction="outbound", target_port=str(port)) for _, port in ups]
        print(f"\nrequests per endpoint over one client connection: {per_endpoint}")
        assert sum(per_endpoint) == 200
        assert min(per_endpoint) >= 20, "one HTTP/2 connection's streams all went to one endpoint"
        assert metric_value(text, "tcp_open_total", direction="outbound", peer="src") == 1
    finally:
        proxy.stop()
        for proc, _ in ups:
            proc.terminate()
            proc.wait(5)


def test_http2_streams_count_against_max_in_flight():
    proc, port = start_upstream()
    proxy = make_proxy(MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{port}", LINKERD2_PROXY_OUTBOUND_MAX_IN_FLIGHT="2").start()
    try:
        # 10 streams at once on one connection, each held 500 ms upstream: only 2 may be in flight.
        out = subprocess.run(["h2load", "-n", "10", "-c", "1", "-m", "10", f"http://127.0.0.1:{proxy.outbound}/delay/500"],
                             capture_output=True, text=True, timeout=60).stdout
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
        assert codes, out
        ok, shed = int(codes.group(1)), int(codes.group(4))
        assert ok == 2 and shed == 8, out
        assert metric_value(proxy.metrics(), "outbound_http_errors_total", error="loadshed") == 8
    finally:
        proxy.stop()
        proc.terminate()
        proc.wait(5)
