"""Inbound default authorization policies (ref 1.5, 3.6): who may connect when no policy
controller says otherwise.

  all-unauthenticated      anyone (Linkerd's default)
  all-authenticated        clients that proved an identity with mTLS
  cluster-unauthenticated  clients from LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS (any address when unset)
  cluster-authenticated    both of the above
  deny                     no one
  audit                    anyone, but what the policy would deny is counted (here: as allowed, with authz "audit")
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

POLICIES = ("all-unauthenticated", "all-authenticated", "cluster-unauthenticated", "cluster-authenticated", "deny", "audit")


def allows(policy: str, client_ip: str, client_id: str, cluster_networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    if policy in ("all-unauthenticated", "audit"):
        return True
    if policy == "deny":
        return False
    if policy.endswith("-authenticated") and not client_id:
        return False
    if policy.startswith("cluster-") and cluster_networks:
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(ip in net for net in cluster_networks)
    return True
