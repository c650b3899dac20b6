"""One frozen, typed configuration, parsed from a mapping (the environment).

Theory of operation: every variable the proxy reads is one row of ``VARIABLES``:
its name, its parser and its default, with a comment saying where the default
comes from (ref = shared/reference/linkerd2-proxy.md). ``parse()`` walks the
table once, collects *every* problem instead of stopping at the first one, and
returns a ``Config`` or raises ``ConfigError`` listing them all, so
``meshproxy run`` can exit 64 (EX_USAGE, as linkerd2-proxy does) naming each.

The parser takes a mapping, never ``os.environ`` directly, so tests need no
process environment. Syntax follows linkerd's ``env/types.rs``: durations are
an integer and a unit (``ms s m h d``), a bare ``0`` is allowed, no decimals;
port sets are ``25,587,4000-4100``; booleans are ``true``/``false``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

EX_USAGE = 64  # sysexits.h; linkerd2-proxy exits with it on bad configuration


class ConfigError(Exception):
    """Every problem found in one configuration, in the order of the table."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class Addr:
    """A socket address; ``host`` is an IP literal or a name, without brackets."""

    host: str
    port: int

    @property
    def family_is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# ---------------------------------------------------------------- value parsers
# Each takes the raw string and returns the typed value or raises ValueError
# with a message that says what was expected.

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(raw: str) -> float:
    """Linkerd duration syntax to seconds: ``10s``, ``300ms``, ``1m``, bare ``0``."""
    m = _DURATION.match(raw)
    if not m:
        raise ValueError(f"expected a duration such as 10s, 300ms or 1m, got {raw!r}")
    number, unit = int(m.group(1)), m.group(2)
    if unit is None:
        if number != 0:
            raise ValueError(f"a duration needs a unit (ms, s, m, h, d), got {raw!r}")
        return 0.0
    return number * _UNIT_SECONDS[unit]


def parse_addr(raw: str) -> Addr:
    """``host:port`` or ``[v6]:port``; the port must be 0..65535."""
    raw = raw.strip()
    m = re.match(r"^\[([^\]]+)\]:(\d+)$", raw) or re.match(r"^([^:\[\]]+):(\d+)$", raw)
    if not m:
        raise ValueError(f"expected host:port or [ipv6]:port, got {raw!r}")
    host, port = m.group(1), int(m.group(2))
    if port > 65535:
        raise ValueError(f"port {port} is out of range in {raw!r}")
    if raw.startswith("[") or ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address in {raw!r}") from None
    return Addr(host, port)


def parse_addrs(raw: str) -> tuple[Addr, ...]:
    """A comma list of addresses (outbound takes at most two, IPv4 and IPv6)."""
    addrs = tuple(parse_addr(part) for part in raw.split(",") if part.strip())
    if not addrs:
        raise ValueError("expected at least one address")
    return addrs


def parse_port_set(raw: str) -> frozenset[int]:
    """``25,587,4000-4100``; empty means no ports."""
    ports: set[int] = set()
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"expected ports or ranges such as 25,4000-4100, got {part!r}") from None
        if not (0 < first <= last <= 65535):
            raise ValueError(f"invalid port or range {part!r}")
        ports.update(range(first, last + 1))
    return frozenset(ports)


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def parse_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"expected a non-negative number, got {raw!r}")
    return value


def parse_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected a non-negative number, got {raw!r}")
    return value


def parse_networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for part in (p.strip() for p in raw.split(",")):
        if part:
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"expected CIDR networks such as 10.0.0.0/8, got {part!r}") from None
    return tuple(nets)


def parse_ips(raw: str) -> frozenset[str]:
    ips = set()
    for part in (p.strip() for p in raw.split(",")):
        if part:
            try:
                ips.add(str(ipaddress.ip_address(part)))
            except ValueError:
                raise ValueError(f"expected IP addresses, got {part!r}") from None
    return frozenset(ips)


def parse_list(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def parse_text(raw: str) -> str:
    return raw


def parse_log_filter(raw: str) -> str:
    # Imported here: log depends on nothing but config's position in the layering.
    from proxy.log import LogFilter

    LogFilter.parse(raw)  # raises ValueError naming the bad directive
    return raw.strip()


# ---------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True)
class Variable:
    env: str
    attr: str
    parse: Callable[[str], Any]
    default: Any


def V(env: str, attr: str, parse: Callable[[str], Any], default: Any) -> Variable:
    return Variable(env, attr, parse, default)


L = "LINKERD2_PROXY_"
M = "MESHPROXY_"
DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})  # chart proxy.opaquePorts: server-first protocols

