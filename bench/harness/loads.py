"""Load generators and the parsers of what they print.

Every load is bounded in time (the tool's own duration flag, plus a subprocess timeout as a
backstop) and, for churn, in count too. Each runner returns a ``LoadResult`` with the same
keys whatever the tool, so a scenario only says which tool and which URL/port.

Parsers are plain functions of the tool's text so they can be checked on saved output.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# Backstop on top of the tool's own -t/-d: startup, connection teardown, a stuck proxy.
TIMEOUT_SLACK_S = 20.0


@dataclass
class LoadResult:
    tool: str
    seconds: float  # measured duration as the tool reports it
    units: float  # requests/connections completed, or bytes received
    rate: float  # units per second (Gbit/s for iperf3)
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    errors: int = 0
    raw: dict[str, object] = field(default_factory=dict)


class LoadError(RuntimeError):
    pass


def _run(
    argv: list[str], timeout: float, cpus: str | None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed it
        raise LoadError(f"{argv[0]} did not finish within {timeout:.0f}s") from e


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# --------------------------------------------------------------------------- iperf3


def iperf3(port: int, seconds: float, cpus: str | None = None) -> LoadResult:
    """One stream, ``iperf3 -c 127.0.0.1 -p PORT -t S -J``."""
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J"]
    cp = _run(argv, seconds + TIMEOUT_SLACK_S, cpus)
    return parse_iperf3(cp.stdout, cp.returncode)


def parse_iperf3(text: str, returncode: int = 0) -> LoadResult:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoadError(f"iperf3 printed no JSON (rc {returncode}): {text[:300]!r}") from e
    if data.get("error"):
        raise LoadError(f"iperf3: {data['error']}")
    end = data["end"]
    recv, sent = end["sum_received"], end["sum_sent"]
    cpu = end.get("cpu_utilization_percent", {})
    return LoadResult(
        tool="iperf3",
        seconds=float(recv["seconds"]),
        units=float(recv["bytes"]),
        rate=float(recv["bits_per_second"]) / 1e9,
        raw={
            "received_bps": recv["bits_per_second"],
            "sent_bps": sent["bits_per_second"],
            "received_bytes": recv["bytes"],
            "retransmits": sent.get("retransmits"),
            "client_cpu_pct": cpu.get("host_total"),
            "server_cpu_pct": cpu.get("remote_total"),
        },
    )


# --------------------------------------------------------------------------- wrk

# wrk's Lua hooks. done() prints the summary and exact percentiles (p99.9 is not in
# --latency's table) as one JSON line. With a request budget (churn), response() counts and
# stops its thread at the budget, noting when (LuaJIT's FFI clock): wrk itself idles to the
# end of -d and reports that as the duration, so the rate is taken over the noted time.
# With a rate (latency scenarios), delay() paces the requests (see WRK_PACING_HOOKS).
WRK_LUA = """\
local budget = {budget}
local threads = {{}}
{clock}{budget_hooks}{pacing_hooks}
function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local stopped = 0
  for _, t in ipairs(threads) do
    local s = t:get("stopped_us")
    if s and s > stopped then stopped = s end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests":%d,"duration_us":%d,"stopped_us":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}}\\n',
    summary.requests, summary.duration, stopped, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""

# A monotonic clock in microseconds (LuaJIT's FFI; wrk's Lua has no clock of its own finer
# than os.time()), for the budget and pacing hooks.
WRK_CLOCK = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end
"""

# Defined only with a budget: a Lua response() makes wrk hand every response to Lua, which
# would slow the load generator down in the keep-alive runs.
WRK_BUDGET_HOOKS = """\
function init(args)
  t0 = now_us()  -- globals: done() reads them through thread:get()
  stopped_us = 0
  seen = 0
end

function response(status, headers, body)
  seen = seen + 1
  if seen == budget then
    stopped_us = now_us() - t0
    wrk.thread:stop()
  end
end
"""

# Defined only with a rate. wrk 4 calls delay() before every request of a connection (the
# first one too) and writes the request that many milliseconds later; its latency clock
# starts when the request is written, so the wait is not counted. The thread's requests
# take slots of one schedule, interval_us apart: a connection that is free claims the next
# slot, so the thread sends at the set rate whatever the latency of the path (as long as
# some connection is free; a fixed per-connection delay would send slower through a slower
# path). A schedule fallen behind (every connection busy) restarts from now instead of
# sending a burst to catch up. wrk truncates the returned number to whole milliseconds
# (and a negative one wraps to years), hence the rounding and the clamp at 0: a request
# goes out within ~0.5 ms of its slot, and the slots keep the mean rate exact.
WRK_PACING_HOOKS = """\
local interval_us = {interval_us}
local next_us = nil

function delay()
  local now = now_us()
  if next_us == nil or next_us < now then next_us = now end
  local wait_us = next_us - now
  next_us = next_us + interval_us
  return math.max(0, math.floor(wait_us / 1000 + 0.5))
