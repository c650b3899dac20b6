"""Scenarios: a backend, the paths to it, one bounded load per path.

A scenario is a small class: which backend it starts, which *paths* it measures (direct,
meshproxy 1 worker / N workers / pure-Python twin, haproxy, nginx), and how it loads one
port. ``Scenario.run`` does the rest for every scenario alike: skip a path with a reason
(peer not installed, feature not built yet), start the proxy, warm up, meter the proxy's
process tree, the backend and the machine while the load runs, stop the proxy.

To add one (gRPC unary, streaming): subclass ``Scenario``, set
its names and units, write ``backend``/``paths``/``load``, and add it to ``SCENARIOS``.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

from . import loads, servers
from .loads import LoadError, LoadResult
from .procs import MachineMeter, TreeMeter, TreeUsage
from .servers import Env, Server

# Scenario defaults (seconds). Full values follow peers-bench (iperf3 5 s; wrk/h2load 10 s
# after a 2 s warm-up); quick values (no warm-up) keep `--quick` under a minute.
FULL = {"iperf": 5.0, "http": 10.0, "churn": 10.0, "latency": 10.0, "warmup": 2.0}
QUICK = {"iperf": 2.0, "http": 2.0, "churn": 2.0, "latency": 2.0, "warmup": 0.0}
# Churn: at most this many connections per run (the time bound usually ends it first).
CHURN_BUDGET_FULL = 300_000
CHURN_BUDGET_QUICK = 30_000
# Concurrent connections: wrk keep-alive as in peers-bench; churn a little lower so the
# TIME_WAIT sockets of a 10 s run stay far from the ephemeral port range (28k ports).
H1_CONNECTIONS = 50
CHURN_CONNECTIONS = 32
H2_CLIENTS, H2_STREAMS = 10, 10
# h1-latency: the rate ("at most 1 ms of added p99 latency at 1,000 RPS"), paced by
# wrk's delay() hook over 10 connections: each carries a request every ~10 ms and is idle
# most of the time (sub-ms latency), so a request never queues behind a busy connection.
LATENCY_RATE = 1000.0  # req/s
LATENCY_CONNECTIONS = 10
LATENCY_ADDED_P99_MAX_MS = 1.0
# Even with --quick (no warm-up elsewhere): the first requests open the proxy's upstream
# connections, and at ~2,000 requests in all those few would already be the p99.
LATENCY_WARMUP_MIN_S = 1.0

HTTP_ENV = "MESHPROXY_BENCH_HTTP"
# A meshproxy with no connections left should exit at once on SIGTERM; slower is noted.
SLOW_STOP_S = 1.0
# Log lines the bench itself causes, not worth a note: the plaintext warning.
EXPECTED_LOG = re.compile(r"identity is disabled")


@dataclass
class Ctx:
    env: Env
    quick: bool = False
    duration: float | None = None  # overrides every load's duration
    repeat: int = 1
    workers: int = 1  # N for the "meshproxy Nw" rows
    http_enabled: bool = False  # MESHPROXY_BENCH_HTTP=1: meshproxy HTTP rows are measured
    log: Callable[[str], None] = print

    def seconds(self, kind: str) -> float:
        if self.duration is not None:
            return self.duration
        return (QUICK if self.quick else FULL)[kind]

    def warmup(self) -> float:
        return (QUICK if self.quick else FULL)["warmup"]


@dataclass
class Row:
    scenario: str
    label: str
    kind: str  # direct | meshproxy | haproxy | nginx
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Rounds that failed: {"round", "reason", "log_tail"}; the row keeps its good rounds.
    failures: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- paths


@dataclass
class Path:
    """One way from the load generator to the backend port named ``upstream``."""

    label: str
    kind: str
    upstream: str

    def skip_reason(self, ctx: Ctx) -> str | None:
        return None

    def start(self, ctx: Ctx, upstream_port: int) -> ContextManager[Server | None]:
        return contextlib.nullcontext(None)

    def start_with(self, ctx: Ctx, backend: Server) -> ContextManager[Server | None]:
        """Start this path's proxy in front of ``backend``; a path that needs more than
        the one port named ``upstream`` (many endpoints) overrides this."""
        return self.start(ctx, backend.ports[self.upstream])


def Direct(upstream: str) -> Path:  # noqa: N802 - reads like the other path classes
    """No proxy: the base Path starts nothing and loads the backend port itself."""
    return Path("direct", "direct", upstream)


@dataclass
class Meshproxy(Path):
    workers: int = 1
    pure: bool = False
    # False: the backend port is opaque (no protocol detection), the TCP scenarios.
    # True: detection on, HTTP is served by the HTTP stage (a later feature): gated.
    http: bool = False

    def skip_reason(self, ctx: Ctx) -> str | None:
        if self.http and not ctx.http_enabled:
            return f"turned off with {HTTP_ENV}=0"
        return None

    def start(self, ctx: Ctx, upstream_port: int) -> ContextManager[Server | None]:
        return servers.meshproxy(
            ctx.env, upstream_port, self.workers, self.pure, opaque=not self.http
        )


@dataclass
class Haproxy(Path):
    mode: str = "tcp"
    front_proto: str = "h1"

    def skip_reason(self, ctx: Ctx) -> str | None:
        return None if servers.installed("haproxy") else "haproxy not installed"

    def start(self, ctx: Ctx, upstream_port: int) -> ContextManager[Server | None]:
        return servers.haproxy(ctx.env, upstream_port, self.mode, self.front_proto)


@dataclass
class NginxProxy(Path):
    front_proto: str = "h1"

    def skip_reason(self, ctx: Ctx) -> str | None:
        return None if servers.installed("nginx") else "nginx not installed"

    def start(self, ctx: Ctx, upstream_port: int) -> ContextManager[Server | None]:
        return servers.nginx_proxy(ctx.env, upstream_port, self.front_proto)


@dataclass
class MeshproxyPair(Path):
    """Two meshproxies in a row (client outbound -> server inbound), plaintext or mTLS."""

    mtls: bool = False
    http: bool = True  # False: the client marks the port opaque (TCP scenarios)

    def skip_reason(self, ctx: Ctx) -> str | None:
        if self.http and not ctx.http_enabled:
            return f"turned off with {HTTP_ENV}=0"
        return None

    def start(self, ctx: Ctx, upstream_port: int) -> ContextManager[Server | None]:
        return servers.meshproxy_pair(ctx.env, upstream_port, self.mtls, opaque=not self.http)


@dataclass
class HaproxyTlsPair(Path):
    """Two haproxies in a row with TLS 1.3 between them: what C does on the same hops."""

    def skip_reason(self, ctx: Ctx) -> str | None:
        return None if servers.installed("haproxy") else "haproxy not installed"

    def start(self, ctx: Ctx, upstream_port: int) -> ContextManager[Server | None]:
        return servers.haproxy_tls_pair(ctx.env, upstream_port)


@dataclass
class MeshproxyBalanced(Path):
    """One meshproxy whose fallback address is a service VIP of the discovery file, with
    ``endpoints`` endpoints: the backend's ports ep0..ep{n-1}, balanced per request."""

    endpoints: int = 1

    def skip_reason(self, ctx: Ctx) -> str | None:
        return None if ctx.http_enabled else f"turned off with {HTTP_ENV}=0"

    def start_with(self, ctx: Ctx, backend: Server) -> ContextManager[Server | None]:
        vip = ctx.env.ports.take()  # never listened on: the proxy connects to endpoints
        disco = ctx.env.tmp / f"discovery-{self.endpoints}ep-{vip}.toml"
        eps = "".join(
            f'[[services.endpoints]]\naddr = "127.0.0.1:{backend.ports[f"ep{i}"]}"\n'
            for i in range(self.endpoints)
        )
        disco.write_text(
            '[[services]]\nauthority = "web.bench.svc.cluster.local"\nport = 80\n'
            f'vip = "127.0.0.1:{vip}"\n{eps}'
        )
        return servers.meshproxy(
            ctx.env, vip, 1, extra_env={"MESHPROXY_DISCOVERY_FILE": str(disco)}
        )