VARIABLES: tuple[Variable, ...] = (
    # Listeners (ref 1.1). Inbound takes all redirected traffic, outbound only the app's own.
    V(L + "INBOUND_LISTEN_ADDR", "inbound_listen", parse_addr, Addr("0.0.0.0", 4143)),
    V(L + "OUTBOUND_LISTEN_ADDRS", "outbound_listen", parse_addrs, None),  # falls back to the legacy singular form
    V(L + "OUTBOUND_LISTEN_ADDR", "outbound_listen_legacy", parse_addr, Addr("127.0.0.1", 4140)),
    V(L + "ADMIN_LISTEN_ADDR", "admin_listen", parse_addr, Addr("127.0.0.1", 4191)),
    V(L + "CONTROL_LISTEN_ADDR", "control_listen", parse_addr, Addr("0.0.0.0", 4190)),
    # Timeouts (ref 1.5, 3.9): connect 300ms inbound (the app is local) and 1s outbound.
    V(L + "INBOUND_CONNECT_TIMEOUT", "inbound_connect_timeout", parse_duration, 0.3),
    V(L + "OUTBOUND_CONNECT_TIMEOUT", "outbound_connect_timeout", parse_duration, 1.0),
    V(L + "INBOUND_DETECT_TIMEOUT", "inbound_detect_timeout", parse_duration, 10.0),
    V(L + "OUTBOUND_DETECT_TIMEOUT", "outbound_detect_timeout", parse_duration, 10.0),
    V(L + "INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION", "inbound_opaque_ports", parse_port_set, DEFAULT_OPAQUE_PORTS),
    V(L + "INBOUND_PORTS", "inbound_ports", parse_port_set, frozenset()),
    V(L + "INBOUND_IPS", "inbound_ips", parse_ips, frozenset()),  # empty: accept any orig-dst IP
    # Queues and failfast (ref 3.9): 10000 deep; failfast 1s inbound, 3s outbound.
    V(L + "INBOUND_HTTP_QUEUE_CAPACITY", "inbound_http_queue_capacity", parse_int, 10000),
    V(L + "INBOUND_HTTP_FAILFAST_TIMEOUT", "inbound_http_failfast_timeout", parse_duration, 1.0),
    V(L + "OUTBOUND_HTTP_QUEUE_CAPACITY", "outbound_http_queue_capacity", parse_int, 10000),
    V(L + "OUTBOUND_HTTP_FAILFAST_TIMEOUT", "outbound_http_failfast_timeout", parse_duration, 3.0),
    V(L + "OUTBOUND_TCP_QUEUE_CAPACITY", "outbound_tcp_queue_capacity", parse_int, 10000),
    V(L + "OUTBOUND_TCP_FAILFAST_TIMEOUT", "outbound_tcp_failfast_timeout", parse_duration, 3.0),
    V(L + "INBOUND_MAX_IN_FLIGHT", "inbound_max_in_flight", parse_int, 100000),
    V(L + "OUTBOUND_MAX_IN_FLIGHT", "outbound_max_in_flight", parse_int, 100000),
    # Discovery caches: 5s outbound matches Kubernetes' DNS TTL; 90s inbound (ref 3.1).
    V(L + "OUTBOUND_DISCOVERY_IDLE_TIMEOUT", "outbound_discovery_idle_timeout", parse_duration, 5.0),
    V(L + "INBOUND_DISCOVERY_IDLE_TIMEOUT", "inbound_discovery_idle_timeout", parse_duration, 90.0),
    # Reconnect backoff (ref 1.5): inbound 100ms..10s, outbound 100ms..60s, jitter 0.1.
    V(L + "INBOUND_CONNECT_EXP_BACKOFF_MIN", "inbound_backoff_min", parse_duration, 0.1),
    V(L + "INBOUND_CONNECT_EXP_BACKOFF_MAX", "inbound_backoff_max", parse_duration, 10.0),
    V(L + "INBOUND_CONNECT_EXP_BACKOFF_JITTER", "inbound_backoff_jitter", parse_float, 0.1),
    V(L + "OUTBOUND_CONNECT_EXP_BACKOFF_MIN", "outbound_backoff_min", parse_duration, 0.1),
    V(L + "OUTBOUND_CONNECT_EXP_BACKOFF_MAX", "outbound_backoff_max", parse_duration, 60.0),
    V(L + "OUTBOUND_CONNECT_EXP_BACKOFF_JITTER", "outbound_backoff_jitter", parse_float, 0.1),
    # HTTP/1 pools: 3s idle, shorter than common server idle timeouts (users.md A4).
    V(L + "INBOUND_HTTP1_CONNECTION_POOL_IDLE_TIMEOUT", "inbound_http1_pool_idle_timeout", parse_duration, 3.0),
    V(L + "OUTBOUND_HTTP1_CONNECTION_POOL_IDLE_TIMEOUT", "outbound_http1_pool_idle_timeout", parse_duration, 3.0),
    V(L + "MAX_IDLE_CONNS_PER_ENDPOINT", "max_idle_conns_per_endpoint", parse_int, 10000),
    # HTTP/2 client windows (ref 1.5): stream 64 KiB - 1 (the h2 default), connection 1 MiB.
    V(L + "HTTP2_INITIAL_STREAM_WINDOW_SIZE", "http2_initial_stream_window", parse_int, 65535),
    V(L + "HTTP2_INITIAL_CONNECTION_WINDOW_SIZE", "http2_initial_connection_window", parse_int, 1048576),
    # HTTP/2 server settings per direction (ref 1.5); unset means the h2 library's default.
    *(
        V(f"{L}{d.upper()}_SERVER_HTTP2_{name}", f"{d}_server_http2_{name.lower()}", parser, None)
        for d in ("inbound", "outbound")
        for name, parser in (
            ("KEEP_ALIVE_INTERVAL", parse_duration),
            ("KEEP_ALIVE_TIMEOUT", parse_duration),
            ("MAX_CONCURRENT_STREAMS", parse_int),
            ("MAX_FRAME_SIZE", parse_int),
            ("MAX_HEADER_LIST_SIZE", parse_int),
            ("MAX_PENDING_ACCEPT_RESET_STREAMS", parse_int),
            ("MAX_SEND_BUF_SIZE", parse_int),
            ("INITIAL_STREAM_WINDOW_SIZE", parse_int),
            ("INITIAL_CONNECTION_WINDOW_SIZE", parse_int),
            ("ADAPTIVE_FLOW_CONTROL", parse_bool),
        )
    ),
    # A response timeout for every proxied HTTP request (until routes can set one; ref 10.2): unset = none.
    V(M + "HTTP_RESPONSE_TIMEOUT", "http_response_timeout", parse_duration, None),
    # Largest request or response head accepted (users.md A13): 64 KiB, beyond that 431.
    V(M + "HTTP_MAX_HEAD_SIZE", "http_max_head_size", parse_int, 64 * 1024),
    # Logs (ref 8): Linkerd's default filter; plain text unless asked for JSON.
    V(L + "LOG", "log_filter", parse_log_filter, "warn,linkerd=info,hickory=error"),
    V(L + "LOG_FORMAT", "log_format", one_of("plain", "json"), "plain"),
    V(L + "ACCESS_LOG", "access_log", one_of("apache", "json", ""), ""),
    # Identity (ref 5). Mandatory in Linkerd; the mTLS work reads these.
    V(L + "IDENTITY_DIR", "identity_dir", parse_text, ""),
    V(L + "IDENTITY_TOKEN_FILE", "identity_token_file", parse_text, ""),
    V(L + "IDENTITY_TRUST_ANCHORS", "identity_trust_anchors", parse_text, ""),
    V(L + "IDENTITY_LOCAL_NAME", "identity_local_name", parse_text, ""),
    V(L + "IDENTITY_SERVER_ID", "identity_server_id", parse_text, ""),
    V(L + "IDENTITY_SERVER_NAME", "identity_server_name", parse_text, ""),
    V(L + "IDENTITY_SVC_ADDR", "identity_svc_addr", parse_text, ""),
    V(L + "IDENTITY_SVC_NAME", "identity_svc_name", parse_text, ""),
    V(L + "IDENTITY_SPIRE_WORKLOAD_API_ADDRESS", "identity_spire_addr", parse_text, ""),
    # The deprecated name, still in Linkerd's mesh-expansion docs (ref 11.2); the new one wins.
    V(L + "IDENTITY_SPIRE_SOCKET", "identity_spire_socket", parse_text, ""),
    V(L + "IDENTITY_MIN_REFRESH", "identity_min_refresh", parse_duration, 10.0),  # ref 5.3
    V(L + "IDENTITY_MAX_REFRESH", "identity_max_refresh", parse_duration, 86400.0),
    # Control plane (ref 1.1, 6).
    V(L + "DESTINATION_SVC_ADDR", "destination_svc_addr", parse_text, ""),
    V(L + "DESTINATION_SVC_NAME", "destination_svc_name", parse_text, ""),
    V(L + "DESTINATION_CONTEXT", "destination_context", parse_text, ""),
    V(L + "DESTINATION_PROFILE_SUFFIXES", "destination_profile_suffixes", parse_list, ("svc.cluster.local.",)),
    V(L + "DESTINATION_PROFILE_NETWORKS", "destination_profile_networks", parse_networks, ()),
    V(L + "POLICY_SVC_ADDR", "policy_svc_addr", parse_text, ""),
    V(L + "POLICY_SVC_NAME", "policy_svc_name", parse_text, ""),
    V(L + "POLICY_WORKLOAD", "policy_workload", parse_text, ""),
    V(L + "POLICY_CLUSTER_NETWORKS", "policy_cluster_networks", parse_networks, ()),
    V(
        L + "INBOUND_DEFAULT_POLICY",
        "inbound_default_policy",
        one_of("deny", "all-authenticated", "all-unauthenticated", "cluster-authenticated", "cluster-unauthenticated", "audit"),
        "all-unauthenticated",  # Linkerd's default (it warns about it)
    ),
    # Shutdown (ref 9): 120s to drain; /shutdown off unless enabled (Jobs opt in).
    V(L + "SHUTDOWN_GRACE_PERIOD", "shutdown_grace_period", parse_duration, 120.0),
    V(L + "SHUTDOWN_ENDPOINT_ENABLED", "shutdown_endpoint_enabled", parse_bool, False),
    V(L + "METRICS_RETAIN_IDLE", "metrics_retain_idle", parse_duration, 600.0),  # 10 min (ref 7)
    V(L + "INGRESS_MODE", "ingress_mode", parse_bool, False),
    # DNS: getaddrinfo shows no TTL, so names are re-resolved every 5 s (Kubernetes' DNS TTL), clamped by these.
    V(L + "DNS_MIN_TTL", "dns_min_ttl", parse_duration, None),
    V(L + "DNS_MAX_TTL", "dns_max_ttl", parse_duration, None),
    # Workers (ref 1.2): one unless asked; the cgroup quota caps it.
    V(L + "CORES", "cores", parse_int, None),
    V(L + "CORES_MIN", "cores_min", parse_int, None),
    V(L + "CORES_MAX", "cores_max", parse_int, None),
    V(L + "CORES_MAX_RATIO", "cores_max_ratio", parse_float, None),
    # meshproxy extensions.
    V(M + "OUTBOUND_FALLBACK_ADDR", "outbound_fallback", parse_addr, None),  # target of non-redirected outbound connections
    V(M + "INBOUND_FALLBACK_ADDR", "inbound_fallback", parse_addr, None),  # target of non-redirected inbound connections
    # An opaque stream with no bytes either way for an hour is almost surely dead (keepalive-less NAT paths drop at 350s+).
    V(M + "TCP_IDLE_TIMEOUT", "tcp_idle_timeout", parse_duration, 3600.0),
    # One side sent FIN and nothing moved since: conntrack drops close-wait state after 60s (users.md A5).
    V(M + "TCP_HALF_CLOSED_TIMEOUT", "tcp_half_closed_timeout", parse_duration, 60.0),
    # Outbound ports relayed without detection. Linkerd's control plane marks the same server-first
    # ports opaque for every Service by default, so a meshed client never waits on them.
    V(M + "OUTBOUND_PORTS_DISABLE_PROTOCOL_DETECTION", "outbound_opaque_ports", parse_port_set, DEFAULT_OPAQUE_PORTS),
    V(M + "NO_EXTENSIONS", "no_extensions", parse_bool, False),
    V(M + "DISCOVERY_FILE", "discovery_file", parse_text, ""),
    V(M + "ZONE", "zone", parse_text, ""),
    V(M + "IDENTITY_CERT_FILE", "identity_cert_file", parse_text, ""),
    V(M + "IDENTITY_KEY_FILE", "identity_key_file", parse_text, ""),
    V(M + "IDENTITY_DISABLED", "identity_disabled", parse_bool, False),
)

