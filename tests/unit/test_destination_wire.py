"""The destination API decoder against the real protobuf library, and the update
rules of ref 6.3 as a pure state machine (no sockets)."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.config import Addr
from proxy.discovery.destination import (
    Add,
    EndpointExtras,
    EndpointSet,
    NoEndpoints,
    ProfileAllowlist,
    Remove,
    decode_profile,
    decode_update,
    encode_get_destination,
)
from proxy.discovery.static import Endpoint
from tests.fakes.destination_service import (
    add,
    all_of,
    any_of,
    compile_protos,
    method_match,
    no_endpoints,
    not_,
    path_match,
    profile,
    remove,
    retry_budget,
    route,
    status_class,
    weighted_addr,
)

ID = "web.ns.serviceaccount.identity.linkerd.cluster.local"


def decode(update):
    return decode_update(update.SerializeToString())


def test_get_destination_matches_protobuf():
    pb = compile_protos().destination_pb2
    raw = encode_get_destination("web.ns.svc.cluster.local:80", '{"ns":"ns"}')
    parsed = pb.GetDestination.FromString(raw)
    assert (parsed.scheme, parsed.path, parsed.context_token) == ("", "web.ns.svc.cluster.local:80", '{"ns":"ns"}')
    assert raw == pb.GetDestination(path="web.ns.svc.cluster.local:80", context_token='{"ns":"ns"}').SerializeToString()


def test_add_ipv4_ipv6_labels_identity_hints():
    update = add(
        weighted_addr("10.1.2.3:8080", weight=7, identity=ID, hint="h2", labels={"pod": "web-1", "zone": "zone-a", "namespace": "override"}, resource="web-1"),
        weighted_addr("[fd00:1:2::ff]:9090", hint="opaque", opaque_port=4143, identity=ID, server_name="sni.example.org"),
        weighted_addr("0.0.0.0:1", weight=0),  # ipv4 = 0 is present in the oneof: still an address
        labels={"namespace": "ns", "service": "web"},
    )
    got = decode(update)
    assert isinstance(got, Add)
    (a, ax), (b, bx), (c, _) = got.endpoints
    assert a == Endpoint(Addr("10.1.2.3", 8080), 7, ID, "zone-a", "http2",
                         (("namespace", "override"), ("pod", "web-1"), ("service", "web"), ("zone", "zone-a")))
    assert ax == EndpointExtras(server_name=ID)
    assert b.addr == Addr("fd00:1:2::ff", 9090) and b.protocol == "opaque" and b.identity == ID
    assert b.labels == (("namespace", "ns"), ("service", "web"))
    assert bx == EndpointExtras(server_name="sni.example.org", opaque_transport_port=4143)
    assert b.opaque_transport_port == 4143 and a.opaque_transport_port == 0  # the data path reads it from the endpoint
    assert c.addr == Addr("0.0.0.0", 1) and c.weight == 1  # weight unset -> 1, not "never chosen"


def test_ipv6_halves_are_big_endian():
    net = compile_protos().net_pb2
    pb = compile_protos().destination_pb2
    value = int(ipaddress.IPv6Address("2001:db8::1"))
    tcp = net.TcpAddress(ip=net.IPAddress(ipv6=net.IPv6(first=value >> 64, last=value & (2**64 - 1))), port=443)
    got = decode_update(pb.Update(remove=pb.AddrSet(addrs=[tcp])).SerializeToString())
    assert got == Remove((Addr("2001:db8::1", 443),))


def test_tls_identity_rules():
    # URI identity without a server name: no TLS at all (linkerd pb.rs).
    (ep, extras), = decode(add(weighted_addr("10.0.0.1:80", uri_identity="spiffe://cluster.local/ns/web"))).endpoints
    assert ep.identity == "" and extras.server_name == ""
    # With one: the URI is the identity, the server name the SNI.
    (ep, extras), = decode(add(weighted_addr("10.0.0.1:80", uri_identity="spiffe://cluster.local/ns/web", server_name="web.ns"))).endpoints
    assert ep.identity == "spiffe://cluster.local/ns/web" and extras.server_name == "web.ns"
    # An invalid DNS-like name: no TLS.
    (ep, _), = decode(add(weighted_addr("10.0.0.1:80", identity="not a name"))).endpoints
    assert ep.identity == ""
    # An authority override is kept aside.
    (_, extras), = decode(add(weighted_addr("10.0.0.1:80", authority_override="web.ns.svc.cluster.local:80"))).endpoints
    assert extras.authority_override == "web.ns.svc.cluster.local:80"


def test_empty_and_invalid_updates_are_ignored():
    pb = compile_protos().destination_pb2
    assert decode(add()) is None  # an add with no address
    assert decode(pb.Update(add=pb.WeightedAddrSet(addrs=[pb.WeightedAddr(weight=3)]))) is None  # no addr
    assert decode(pb.Update()) is None
    assert decode(no_endpoints(False)) == NoEndpoints(False)
    assert decode(no_endpoints(True)) == NoEndpoints(True)


def ep(host: str, **kw) -> tuple[Endpoint, EndpointExtras]:
    return Endpoint(Addr(host, 80), **kw), EndpointExtras()


def hosts(s: EndpointSet) -> set[str]:
    return {e.addr.host for e in s.endpoints}


def test_endpoint_set_rules():
    s = EndpointSet()
    assert s.exists is None and not s.resolved
    assert not s.apply(Remove((Addr("10.0.0.1", 80),)))  # a stream cannot start with remove
    assert not s.resolved
    assert s.apply(Add((ep("10.0.0.1"), ep("10.0.0.2"))))
    assert hosts(s) == {"10.0.0.1", "10.0.0.2"} and s.exists
    assert s.apply(Add((ep("10.0.0.3"),)))  # later adds upsert
    assert hosts(s) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert not s.apply(Add((ep("10.0.0.3"),)))  # nothing changed: nobody hears of it
    assert s.apply(Add((ep("10.0.0.3", weight=5),)))  # metadata changed: replaced
    assert [e.weight for e in s.endpoints if e.addr.host == "10.0.0.3"] == [5]
    assert s.apply(Remove((Addr("10.0.0.1", 80),)))
    assert not s.apply(Remove((Addr("10.9.9.9", 80),)))
    assert hosts(s) == {"10.0.0.2", "10.0.0.3"}
    s.reconnected()  # the stream broke: the old set stays until the first message
    assert hosts(s) == {"10.0.0.2", "10.0.0.3"}
    assert not s.apply(Remove((Addr("10.0.0.2", 80),)))  # first after a reconnect: ignored
    assert s.apply(Add((ep("10.0.0.4"),)))  # first add after a reconnect: replaces
    assert hosts(s) == {"10.0.0.4"}
    assert s.apply(NoEndpoints(True))
    assert hosts(s) == set() and s.exists is True
    assert s.apply(NoEndpoints(False))  # same empty set, but now "does not exist"
    assert s.exists is False
    assert s.apply(Add((ep("10.0.0.5"),)))
    assert hosts(s) == {"10.0.0.5"} and s.exists is True
    s.reconnected()
    assert s.apply(NoEndpoints(True)) and hosts(s) == set()


def test_profile_decoding():
    pb_profile = profile(
        routes=(
            route(all_of(method_match("GET"), path_match("/books/\\d+")), classes=(status_class(500, 599),),
                  labels={"route": "books"}, retryable=True, timeout=1.5),
            route(any_of(method_match("POST"), method_match("PURGE")), classes=(status_class(404, failure=False),)),
            route(not_(path_match("^/healthz$"))),
            route(path_match("([")),  # invalid regex: the route is dropped
        ),
        budget=retry_budget(0.25, 5, 20),
        dst_overrides=(("web-v1.ns.svc.cluster.local:80", 80), ("web-v2.ns.svc.cluster.local:80", 20), ("zero:80", 0)),
        fqn="web.ns.svc.cluster.local",
        endpoint=weighted_addr("10.0.0.7:80", identity=ID),
    )
    p = decode_profile(pb_profile.SerializeToString())
    assert p.fully_qualified_name == "web.ns.svc.cluster.local" and not p.opaque_protocol
    assert len(p.routes) == 3 and p.overrides_policy
    books, post, not_health = p.routes
    assert books.is_retryable and books.timeout == pytest.approx(1.5) and books.labels == (("route", "books"),)
    assert books.classify(503) is True and books.classify(200) is None
    assert post.classify(404) is False
    assert p.route_for("GET", "/books/12") is books
    assert p.route_for("GET", "/books/12/x") is not_health  # anchored: /books/\d+ does not match a longer path
    assert p.route_for("PURGE", "/healthz") is post
    assert p.route_for("GET", "/healthz") is None  # the implicit default route
    assert p.retry_budget is not None
    assert (p.retry_budget.retry_ratio, p.retry_budget.min_retries_per_second, p.retry_budget.ttl) == (0.25, 5, 20.0)
    assert [(d.authority, d.weight) for d in p.dst_overrides] == [("web-v1.ns.svc.cluster.local:80", 80), ("web-v2.ns.svc.cluster.local:80", 20)]
    assert p.endpoint is not None and p.endpoint.addr == Addr("10.0.0.7", 80) and p.endpoint.identity == ID


@pytest.mark.parametrize("ratio,ttl", [(2000.0, 10.0), (0.2, 0.5), (0.2, 61.0)])
def test_invalid_retry_budgets_are_no_budget(ratio, ttl):
    p = decode_profile(profile(budget=retry_budget(ratio, 10, ttl)).SerializeToString())
    assert p.retry_budget is None


def test_empty_profile_and_opaque():
    p = decode_profile(profile(opaque=True).SerializeToString())
    assert p.opaque_protocol and not p.routes and p.retry_budget is None and not p.overrides_policy


def test_profile_allowlist():
    default = ProfileAllowlist(("svc.cluster.local.",), ())
    assert default.allows("web.ns.svc.cluster.local:80")
    assert default.allows("WEB.NS.SVC.CLUSTER.LOCAL.:80")
    assert not default.allows("web.ns.notsvc.cluster.local.example:80")
    assert not default.allows("xsvc.cluster.local:80")  # suffixes end on a label boundary
    assert not default.allows("10.1.1.1:80")  # IPs only by network
    nets = ProfileAllowlist(("svc.cluster.local.",), (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")))
    assert nets.allows("10.1.1.1:80") and nets.allows("[fd00::1]:80")
    assert not nets.allows("192.168.1.1:80")
    root = ProfileAllowlist((".",), ())
    assert root.allows("example.com:443") and not root.allows("10.0.0.1:80")
    with pytest.raises(ValueError):
        root.allows("no-port")


def test_remove_ignores_invalid_addresses():
    net = compile_protos().net_pb2
    pb = compile_protos().destination_pb2
    bad = net.TcpAddress(port=80)  # no ip
    good = remove("10.0.0.1:80").remove.addrs[0]
    assert decode(pb.Update(remove=pb.AddrSet(addrs=[bad, good]))) == Remove((Addr("10.0.0.1", 80),))
    assert decode(pb.Update(remove=pb.AddrSet(addrs=[bad]))) is None