def meshproxy_rows(ctx: Ctx, upstream: str, http: bool) -> list[Path]:
    n = ctx.workers
    return [
        Meshproxy("meshproxy 1w", "meshproxy", upstream, workers=1, http=http),
        Meshproxy(f"meshproxy {n}w", "meshproxy", upstream, workers=n, http=http),
        Meshproxy("meshproxy 1w pure", "meshproxy", upstream, workers=1, pure=True, http=http),
    ]


# --------------------------------------------------------------------------- scenarios


class Scenario:
    name = ""
    family = ""  # rows of one family share a Markdown table
    title = ""
    unit = ""  # of the throughput column
    cost_unit = ""  # of the CPU cost column
    tools: tuple[str, ...] = ()
    concurrency = 1  # connections the load keeps open at once
    # At least this many rounds when not --quick (a noisy figure needs a true median).
    min_repeat = 1
    # Which run of a row is reported: the one with the median of this figure.
    median_by = "throughput"
    # More columns of this scenario's Markdown table: (header, metrics key, "x" | "us" | "split").
    extra_columns: tuple[tuple[str, str, str], ...] = ()
    # The PNG's lower chart: proxy CPU cost relative to this (metrics key, its label).
    cost_ref: tuple[str, str] = ("cost_x_haproxy", "haproxy")
    # The PNG's upper chart, when not throughput / direct: (ratio key, absolute key, title).
    top_chart: tuple[str, str, str] | None = None
    rows: list[Row]  # set by run(), filled in as rows are measured
    # Requirement checks, filled in by derive(): {"requirement", "figure", "pass"}
    # (pass None: not measured, or informational).
    checks: list[dict[str, Any]] = []  # derive() assigns a new list

    def backend(self, ctx: Ctx) -> ContextManager[Server]:
        raise NotImplementedError

    def paths(self, ctx: Ctx) -> list[Path]:
        raise NotImplementedError

    def warmup(self, ctx: Ctx, port: int) -> None:
        """Load run before metering (connection pools, caches); default none."""

    def load(self, ctx: Ctx, port: int) -> LoadResult:
        raise NotImplementedError

    def cost(self, cpu_s: float, res: LoadResult) -> float | None:
        """CPU ms per 1,000 requests/connections; throughput scenarios override."""
        return cpu_s * 1e6 / res.units if res.units else None

    def check_counters(self, run: dict[str, Any]) -> str | None:
        """A note when meshproxy's own counters disagree with the load tool."""
        c = run.get("proxy_counters")
        if c is None:
            return "GET /metrics failed after the load"
        # A load generator that stops mid-flight resets the connections it still has open
        # (warm-up and measured run: twice); more resets than that are the proxy's doing.
        if c["closed_with_errno"] > 2 * 2 * self.concurrency:  # x2: both sides count
            errs = ", ".join(f"{k} x{v:.0f}" for k, v in sorted(c.get("errnos", {}).items()))
            return f"{c['closed_with_errno']:.0f} connection(s) closed with an errno ({errs})"
        return None

    def derive(self, rows: list[Row]) -> None:
        """Figures across rows (after report.add_ratios) and requirement checks."""
        self.checks = []

    def summary_figures(self, m: dict[str, Any]) -> str:
        """More figures of a reported row for the console summary; default none."""
        return ""

    def rounds(self, ctx: Ctx) -> int:
        return ctx.repeat if ctx.quick else max(ctx.repeat, self.min_repeat)

    def missing_tool(self) -> str | None:
        for tool in self.tools:
            if not servers.installed(tool):
                return tool
        return None

    # The same loop for every scenario.
    def run(self, ctx: Ctx) -> list[Row]:
        paths = self.paths(ctx)
        missing = self.missing_tool()
        if missing:
            ctx.log(f"{self.name}: skipped ({missing} not installed)")
            return [
                Row(self.name, p.label, p.kind, "skipped", f"{missing} not installed")
                for p in paths
            ]
        rows = [Row(self.name, p.label, p.kind) for p in paths]
        for path, row in zip(paths, rows, strict=True):
            reason = path.skip_reason(ctx)
            if reason:
                row.status, row.reason = "skipped", reason
                ctx.log(f"{self.name}: {path.label}: skipped: {reason}")
        self.rows = rows  # what was measured survives an interruption
        try:
            with self.backend(ctx) as backend:
                # Rounds: every path once per round, so a burst of background load on this
                # shared machine hits one round of all rows rather than all rounds of one row.
                for rnd in range(self.rounds(ctx)):
                    for path, row in zip(paths, rows, strict=True):
                        if row.status == "ok":
                            self._run_path(ctx, backend, path, row, rnd)
        finally:
            for row in rows:
                if row.status != "ok":
                    continue
                if not row.runs and row.failures:
                    row.status, row.reason = "error", row.failures[0]["reason"]
                elif not row.runs:
                    row.status, row.reason = "skipped", "not measured (run interrupted)"
                else:
                    row.metrics = median_run(row.runs, self.median_by)
                    row.metrics["failed_rounds"] = len(row.failures)
                    if len(row.runs) > 1:
                        row.metrics["throughput_runs"] = [r["throughput"] for r in row.runs]
                        row.metrics["cpu_cost_runs"] = [r["cpu_cost"] for r in row.runs]
        return rows

    def _run_path(self, ctx: Ctx, backend: Server, path: Path, row: Row, rnd: int) -> None:
        """Start the path's proxy, warm up, measure once, stop it. A failure is recorded
        with the proxy's log tail; the path is tried again in the next round."""
        started: Server | None = None
        try:
            with path.start_with(ctx, backend) as proxy:
                started = proxy
                port = proxy.ports["front"] if proxy else backend.ports[path.upstream]
                self.warmup(ctx, port)
                run = self._measure(ctx, backend, proxy, port)
                run["round"] = rnd + 1
                if proxy is not None and "admin" in proxy.ports:
                    run["proxy_name"] = proxy.name
                    run["proxy_counters"] = servers.meshproxy_counters(proxy.ports["admin"])
                    if "server_admin" in proxy.ports:  # a pair: the server proxy's too
                        run["server_proxy_counters"] = servers.meshproxy_counters(
                            proxy.ports["server_admin"]
                        )
                    note = self.check_counters(run)
                    if note and note not in row.notes:
                        row.notes.append(note)
                        ctx.log(f"{self.name}: {path.label}: note: {note}")
                row.runs.append(run)
                ctx.log(
                    f"{self.name}: {path.label}{f' #{rnd + 1}' if self.rounds(ctx) > 1 else ''}: {self.describe(run)}"
                )
        except (LoadError, RuntimeError, OSError) as e:
            reason = str(e).strip() or repr(e)
            tail = "\n".join(p.log_tail(30) for p in started.procs) if started else ""
            row.failures.append({"round": rnd + 1, "reason": reason, "log_tail": tail})
            ctx.log(f"{self.name}: {path.label} #{rnd + 1}: ERROR: {reason.splitlines()[0]}")
        if started is not None:  # stopped by now: its whole log and its exit are known
            for note in proxy_notes(started):
                if note not in row.notes:
                    row.notes.append(note)
                    ctx.log(f"{self.name}: {path.label}: note: {note}")

    def _measure(
        self, ctx: Ctx, backend: Server, proxy: Server | None, port: int
    ) -> dict[str, Any]:
        with (
            TreeMeter(proxy.pids if proxy else []) as pm,
            TreeMeter(backend.pids) as bm,
            MachineMeter() as mm,
        ):
            res = self.load(ctx, port)
        f = self.figures(res, pm.usage() if proxy else None, bm.usage(), mm.busy_cores(), proxy)
        if proxy is not None and len(proxy.procs) > 1:
            # Several proxies on one path (a pair): the CPU of each, and its cost.
            by_root = pm.cpu_by_root()
            f["proxy_cpu_s_by_proc"] = {p.name: by_root.get(p.pid, 0.0) for p in proxy.procs}
            f["cpu_cost_by_proc"] = {
                p.name: self.cost(by_root.get(p.pid, 0.0), res) for p in proxy.procs
            }
        return f

    def figures(
        self,
        res: LoadResult,
        proxy: TreeUsage | None,
        backend: TreeUsage,
        busy: float,
        server: Server | None,
    ) -> dict[str, Any]:
        f: dict[str, Any] = {
            "throughput": res.rate,
            "unit": self.unit,
            "p50_ms": res.p50_ms,
            "p99_ms": res.p99_ms,
            "p999_ms": res.p999_ms,
            "errors": res.errors,
            "units": res.units,
            "seconds": res.seconds,
            "machine_busy_cores": busy,
            "backend_cpu_s": backend.cpu_s,
            "backend_cost": self.cost(backend.cpu_s, res),
            "backend_peak_rss_mb": backend.peak_rss_mb,
            "proxy_cpu_s": None,
            "cpu_cost": None,
            "cost_unit": self.cost_unit,
            "proxy_cpu_util": None,
            "peak_rss_mb": None,
            "proxy_procs": None,
            "proxy_alive_after": None,
            "tool": res.raw,
        }
        if proxy is not None and server is not None:
            f.update(
                proxy_cpu_s=proxy.cpu_s,
                cpu_cost=self.cost(proxy.cpu_s, res),
                # over the measured seconds: a churn run that met its budget idles after it
                proxy_cpu_util=proxy.cpu_s / res.seconds if res.seconds else None,
                peak_rss_mb=proxy.peak_rss_mb,
                proxy_procs=proxy.max_procs,
                proxy_alive_after=all(p.alive() for p in server.procs),
            )
        return f

    def describe(self, run: dict[str, Any]) -> str:
        parts = [f"{run['throughput']:,.{3 if self.unit == 'Gbit/s' else 0}f} {self.unit}"]
        if run["p99_ms"] is not None:
            parts.append(f"p50 {run['p50_ms']:.2f} ms p99 {run['p99_ms']:.2f} ms")
        if run["proxy_cpu_s"] is not None:
            parts.append(
                f"proxy CPU {run['proxy_cpu_s']:.2f} s ({run['cpu_cost']:.2f} {self.cost_unit})"
            )
            if run.get("cpu_cost_by_proc"):
                split = " + ".join(f"{c:.2f}" for c in run["cpu_cost_by_proc"].values())
                parts.append(f"= {split} (client + server)")
            parts.append(f"RSS {run['peak_rss_mb']:.1f} MB")
        if run["errors"]:
            parts.append(f"{run['errors']} errors")
        if run["proxy_alive_after"] is False:
            parts.append("PROXY DIED")
        return ", ".join(parts)