KNOWN_NAMES = frozenset(v.env for v in VARIABLES) | {
    # Read by Linkerd but not (yet) by us; listed so they are not reported as unknown.
    L + "DESTINATION_PROFILE_INITIAL_TIMEOUT",
    L + "TAP_SVC_NAME",
    L + "INBOUND_GATEWAY_SUFFIXES",
}


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; built only by ``parse``."""

    values: Mapping[str, Any]
    outbound_listen: tuple[Addr, ...]
    workers: int
    unknown_variables: tuple[str, ...] = field(default=())

    def __getattr__(self, name: str) -> Any:
        # Slots hold the derived fields; everything else comes from the table.
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def env_value(self, env: str) -> Any:
        for var in VARIABLES:
            if var.env == env:
                return self.values[var.attr]
        raise KeyError(env)


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: affinity, capped by a cgroup (v2 or v1) CPU quota, rounded up."""
    cpus = len(os.sched_getaffinity(0))
    quota = None
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as f:
            q, period = f.read().split()
            if q != "max":
                quota = int(q) / int(period)
    except (OSError, ValueError):
        try:
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_quota_us")) as f:
                q_us = int(f.read())
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_period_us")) as f:
                p_us = int(f.read())
            if q_us > 0:
                quota = q_us / p_us
        except (OSError, ValueError):
            pass
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def worker_count(values: Mapping[str, Any], available: int) -> int:
    """Linkerd's rule (ref 1.2): CORES_MAX, or round(available x MAX_RATIO), or 1;
    then at least CORES_MIN (falling back to CORES); at most what is available."""
    if values["cores_max"] is not None:
        n = values["cores_max"]
    elif values["cores_max_ratio"] is not None:
        n = math.floor(available * values["cores_max_ratio"] + 0.5)  # Rust's f64::round: halves away from zero
    else:
        n = 1
    floor = values["cores_min"] if values["cores_min"] is not None else values["cores"]
    if floor is not None:
        n = max(n, floor)
    return max(1, min(n, available))