end
"""


def pace_interval_us(rate_per_s: float, threads: int = 1) -> int:
    """Microseconds between two requests of one wrk thread for ``rate_per_s`` in all."""
    if rate_per_s <= 0 or threads < 1:
        raise ValueError(f"pacing needs a rate > 0 and threads >= 1, not {rate_per_s}, {threads}")
    return max(1, round(1e6 * threads / rate_per_s))


def wrk_script_text(budget_per_thread: int = 0, rate_per_thread: float = 0.0) -> str:
    """The Lua script: the JSON summary, plus a request budget and/or pacing to a rate."""
    budget = budget_per_thread > 0
    paced = rate_per_thread > 0
    return WRK_LUA.format(
        budget=budget_per_thread,
        clock=WRK_CLOCK if budget or paced else "",
        budget_hooks=WRK_BUDGET_HOOKS if budget else "",
        pacing_hooks=WRK_PACING_HOOKS.format(interval_us=pace_interval_us(rate_per_thread))
        if paced
        else "",
    )


def wrk_script(path: Path, budget_per_thread: int = 0, rate_per_thread: float = 0.0) -> Path:
    path.write_text(wrk_script_text(budget_per_thread, rate_per_thread))
    return path


def wrk(
    url: str,
    seconds: float,
    script: Path,
    threads: int = 1,
    connections: int = 50,
    headers: tuple[str, ...] = (),
    cpus: str | None = None,
) -> LoadResult:
    """``wrk -t1 -c50 -dS --latency URL`` with the JSON-summary script."""
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(script),
    ]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    cp = _run(argv, seconds + TIMEOUT_SLACK_S, cpus)
    if cp.returncode != 0:
        raise LoadError(f"wrk rc {cp.returncode}: {(cp.stderr or cp.stdout)[-300:]}")
    return parse_wrk(cp.stdout)


def parse_wrk(text: str) -> LoadResult:
    m = re.search(r"^BENCH_JSON (\{.*\})$", text, re.M)
    if m is None:
        return _parse_wrk_text(text)
    d = json.loads(m.group(1))
    # A thread that met its budget stopped early; wrk's duration runs to the end of -d.
    seconds = (d["stopped_us"] or d["duration_us"]) / 1e6
    errors = d["err_connect"] + d["err_read"] + d["err_write"] + d["err_timeout"] + d["err_status"]
    return LoadResult(
        tool="wrk",
        seconds=seconds,
        units=float(d["requests"]),
        rate=d["requests"] / seconds if seconds > 0 else 0.0,
        p50_ms=d["p50_us"] / 1e3,
        p99_ms=d["p99_us"] / 1e3,
        p999_ms=d["p999_us"] / 1e3,
        errors=errors,
        raw={
            k: d[k]
            for k in d
            if k.startswith(("err_", "lat_", "bytes", "p90", "stopped", "duration"))
        },
    )


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _parse_wrk_text(text: str) -> LoadResult:
    """Fallback when the script's summary line is missing: the --latency text output."""
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if m is None:
        raise LoadError(f"cannot parse wrk output: {text[-300:]!r}")
    requests = int(m.group(1))
    seconds = float(m.group(2)) * _UNIT_MS.get(m.group(3), 1e3) / 1e3
    lat = {
        q: float(v) * _UNIT_MS[u]
        for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", text, re.M)
    }
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = (sum(int(x) for x in errs.groups()) if errs else 0) + (
        int(non2xx.group(1)) if non2xx else 0
    )
    return LoadResult(
        "wrk",
        seconds,
        float(requests),
        requests / seconds,
        lat.get("50"),
        lat.get("99"),
        None,
        errors,
    )


# --------------------------------------------------------------------------- h2load


def h2load(
    url: str,
    seconds: float,
    log_file: Path,
    clients: int = 10,
    streams: int = 10,
    warmup_s: float = 0.0,
    extra: tuple[str, ...] = (),
    cpus: str | None = None,
) -> LoadResult:
    """``h2load -t1 -c10 -m10 -D S --log-file F URL`` (h2c with prior knowledge for http://)."""
    argv = [
        "h2load",
        "-t1",
        f"-c{clients}",
        f"-m{streams}",
        "-D",
        str(max(1, round(seconds))),
        "--log-file",
        str(log_file),
    ]
    if warmup_s > 0:
        argv += ["--warm-up-time", f"{max(1, round(warmup_s))}"]
    argv += [*extra, url]
    cp = _run(argv, seconds + warmup_s + TIMEOUT_SLACK_S, cpus)
    if cp.returncode != 0:
        raise LoadError(f"h2load rc {cp.returncode}: {(cp.stderr or cp.stdout)[-300:]}")
    durations = read_h2load_log(log_file)
    return parse_h2load(cp.stdout, durations)


def read_h2load_log(path: Path) -> list[float]:
    """Response times in ms, ascending. Columns: start (us since epoch), status, duration (us)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1].startswith("2"):
                    out.append(int(parts[2]) / 1e3)
    except OSError:
        return []
    out.sort()
    return out


def parse_h2load(text: str, durations_ms: list[float]) -> LoadResult:
    fin = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
        text,
    )
    if fin is None or req is None:
        raise LoadError(f"cannot parse h2load output: {text[-300:]!r}")
    seconds = float(fin.group(1)) / (1e3 if fin.group(2) == "ms" else 1.0)
    succeeded = int(req.group(4))
    failed, errored, timeout = (int(req.group(i)) for i in (5, 6, 7))
    if succeeded == 0:
        raise LoadError(f"h2load: no request succeeded: {text[-300:]!r}")
    return LoadResult(
        tool="h2load",
        seconds=seconds,
        units=float(succeeded),
        rate=succeeded / seconds if seconds > 0 else float(fin.group(3)),
        p50_ms=percentile(durations_ms, 50),
        p99_ms=percentile(durations_ms, 99),
        p999_ms=percentile(durations_ms, 99.9),
        errors=failed + errored + timeout,
        raw={
            "reported_rps": float(fin.group(3)),
            "total": int(req.group(1)),
            "logged": len(durations_ms),
        },
    )