def median_run(runs: list[dict[str, Any]], by: str = "throughput") -> dict[str, Any]:
    """The run with the median ``by`` figure (the lower middle one for an even count);
    throughput when some run lacks that figure (a direct row has no proxy CPU)."""
    if not runs:
        return {}
    if any(r.get(by) is None for r in runs):
        by = "throughput"
    ordered = sorted(runs, key=lambda r: r[by])
    med = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        med["throughput_stdev"] = statistics.pstdev(r["throughput"] for r in runs)
    return med


def proxy_notes(server: Server, limit: int = 3) -> list[str]:
    """What looked odd about a meshproxy run: log lines that look like trouble, an exit
    other than 0 after SIGTERM, a slow stop."""
    if not server.name.startswith("meshproxy"):
        return []
    out = []
    for proc in server.procs:
        # Several proxies on one path (a pair): say which one.
        who = f"{proc.name}: " if len(server.procs) > 1 else ""
        if proc.exit_code not in (0, None):
            out.append(f"{who}exit code {proc.exit_code} (expected 0 after SIGTERM)")
        if proc.stop_s > SLOW_STOP_S:
            out.append(f"{who}took {proc.stop_s:.1f} s to exit after SIGTERM")
        try:
            lines = proc.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        bad = [
            ln.strip()
            for ln in lines
            if re.search(r"Traceback|ERROR|WARN|[Ee]rror|[Ww]arn", ln)
            and not EXPECTED_LOG.search(ln)
        ]
        if bad:
            # Times and PIDs vary per run; without them equal notes collapse to one.
            sample = " | ".join(re.sub(r"^\[\s*[\d.]+s\]\s*", "", ln) for ln in bad[:limit])
            out.append(f"{who}{len(bad)} warning/error log line(s), e.g.: {sample[:500]}")
    return out


