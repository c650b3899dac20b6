"""The standalone discovery file's ``opaque_transport_port`` (ref 3.7): parsed, and checked."""

from __future__ import annotations

import pytest

from proxy.config import Addr
from proxy.discovery.static import parse_table

SERVICE = '[[services]]\nauthority = "db.default.svc.cluster.local"\nport = 5432\n[[services.endpoints]]\naddr = "10.0.0.7:5432"\n'


def test_a_meshed_endpoint_keeps_its_transport_port():
    table = parse_table(SERVICE + 'identity = "db.default.serviceaccount.identity.linkerd.cluster.local"\n'
                        'protocol = "opaque"\nopaque_transport_port = 4143\n')
    ep = table.by_endpoint[Addr("10.0.0.7", 5432)]
    assert ep.opaque_transport_port == 4143 and ep.protocol == "opaque"


def test_the_transport_port_defaults_to_none():
    assert parse_table(SERVICE).by_endpoint[Addr("10.0.0.7", 5432)].opaque_transport_port == 0


@pytest.mark.parametrize(("extra", "problem"), [
    ('opaque_transport_port = 4143\n', "needs an identity"),
    ('identity = "x"\nopaque_transport_port = 70000\n', "expected a port number"),
    ('identity = "x"\nopaque_transport_port = "4143"\n', "expected a port number"),
])
def test_bad_transport_ports_are_listed(extra, problem):
    with pytest.raises(ValueError, match=problem):
        parse_table(SERVICE + extra)
