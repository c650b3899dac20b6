"""Discovery: the destination client against a fake controller over real gRPC
(grpcio serving code generated from our .proto files)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from proxy.balance.p2c import Backoff
from proxy.config import Addr, parse
from proxy.discovery.destination import DestinationClient, Profile
from proxy.discovery.static import Endpoint
from tests.fakes.destination_service import (
    FakeDestinationService,
    add,
    method_match,
    no_endpoints,
    path_match,
    profile,
    remove,
    retry_budget,
    route,
    status_class,
    weighted_addr,
)

WEB = "web.ns.svc.cluster.local:80"
ID = "web.ns.serviceaccount.identity.linkerd.cluster.local"
CONTEXT = '{"ns":"client-ns","nodeName":"node-1","pod":"client-0"}'
# Short and bounded, so a kill/restart is noticed in well under a second.
FAST = Backoff(0.05, 0.4, 0.1)


def run(coro: Any, timeout: float = 15.0, loop: str = "asyncio") -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    if loop == "uvloop":
        import uvloop

        return uvloop.run(bounded())
    return asyncio.run(bounded())


def make_client(port: int, **env: str) -> DestinationClient:
    config = parse({
        "LINKERD2_PROXY_DESTINATION_SVC_ADDR": f"127.0.0.1:{port}",  # loopback: plaintext (ref 1.1)
        "LINKERD2_PROXY_DESTINATION_SVC_NAME": "linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local",
        "LINKERD2_PROXY_DESTINATION_CONTEXT": CONTEXT,
        **env,
    })
    return DestinationClient(config, backoff=FAST)


class Recorder:
    """Every set a watch delivered, and a way to wait for one that satisfies a test."""

    def __init__(self) -> None:
        self.sets: list[Any] = []
        self.changed = asyncio.Event()

    def __call__(self, value: Any) -> None:
        self.sets.append(value)
        self.changed.set()

    @property
    def last(self) -> Any:
        return self.sets[-1]

    async def until(self, predicate: Callable[[Any], bool], timeout: float = 5.0) -> Any:
        async with asyncio.timeout(timeout):
            while not (self.sets and predicate(self.last)):
                self.changed.clear()
                await self.changed.wait()
        return self.last


def hosts(endpoints: tuple[Endpoint, ...]) -> set[str]:
    return {str(e.addr) for e in endpoints}


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


@pytest.fixture
def fake():
    service = FakeDestinationService()
    service.start()
    yield service
    service.stop()


def test_add_remove_no_endpoints(fake):
    fake.script(WEB, add("10.0.0.1:80", "10.0.0.2:80"))

    async def scenario() -> None:
        client = make_client(fake.port)
        seen = Recorder()
        watch = client.watch(WEB, seen)
        try:
            assert await watch.wait_resolved(5)
            assert hosts(await seen.until(bool)) == {"10.0.0.1:80", "10.0.0.2:80"}
            assert watch.exists is True
            fake.push(WEB, add("10.0.0.3:80"))  # later adds upsert
            await seen.until(lambda s: len(s) == 3)
            fake.push(WEB, add(weighted_addr("10.0.0.2:80", weight=3)))  # changed metadata replaces
            await seen.until(lambda s: any(e.weight == 3 for e in s))
            assert len(seen.last) == 3
            fake.push(WEB, remove("10.0.0.1:80"))
            assert hosts(await seen.until(lambda s: len(s) == 2)) == {"10.0.0.2:80", "10.0.0.3:80"}
            count = len(seen.sets)
            fake.push(WEB, remove("10.9.9.9:80"), add())  # no change, nothing valid: nobody is told
            fake.push(WEB, no_endpoints(exists=True))
            assert await seen.until(lambda s: s == ()) == ()
            assert len(seen.sets) == count + 1 and watch.exists is True
            fake.push(WEB, add("10.0.0.4:80"))
            assert hosts(await seen.until(bool)) == {"10.0.0.4:80"}
            fake.push(WEB, no_endpoints(exists=False))
            await seen.until(lambda s: s == ())
            await eventually(lambda: watch.exists is False)
        finally:
            watch.close()
            await client.close()

    run(scenario())


def test_endpoint_metadata_labels_ipv6_identity_hints(fake):
    fake.script(WEB, add(
        weighted_addr("10.0.0.1:8080", identity=ID, hint="h2", labels={"pod": "web-0", "zone": "zone-a", "service": "pod-wins"}),
        weighted_addr("[fd00:10::7]:8080", identity=ID, hint="opaque", opaque_port=4143, labels={"pod": "web-1", "zone": "zone-b"}),
        weighted_addr("10.0.0.3:8080"),  # unmeshed: no identity, no hint
        labels={"namespace": "ns", "service": "web"},
    ))

    async def scenario() -> None:
        client = make_client(fake.port)
        seen = Recorder()
        watch = client.watch(WEB, seen)
        try:
            endpoints = {str(e.addr): e for e in await seen.until(bool)}
            v4, v6, plain = endpoints["10.0.0.1:8080"], endpoints["[fd00:10::7]:8080"], endpoints["10.0.0.3:8080"]
            assert v4 == Endpoint(Addr("10.0.0.1", 8080), 10000, ID, "zone-a", "http2",
                                  (("namespace", "ns"), ("pod", "web-0"), ("service", "pod-wins"), ("zone", "zone-a")))
            assert v6.addr == Addr("fd00:10::7", 8080) and v6.protocol == "opaque" and v6.zone == "zone-b"
            assert v6.labels == (("namespace", "ns"), ("pod", "web-1"), ("service", "web"), ("zone", "zone-b"))
            assert watch.extras(v6.addr).opaque_transport_port == 4143
            assert watch.extras(v4.addr).server_name == ID
            assert plain.identity == "" and plain.protocol == "" and plain.labels == (("namespace", "ns"), ("service", "web"))
        finally:
            watch.close()
            await client.close()

    run(scenario())


def test_context_token_and_path_are_sent(fake):
    fake.script(WEB, add("10.0.0.1:80"))
    target = "10.0.0.5:80"

    async def scenario() -> None:
        client = make_client(fake.port, LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS="10.0.0.0/8")
        watch = client.watch(WEB, Recorder())
        profile_watch = client.get_profile(target, Recorder())
        try:
            assert await watch.wait_resolved(5)
            await eventually(lambda: bool(fake.calls(target, kind="profile")))
        finally:
            watch.close()
            if profile_watch is not None:
                profile_watch.close()
            await client.close()

    run(scenario())
    (get,) = fake.calls(WEB)
    assert (get.path, get.context_token, get.scheme) == (WEB, CONTEXT, "")
    (lookup,) = fake.calls(target, kind="profile")
    assert lookup.context_token == CONTEXT


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_killed_controller_keeps_last_set_then_first_add_replaces(fake, loop):
    fake.script(WEB, add("10.0.0.1:80", "10.0.0.2:80"))

    async def scenario() -> None:
        client = make_client(fake.port)
        seen = Recorder()
        watch = client.watch(WEB, seen)
        try:
            assert hosts(await seen.until(bool)) == {"10.0.0.1:80", "10.0.0.2:80"}
            fake.push(WEB, add("10.0.0.3:80"))
            await seen.until(lambda s: len(s) == 3)
            delivered = len(seen.sets)

            await asyncio.to_thread(fake.stop)  # killed: every connection dropped
            await asyncio.sleep(0.6)  # several failed reconnects
            assert len(seen.sets) == delivered, "nothing is delivered while disconnected"
            assert hosts(watch.endpoints) == {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}

            # Back on the same port, with a different state to report.
            fake.script(WEB, remove("10.0.0.1:80"), add("10.0.0.2:80", "10.0.0.9:80"))
            await asyncio.to_thread(fake.start, "127.0.0.1", fake.port)
            started = time.monotonic()
            got = await seen.until(lambda s: "10.0.0.9:80" in hosts(s), timeout=3.0)
            assert time.monotonic() - started < 3.0
            # The leading remove was ignored and the first add *replaced* the set:
            # 10.0.0.3 (only in the old set) is gone, 10.0.0.2 is kept.
            assert hosts(got) == {"10.0.0.2:80", "10.0.0.9:80"}
            assert len(seen.sets) == delivered + 1
            # Later adds upsert again on the new stream.
            fake.push(WEB, add("10.0.0.10:80"))
            assert hosts(await seen.until(lambda s: len(s) == 3)) == {"10.0.0.2:80", "10.0.0.9:80", "10.0.0.10:80"}
        finally:
            watch.close()
            await client.close()

    run(scenario(), loop=loop)
    assert len(fake.calls(WEB)) == 2


def test_stream_ended_by_controller_reconnects(fake):
    fake.script(WEB, add("10.0.0.1:80"))

    async def scenario() -> None:
        client = make_client(fake.port)
        seen = Recorder()
        watch = client.watch(WEB, seen)
        try:
            await seen.until(bool)
            fake.script(WEB, add("10.0.0.2:80"))
            assert fake.end(WEB, grpc.StatusCode.UNAVAILABLE) == 1
            assert hosts(await seen.until(lambda s: "10.0.0.2:80" in hosts(s))) == {"10.0.0.2:80"}
            fake.script(WEB, no_endpoints(exists=True))
            assert fake.end(WEB) == 1  # a clean end (status OK) is re-opened too
            assert await seen.until(lambda s: s == ()) == ()
        finally:
            watch.close()
            await client.close()

    run(scenario())


def test_rejected_lookup_is_not_retried(fake):
    fake.reject(WEB, grpc.StatusCode.INVALID_ARGUMENT)

    async def scenario() -> None:
        client = make_client(fake.port)
        seen = Recorder()
        watch = client.watch(WEB, seen)
        try:
            assert await seen.until(lambda s: True) == ()
            assert watch.exists is False and watch.rejected is not None
            await asyncio.sleep(0.5)  # several backoff periods
        finally:
            watch.close()
            await client.close()

    run(scenario())
    assert len(fake.calls(WEB)) == 1


def test_watches_share_one_stream_and_close_ends_it(fake):
    fake.script(WEB, add("10.0.0.1:80"))

    async def scenario() -> None:
        client = make_client(fake.port)
        first, second = Recorder(), Recorder()
        w1 = client.watch(WEB, first)
        await first.until(bool)
        w2 = client.watch(WEB, second)  # joins the open stream and hears the current set
        assert hosts(await second.until(bool)) == {"10.0.0.1:80"}
        assert fake.open_streams(WEB) == 1 and client.watched == (WEB,)
        fake.push(WEB, add("10.0.0.2:80"))
        await first.until(lambda s: len(s) == 2)
        await second.until(lambda s: len(s) == 2)
        w1.close()
        fake.push(WEB, remove("10.0.0.1:80"))
        await second.until(lambda s: len(s) == 1)
        assert len(first.last) == 2  # a closed watch hears nothing more
        w2.close()  # the last watch: the stream is cancelled (idle eviction)
        assert client.watched == ()
        await eventually(lambda: fake.open_streams(WEB) == 0, timeout=3.0)
        await client.close()

    run(scenario())
    assert len(fake.calls(WEB)) == 1


def test_get_profile_decoding_and_updates(fake):
    target = "web.ns.svc.cluster.local:80"
    fake.script_profile(target, profile(
        routes=(
            route(path_match("/books/\\d+"), classes=(status_class(500, 599),), retryable=True, timeout=0.25,
                  labels={"route": "GET /books/{id}"}),
            route(method_match("POST")),
        ),
        budget=retry_budget(0.2, 10, 10),
        dst_overrides=(("web-v1.ns.svc.cluster.local:80", 900), ("web-v2.ns.svc.cluster.local:80", 100)),
        fqn="web.ns.svc.cluster.local",
    ))

    async def scenario() -> None:
        client = make_client(fake.port)
        seen = Recorder()
        watch = client.get_profile(target, seen)
        assert watch is not None
        try:
            p: Profile = await seen.until(lambda p: p is not None)
            assert p.fully_qualified_name == "web.ns.svc.cluster.local"
            books, post = p.routes
            assert books.is_retryable and books.timeout == pytest.approx(0.25)
            assert books.labels == (("route", "GET /books/{id}"),)
            assert books.classify(502) is True and books.classify(200) is None
            assert p.route_for("GET", "/books/7?page=2") is books and p.route_for("POST", "/x") is post
            assert p.route_for("GET", "/x") is None
            assert p.retry_budget is not None
            assert (p.retry_budget.retry_ratio, p.retry_budget.min_retries_per_second, p.retry_budget.ttl) == pytest.approx((0.2, 10, 10.0))
            assert [(d.authority, d.weight) for d in p.dst_overrides] == [
                ("web-v1.ns.svc.cluster.local:80", 900), ("web-v2.ns.svc.cluster.local:80", 100)]
            # A new message replaces the whole profile.
            fake.push_profile(target, profile(opaque=True))
            p2 = await seen.until(lambda p: p is not None and p.opaque_protocol)
            assert p2.routes == () and p2.retry_budget is None and p2.dst_overrides == ()
            assert watch.profile == p2
        finally:
            watch.close()
            await client.close()

    run(scenario())


def test_profile_only_for_allowed_targets(fake):
    fake.reject("10.1.2.3:80", kind="profile")

    async def scenario() -> None:
        client = make_client(fake.port, LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS="10.0.0.0/8")
        assert client.get_profile("example.com:80", Recorder()) is None  # not under svc.cluster.local.
        assert client.get_profile("192.168.1.1:80", Recorder()) is None  # not in the networks
        seen = Recorder()
        watch = client.get_profile("10.1.2.3:80", seen)  # allowed, but the controller refuses it
        assert watch is not None
        try:
            assert await seen.until(lambda p: True) is None  # no profile
            assert watch.resolved and watch.rejected is not None
        finally:
            watch.close()
            await client.close()

    run(scenario())
    assert [r.path for r in fake.requests] == ["10.1.2.3:80"]