class TcpThroughput(Scenario):
    name = "tcp-throughput"
    family = "tcp"
    title = "Opaque TCP throughput (iperf3, 1 stream)"
    unit = "Gbit/s"
    cost_unit = "s/GB"
    tools = ("iperf3",)
    concurrency = 2  # iperf3: control + 1 data stream

    def backend(self, ctx: Ctx) -> ContextManager[Server]:
        return servers.iperf3_server(ctx.env)

    def paths(self, ctx: Ctx) -> list[Path]:
        return [
            Direct("iperf"),
            *meshproxy_rows(ctx, "iperf", http=False),
            Haproxy("haproxy tcp", "haproxy", "iperf"),
        ]

    def load(self, ctx: Ctx, port: int) -> LoadResult:
        return loads.iperf3(port, ctx.seconds("iperf"), cpus=ctx.env.load_cpus)

    def cost(self, cpu_s: float, res: LoadResult) -> float | None:
        # CPU seconds per GB relayed (units = bytes received by the iperf3 server).
        return cpu_s / (res.units / 1e9) if res.units else None


class TcpChurn(Scenario):
    """Short connections: connect, one small request, one small reply, close.

    wrk sends `Connection: close`; nginx answers "ok" and closes, wrk reconnects. The proxy
    sees opaque TCP: accept, connect upstream, relay ~100 bytes each way, two closes.
    Bounded by time and by a connection budget (a wrk Lua hook stops the thread).
    """

    name = "tcp-churn"
    family = "tcp"
    title = "Connection churn (wrk, Connection: close, opaque TCP)"
    unit = "conn/s"
    cost_unit = "ms/1k conn"
    tools = ("wrk", "nginx")
    concurrency = CHURN_CONNECTIONS

    def backend(self, ctx: Ctx) -> ContextManager[Server]:
        return servers.nginx_backend(ctx.env)

    def paths(self, ctx: Ctx) -> list[Path]:
        return [
            Direct("h1"),
            *meshproxy_rows(ctx, "h1", http=False),
            # The same short HTTP/1 connections with detection on: the HTTP stage's cost
            # per connection (accept, detect, parse, connect, close).
            Meshproxy("meshproxy 1w http", "meshproxy", "h1", workers=1, http=True),
            Haproxy("haproxy tcp", "haproxy", "h1"),
        ]

    def load(self, ctx: Ctx, port: int) -> LoadResult:
        budget = CHURN_BUDGET_QUICK if ctx.quick else CHURN_BUDGET_FULL
        script = loads.wrk_script(ctx.env.tmp / "wrk-churn.lua", budget_per_thread=budget)
        return loads.wrk(
            f"http://127.0.0.1:{port}/",
            ctx.seconds("churn"),
            script,
            connections=CHURN_CONNECTIONS,
            headers=("Connection: close",),
            cpus=ctx.env.load_cpus,
        )

    def check_counters(self, run: dict[str, Any]) -> str | None:
        note = super().check_counters(run)
        c = run.get("proxy_counters")
        if note is None and c is not None and c["accepted"] < 0.9 * run["units"]:
            note = f"proxy counted {c['accepted']:.0f} accepted connections, wrk {run['units']:.0f}"
        return note


