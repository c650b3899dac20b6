"""Outbound routing from a (fake) Linkerd destination controller over real gRPC: endpoint updates
applied under steady traffic, and a controller that dies and comes back."""

from __future__ import annotations

import threading
import time

import pytest

from tests.fakes.destination_service import FakeDestinationService, add, remove
from tests.integration.test_discovery_balance import endpoint, vip_port
from tests.support import http_get, make_proxy, wait_until


@pytest.mark.timeout(120)
def test_destination_updates_under_steady_traffic_and_a_controller_restart():
    delay = [0.0]
    a, b, c, d = (endpoint(n, delay) for n in "abcd")
    vip = vip_port()
    authority = f"127.0.0.1:{vip}"  # no profile for an IP outside the profile networks: the address is watched
    fake = FakeDestinationService()
    fake.script(authority, add(f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"))
    port = fake.start()
    proxy = make_proxy(LINKERD2_PROXY_DESTINATION_SVC_ADDR=f"127.0.0.1:{port}",
                       LINKERD2_PROXY_DESTINATION_SVC_NAME="linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local",
                       LINKERD2_PROXY_DESTINATION_CONTEXT='{"ns":"default","nodeName":"node-1"}',
                       MESHPROXY_OUTBOUND_FALLBACK_ADDR=authority).start()
    url = f"http://127.0.0.1:{proxy.outbound}/"
    failures: list = []
    stop = threading.Event()

    def steady():
        while not stop.is_set():
            status, _, body = http_get(url, timeout=10)
            if status != 200:
                failures.append((status, body))

    threads = [threading.Thread(target=steady) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: a.served["n"] > 5 and b.served["n"] > 5, 10, what="traffic on a and b")
        assert fake.calls(authority)[0].context_token == '{"ns":"default","nodeName":"node-1"}'
        fake.push(authority, remove(f"127.0.0.1:{b.port}"))
        time.sleep(0.5)
        b_after = b.served["n"]
        time.sleep(1.0)
        assert b.served["n"] == b_after, "a removed endpoint still gets requests"
        pushed = time.monotonic()
        fake.push(authority, add(f"127.0.0.1:{c.port}"))
        wait_until(lambda: c.served["n"] > 0, 1.0, interval=0.02, what="the added endpoint to get traffic within 1 s")
        print(f"\nadded endpoint served {time.monotonic() - pushed:.2f} s after the update")
        # The controller dies: the last known endpoints keep serving.
        fake.stop()
        before = a.served["n"] + c.served["n"]
        time.sleep(1.5)
        assert a.served["n"] + c.served["n"] > before, "traffic stopped with the controller"
        # It comes back with a new set: the proxy reconnects and the first add replaces the old set.
        fake.script(authority, add(f"127.0.0.1:{d.port}"))
        fake.restart()
        wait_until(lambda: d.served["n"] > 0, 15, interval=0.1, what="traffic on the new set after the restart")
        time.sleep(0.5)
        a_now, c_now = a.served["n"], c.served["n"]
        time.sleep(1.0)
        assert (a.served["n"], c.served["n"]) == (a_now, c_now), "endpoints of the old set still used after the reconnect"
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        proxy.stop()
        fake.stop()
        for e in (a, b, c, d):
            e.close()
    assert not failures, failures[:3]


@pytest.mark.timeout(120)
def test_profiles_from_the_controller_drive_retries_and_splits():
    from tests.fakes.destination_service import method_match, profile, retry_budget, route
    from tests.integration.test_discovery_balance import flaky_endpoint, get_many

    flaky = flaky_endpoint()
    v1, v2 = endpoint("v1", [0.0]), endpoint("v2", [0.0])
    retry_vip, split_vip = vip_port(), vip_port()
    fake = FakeDestinationService()
    # A profile for each address (IPs inside the profile networks get one), naming a service.
    fake.script_profile(f"127.0.0.1:{retry_vip}", profile(
        fqn="web.default.svc.cluster.local", budget=retry_budget(),
        routes=(route(method_match("GET"), retryable=True, labels={"route": "get-all"}),)))
    fake.script(f"web.default.svc.cluster.local:{retry_vip}", add(f"127.0.0.1:{flaky.port}"))
    fake.script_profile(f"127.0.0.1:{split_vip}", profile(
        fqn="api.default.svc.cluster.local",
        dst_overrides=(("api-v1.default.svc.cluster.local:80", 80), ("api-v2.default.svc.cluster.local:80", 20))))
    fake.script(f"api.default.svc.cluster.local:{split_vip}", add(f"127.0.0.1:{v1.port}"))
    fake.script("api-v1.default.svc.cluster.local:80", add(f"127.0.0.1:{v1.port}"))
    fake.script("api-v2.default.svc.cluster.local:80", add(f"127.0.0.1:{v2.port}"))
    port = fake.start()
    env = dict(LINKERD2_PROXY_DESTINATION_SVC_ADDR=f"127.0.0.1:{port}",
               LINKERD2_PROXY_DESTINATION_SVC_NAME="linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local",
               LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS="127.0.0.0/8")
    retrying = make_proxy(MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{retry_vip}", **env).start()
    splitting = make_proxy(MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{split_vip}", **env).start()
    try:
        http_get(f"http://127.0.0.1:{retrying.outbound}/", timeout=10)  # the first request opens discovery
        time.sleep(0.5)
        results = get_many(f"http://127.0.0.1:{retrying.outbound}/items", 60, 1)
        ok = sum(1 for status, _ in results if status == 200)
        assert ok >= 59, f"{ok}/60 succeeded with a retry profile"
        assert flaky.served["n"] > 60  # failures were retried
        http_get(f"http://127.0.0.1:{splitting.outbound}/", timeout=10)
        time.sleep(0.5)
        results = get_many(f"http://127.0.0.1:{splitting.outbound}/", 1000, 4)
        assert all(status == 200 for status, _ in results)
        share = sum(1 for _, body in results if body == b"v1") / 1000
        print(f"\nv1 share from the controller's dst_overrides: {share:.1%}")
        assert 0.75 <= share <= 0.85
    finally:
        retrying.stop()
        splitting.stop()
        fake.stop()
        for e in (flaky, v1, v2):
            e.close()