def flatten_toml(doc: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``[inbound] connect_timeout = "1s"`` -> ``INBOUND_CONNECT_TIMEOUT``; values as strings."""
    flat: dict[str, str] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}".upper().replace("-", "_")
        if isinstance(value, dict):
            flat.update(flatten_toml(value, name + "_"))
        elif isinstance(value, bool):
            flat[name] = "true" if value else "false"
        elif isinstance(value, list):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = str(value)
    return flat


def parse(env: Mapping[str, str], toml_text: str | None = None, cpus: int | None = None) -> Config:
    """Build the Config from ``env`` (and an optional TOML document whose values the
    environment overrides); raise ConfigError naming every problem."""
    problems: list[str] = []
    merged: dict[str, str] = {}
    if toml_text is not None:
        try:
            flat = flatten_toml(tomllib.loads(toml_text))
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"--config: not valid TOML: {exc}")
            flat = {}
        known_short = {v.env.removeprefix(L).removeprefix(M): v.env for v in VARIABLES}
        for key, value in flat.items():
            full = known_short.get(key.removeprefix("LINKERD2_PROXY_").removeprefix("MESHPROXY_"))
            if full is None:
                problems.append(f"--config: unknown key {key.lower()!r}")
            else:
                merged[full] = value
    merged.update(env)

    values: dict[str, Any] = {}
    for var in VARIABLES:
        raw = merged.get(var.env)
        if raw is None:
            values[var.attr] = var.default
            continue
        try:
            values[var.attr] = var.parse(raw)
        except ValueError as exc:
            problems.append(f"{var.env}: {exc}")
            values[var.attr] = var.default

    if values["inbound_backoff_jitter"] > 100 or values["outbound_backoff_jitter"] > 100:
        problems.append("CONNECT_EXP_BACKOFF_JITTER: must be at most 100")
    if values["identity_min_refresh"] > values["identity_max_refresh"]:
        problems.append(f"{L}IDENTITY_MIN_REFRESH: larger than {L}IDENTITY_MAX_REFRESH")
    if (cores_ratio := values["cores_max_ratio"]) is not None and not (0 < cores_ratio <= 1):
        problems.append(f"{L}CORES_MAX_RATIO: expected a ratio in (0, 1], got {cores_ratio}")

    if not values["identity_spire_addr"] and values["identity_spire_socket"]:
        values["identity_spire_addr"] = values["identity_spire_socket"]
    outbound = values["outbound_listen"] or (values["outbound_listen_legacy"],)
    if len(outbound) > 2:
        problems.append(f"{L}OUTBOUND_LISTEN_ADDRS: at most two addresses (one IPv4, one IPv6)")

    if problems:
        raise ConfigError(problems)

    unknown = tuple(sorted(k for k in env if k.startswith(L) and k not in KNOWN_NAMES))
    workers = worker_count(values, cpus if cpus is not None else available_cpus())
    return Config(values=values, outbound_listen=outbound, workers=workers, unknown_variables=unknown)