class H1KeepAlive(Scenario):
    name = "h1-keepalive"
    family = "http"
    title = "HTTP/1.1 keep-alive (wrk -t1 -c50)"
    unit = "req/s"
    cost_unit = "ms/1k req"
    tools = ("wrk", "nginx")
    concurrency = H1_CONNECTIONS

    def backend(self, ctx: Ctx) -> ContextManager[Server]:
        return servers.nginx_backend(ctx.env)

    def paths(self, ctx: Ctx) -> list[Path]:
        return [
            Direct("h1"),
            *meshproxy_rows(ctx, "h1", http=True),
            Haproxy("haproxy http", "haproxy", "h1", mode="http"),
            NginxProxy("nginx http", "nginx", "h1"),
        ]

    def _wrk(self, ctx: Ctx, port: int, seconds: float) -> LoadResult:
        script = loads.wrk_script(ctx.env.tmp / "wrk-summary.lua")
        return loads.wrk(
            f"http://127.0.0.1:{port}/",
            seconds,
            script,
            connections=H1_CONNECTIONS,
            cpus=ctx.env.load_cpus,
        )

    def warmup(self, ctx: Ctx, port: int) -> None:
        if ctx.warmup() > 0:
            self._wrk(ctx, port, ctx.warmup())

    def load(self, ctx: Ctx, port: int) -> LoadResult:
        return self._wrk(ctx, port, ctx.seconds("http"))


class H2c(Scenario):
    name = "h2c"
    family = "http"
    title = "HTTP/2 cleartext, prior knowledge (h2load -c10 -m10)"
    unit = "req/s"
    cost_unit = "ms/1k req"
    tools = ("h2load", "nginx")
    concurrency = H2_CLIENTS

    def backend(self, ctx: Ctx) -> ContextManager[Server]:
        return servers.nginx_backend(ctx.env)

    def paths(self, ctx: Ctx) -> list[Path]:
        # meshproxy keeps h2 to an h2 upstream; the peers translate h2c -> HTTP/1.1 as in peers-bench.
        return [
            Direct("h2c"),
            *meshproxy_rows(ctx, "h2c", http=True),
            Haproxy("haproxy http h2c->h1", "haproxy", "h1", mode="http", front_proto="h2"),
            NginxProxy("nginx http h2c->h1", "nginx", "h1", front_proto="h2"),
        ]

    def _h2load(self, ctx: Ctx, port: int, seconds: float) -> LoadResult:
        log = ctx.env.tmp / f"h2load-{port}.log"
        with contextlib.suppress(FileNotFoundError):
            log.unlink()  # h2load appends; the percentiles must be this run's only
        try:
            return loads.h2load(
                f"http://127.0.0.1:{port}/",
                seconds,
                log,
                H2_CLIENTS,
                H2_STREAMS,
                cpus=ctx.env.load_cpus,
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                log.unlink()  # up to ~20 MB per run

    def warmup(self, ctx: Ctx, port: int) -> None:
        # A separate run, not --warm-up-time: the meters must cover only measured requests.
        if ctx.warmup() > 0:
            self._h2load(ctx, port, ctx.warmup())

    def load(self, ctx: Ctx, port: int) -> LoadResult:
        return self._h2load(ctx, port, ctx.seconds("http"))


# --------------------------------------------------------------------------- pairs, balancing


def _ok_row(rows: list[Row], label: str) -> Row | None:
    return next((r for r in rows if r.label == label and r.status == "ok"), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _check(requirement: str, figure: str, passed: bool | None) -> dict[str, Any]:
    return {"requirement": requirement, "figure": figure, "pass": passed}


def _per_round(a: Row | None, b: Row | None, key: str) -> list[float]:
    """a's ``key`` / b's, round by round (rows run one after another within a round, so
    the ratio of one round is less exposed to the machine's drifting load)."""
    if a is None or b is None:
        return []
    bs = {r["round"]: r.get(key) for r in b.runs}
    return [r[key] / bs[r["round"]] for r in a.runs if r.get(key) and bs.get(r["round"])]


def minus_by_round(
    runs: list[dict[str, Any]], base_runs: list[dict[str, Any]], key: str
) -> list[float]:
    """``key`` of each run minus the base row's run of the same round (rows run one after
    another within a round, so the difference is less exposed to the machine's drifting
    load); rounds missing on either side, or without the figure, are left out."""
    base = {r["round"]: r.get(key) for r in base_runs}
    return [
        r[key] - b
        for r in runs
        if r.get(key) is not None and (b := base.get(r["round"])) is not None
    ]


def _rounds_text(ratios: list[float], fmt: str) -> str:
    return "; per round: " + ", ".join(format(x, fmt) for x in ratios) if len(ratios) > 1 else ""


PAIR_PLAIN, PAIR_MTLS = "pair plaintext", "pair mTLS"


class PairScenario(Scenario):
    """Rows through two proxies: the ratios of every row to the plaintext pair."""

    extra_columns = (
        ("vs plaintext", "x_plaintext", "x"),
        ("CPU vs plaintext", "cost_x_plaintext", "x"),
        ("CPU client + server", "cpu_cost_by_proc", "split"),
    )
    cost_ref = ("cost_x_plaintext", "pair plaintext")

    def pair_paths(self, upstream: str, http: bool) -> list[Path]:
        return [
            MeshproxyPair(PAIR_PLAIN, "meshproxy", upstream, mtls=False, http=http),
            MeshproxyPair(PAIR_MTLS, "meshproxy", upstream, mtls=True, http=http),
        ]

    def derive(self, rows: list[Row]) -> None:
        self.checks = []
        plain = _ok_row(rows, PAIR_PLAIN)
        pm = plain.metrics if plain else {}
        for r in rows:
            if r.status == "ok":
                r.metrics["x_plaintext"] = _ratio(r.metrics.get("throughput"), pm.get("throughput"))
                r.metrics["cost_x_plaintext"] = _ratio(
                    r.metrics.get("cpu_cost"), pm.get("cpu_cost")
                )
                r.metrics["x_plaintext_rounds"] = _per_round(r, plain, "throughput")
                r.metrics["cost_x_plaintext_rounds"] = _per_round(r, plain, "cpu_cost")

    def check_counters(self, run: dict[str, Any]) -> str | None:
        note = super().check_counters(run)
        if note is None and "mTLS" in run.get("proxy_name", ""):
            c, s = run.get("proxy_counters") or {}, run.get("server_proxy_counters") or {}
            if not c.get("connected_tls") or not s.get("accepted_tls"):
                note = (
                    f"mTLS not seen in the metrics: client opened {c.get('connected_tls', 0):.0f} "
                    f"TLS connection(s), server accepted {s.get('accepted_tls', 0):.0f}"
                )
        return note


class H1MtlsPair(PairScenario, H1KeepAlive):
    name = "h1-mtls-pair"
    family = "pair"
    title = "HTTP/1.1 keep-alive through a proxy pair, plaintext vs mTLS (wrk -t1 -c50)"

    def paths(self, ctx: Ctx) -> list[Path]:
        return [Direct("h1"), *self.pair_paths("h1", http=True)]

    def derive(self, rows: list[Row]) -> None:
        super().derive(rows)
        mtls = _ok_row(rows, PAIR_MTLS)
        m = mtls.metrics if mtls else {}
        x, cx = m.get("x_plaintext"), m.get("cost_x_plaintext")
        self.checks = [
            _check(
                "mTLS pair RPS >= 70 % of the plaintext pair's",
                "-"
                if x is None
                else f"{x:.1%} ({m['throughput']:,.0f} vs {m['throughput'] / x:,.0f} req/s, "
                "median rows)" + _rounds_text(m.get("x_plaintext_rounds", []), ".1%"),
                None if x is None else x >= 0.70,
            ),
            _check(
                "mTLS pair CPU per request (both proxies) <= 1.5x the plaintext pair's",
                "-"
                if cx is None
                else f"{cx:.2f}x ({m['cpu_cost']:.1f} vs {m['cpu_cost'] / cx:.1f} us/req, "
                "median rows)" + _rounds_text(m.get("cost_x_plaintext_rounds", []), ".2f"),
                None if cx is None else cx <= 1.5,
            ),
        ]


class TcpMtlsPair(PairScenario, TcpThroughput):
    name = "tcp-mtls-pair"
    family = "pair"
    title = "Opaque TCP through a proxy pair, plaintext vs mTLS (iperf3, 1 stream)"

    def paths(self, ctx: Ctx) -> list[Path]:
        return [
            Direct("iperf"),
            *self.pair_paths("iperf", http=False),
            HaproxyTlsPair("haproxy TLS pair", "haproxy", "iperf"),
        ]

    def derive(self, rows: list[Row]) -> None:
        super().derive(rows)
        mtls = _ok_row(rows, PAIR_MTLS)
        m = mtls.metrics if mtls else {}
        gbps = m.get("throughput")
        fig = "-"
        if gbps is not None:
            fig = f"{gbps:.2f} Gbit/s"
            if m.get("x_direct") is not None:
                fig += f"; {m['x_direct']:.2f}x direct"
            if m.get("x_plaintext") is not None:
                fig += f"; {m['x_plaintext']:.2f}x the plaintext pair"
            if mtls is not None and len(mtls.runs) > 1:
                fig += "; per round: " + ", ".join(f"{r['throughput']:.2f}" for r in mtls.runs)
        self.checks = [
            _check(
                "one iperf3 stream over the mTLS pair >= 5 Gbit/s",
                fig,
                None if gbps is None else gbps >= 5.0,
            )
        ]


BALANCE_ENDPOINTS = (1, 10, 100)
BALANCE_ADDED_MAX_US = 3.0


class BalanceEndpoints(H1KeepAlive):
    """Per-request balancing (P2C, peak-EWMA) over 1, 10 and 100 endpoints: the CPU it
    adds per request. One nginx worker listens on 100 ports, so every endpoint costs the
    backend the same; the proxy's fallback is the service's VIP."""

    name = "balance-endpoints"
    family = "balance"
    title = "HTTP/1.1 keep-alive to a service VIP with 1 / 10 / 100 endpoints (wrk -t1 -c50)"
    min_repeat = 3  # a few-us difference in CPU per request: a true median of 3 rounds
    median_by = "cpu_cost"
    extra_columns = (
        ("CPU vs 1 endpoint", "cost_x_1ep", "x"),
        ("CPU added vs 1 endpoint (median of rounds)", "cost_added_vs_1ep", "us"),
    )
    cost_ref = ("cost_x_1ep", "1 endpoint")

    @staticmethod
    def label(n: int) -> str:
        return f"{n} endpoint{'s' if n > 1 else ''}"

    def backend(self, ctx: Ctx) -> ContextManager[Server]:
        return servers.nginx_backend(ctx.env, h1_ports=max(BALANCE_ENDPOINTS))

    def paths(self, ctx: Ctx) -> list[Path]:
        return [
            Direct("h1"),
            *(
                MeshproxyBalanced(self.label(n), "meshproxy", "h1", endpoints=n)
                for n in BALANCE_ENDPOINTS
            ),
        ]

    def derive(self, rows: list[Row]) -> None:
        one = _ok_row(rows, self.label(1))
        base = one.metrics.get("cpu_cost") if one else None
        # Per round: this round's 1-endpoint run (rows run one after another in a round).
        base_by_round = {r["round"]: r["cpu_cost"] for r in one.runs} if one else {}
        self.checks = []
        for r in rows:
            if r.status != "ok" or r.kind == "direct":
                continue
            m = r.metrics
            m["cost_x_1ep"] = _ratio(m.get("cpu_cost"), base)
            # Per round, minus the same round's 1-endpoint run: the machine's load drifts
            # between rounds (here the 1-endpoint cost alone has moved 110-190 us from one
            # round to the next), much less within one. The figure is the median of those
            # differences; the median row minus the median row is kept too, but those two
            # rows may come from rounds far apart in load.
            rounds = [
                run["cpu_cost"] - base_by_round[run["round"]]
                for run in r.runs
                if run["round"] in base_by_round
            ]
            m["cost_added_vs_1ep_rounds"] = rounds
            m["cost_added_vs_1ep"] = statistics.median(rounds) if rounds else None
            m["cost_added_vs_1ep_rows"] = None if base is None else m["cpu_cost"] - base
        for n in BALANCE_ENDPOINTS[1:]:
            row = _ok_row(rows, self.label(n))
            rm = row.metrics if row else {}
            added = rm.get("cost_added_vs_1ep")
            rounds = rm.get("cost_added_vs_1ep_rounds") or []
            fig = "-" if added is None else f"{added:+.2f} us/req, median of rounds"
            if len(rounds) > 1:
                fig += " (" + ", ".join(f"{d:+.2f}" for d in rounds) + ")"
            if rm.get("cost_added_vs_1ep_rows") is not None:
                fig += (
                    f"; median rows: {rm['cpu_cost']:.2f} vs {base:.2f} us/req "
                    f"= {rm['cost_added_vs_1ep_rows']:+.2f}"
                )
            self.checks.append(
                _check(
                    f"CPU per request added by {n} endpoints over 1 <= {BALANCE_ADDED_MAX_US:g} us"
                    + ("" if n == max(BALANCE_ENDPOINTS) else " (informational)"),
                    fig,
                    None
                    if added is None or n != max(BALANCE_ENDPOINTS)
                    else added <= BALANCE_ADDED_MAX_US,
                )
            )


class H1Latency(Scenario):
    """The latency a proxy adds at a low, fixed rate of HTTP/1.1 keep-alive requests.

    wrk -t1 -c10 paced to LATENCY_RATE by its Lua delay() hook (see loads.WRK_PACING_HOOKS):
    every path gets the same offered rate, far below any row's capacity, so the
    percentiles are those of an idle-ish proxy, not of a saturated one (h1-keepalive). The
    added p99 of a proxy row is its p99 minus the direct row's of the same round.
    """

    name = "h1-latency"
    family = "latency"
    title = (
        f"HTTP/1.1 keep-alive paced to {LATENCY_RATE:,.0f} req/s "
        f"(wrk -t1 -c{LATENCY_CONNECTIONS}, Lua delay())"
    )
    unit = "req/s"
    cost_unit = "ms/1k req"
    tools = ("wrk", "nginx")
    concurrency = LATENCY_CONNECTIONS
    median_by = "p99_ms"
    extra_columns = (("p99 added vs direct (median of rounds)", "p99_added_ms", "ms"),)
    top_chart = ("p99_x_direct", "p99_ms", "p99 latency / direct (ms, lower is better)")

    def backend(self, ctx: Ctx) -> ContextManager[Server]:
        return servers.nginx_backend(ctx.env)

    def paths(self, ctx: Ctx) -> list[Path]:
        return [
            Direct("h1"),
            Meshproxy("meshproxy 1w", "meshproxy", "h1", workers=1, http=True),
            Haproxy("haproxy http", "haproxy", "h1", mode="http"),
            NginxProxy("nginx http", "nginx", "h1"),
        ]

    def _wrk(self, ctx: Ctx, port: int, seconds: float) -> LoadResult:
        script = loads.wrk_script(ctx.env.tmp / "wrk-paced.lua", rate_per_thread=LATENCY_RATE)
        return loads.wrk(
            f"http://127.0.0.1:{port}/",
            seconds,
            script,
            connections=LATENCY_CONNECTIONS,
            cpus=ctx.env.load_cpus,
        )

    def warmup(self, ctx: Ctx, port: int) -> None:
        self._wrk(ctx, port, max(ctx.warmup(), LATENCY_WARMUP_MIN_S))

    def load(self, ctx: Ctx, port: int) -> LoadResult:
        return self._wrk(ctx, port, ctx.seconds("latency"))

    def describe(self, run: dict[str, Any]) -> str:
        text = super().describe(run)
        if run["p999_ms"] is not None:
            text += f", p99.9 {run['p999_ms']:.2f} ms"
        return text

    def summary_figures(self, m: dict[str, Any]) -> str:
        if m.get("p99_ms") is None:
            return ""
        added = m.get("p99_added_ms")
        return f"p99 {m['p99_ms']:.3f} ms" + ("" if added is None else f" ({added:+.3f} added)")

    def derive(self, rows: list[Row]) -> None:
        direct = _ok_row(rows, "direct")
        dm = direct.metrics if direct else {}
        self.checks = []
        for r in rows:
            if r.status != "ok":
                continue
            m = r.metrics
            m["p99_x_direct"] = _ratio(m.get("p99_ms"), dm.get("p99_ms"))
            if r.kind == "direct":
                continue
            rounds = minus_by_round(r.runs, direct.runs if direct else [], "p99_ms")
            m["p99_added_ms_rounds"] = rounds
            m["p99_added_ms"] = statistics.median(rounds) if rounds else None
        for label, required in (
            ("meshproxy 1w", True),
            ("haproxy http", False),
            ("nginx http", False),
        ):
            row = _ok_row(rows, label)
            rm = row.metrics if row else {}
            added = rm.get("p99_added_ms")
            fig = "-"
            if added is not None:
                # Busy cores of the whole machine: this load alone keeps well under half a
                # core busy, so much more means other work shared the cores (and the p99).
                fig = (
                    f"{added:+.3f} ms (p99 {rm['p99_ms']:.3f} vs direct {dm['p99_ms']:.3f} ms, "
                    f"at {rm['throughput']:,.0f} vs {dm['throughput']:,.0f} req/s, machine busy "
                    f"{rm['machine_busy_cores']:.2f} vs {dm['machine_busy_cores']:.2f} cores)"
                    + _rounds_text(rm.get("p99_added_ms_rounds", []), "+.3f")
                )
            self.checks.append(
                _check(
                    f"{label}: added p99 at {LATENCY_RATE:,.0f} RPS <= "
                    f"{LATENCY_ADDED_P99_MAX_MS:g} ms" + ("" if required else " (reference)"),
                    fig,
                    None if added is None or not required else added <= LATENCY_ADDED_P99_MAX_MS,
                )
            )


SCENARIOS: dict[str, type[Scenario]] = {
    cls.name: cls
    for cls in (
        TcpThroughput,
        TcpChurn,
        H1KeepAlive,
        H1Latency,
        H2c,
        H1MtlsPair,
        TcpMtlsPair,
        BalanceEndpoints,
    )
}


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
