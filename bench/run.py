"""meshproxy benchmark: one run of every scenario on loopback, against direct and peers.

    python bench/run.py [--quick] [--duration S] [--scenarios a,b] [--out bench/results]

Starts every server itself (iperf3, nginx, haproxy, meshproxy) on free ports of
127.0.0.1, bounds every load in time, stops each server by PID, and writes
results.json, results.md and results.png to --out. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from harness import report  # noqa: E402
from harness.procs import PortPool  # noqa: E402
from harness.scenarios import HTTP_ENV, SCENARIOS, Ctx, Row, Scenario, cpu_count  # noqa: E402
from harness.servers import Env  # noqa: E402

DEFAULT_SCENARIOS = ",".join(SCENARIOS)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="short loads for a smoke test (about 2 min in all)"
    )
    ap.add_argument(
        "--duration", type=float, help="seconds of every measured load (overrides the defaults)"
    )
    ap.add_argument(
        "--scenarios", default=DEFAULT_SCENARIOS, help=f"comma list (default: {DEFAULT_SCENARIOS})"
    )
    ap.add_argument(
        "--out", default=str(BENCH_DIR / "results"), help="output directory (default bench/results)"
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per row; the median is reported (default 1)"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=cpu_count(),
        help="N of the 'meshproxy Nw' row (default: CPU count)",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="taskset: single-threaded proxies on CPU 0, backends and load on CPU 1 (needs 2+ CPUs)",
    )
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs `-m proxy run` (default: this one)",
    )
    ap.add_argument(
        "--keep-tmp",
        action="store_true",
        help="keep configs and server logs (path printed at the end)",
    )
    ap.add_argument("--list", action="store_true", help="list scenarios and exit")
    return ap.parse_args(argv)


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM becomes an exception so every `finally` stops its servers.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.list:
        for name, cls in SCENARIOS.items():
            print(f"{name:16} {cls.title}")
        return 0
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(
            f"unknown scenario(s): {', '.join(unknown)}; known: {DEFAULT_SCENARIOS}",
            file=sys.stderr,
        )
        return 2
    pin = args.pin and cpu_count() >= 2
    if args.pin and not pin:
        print("--pin ignored: fewer than 2 CPUs", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="meshproxy-bench-"))
    signal.signal(signal.SIGTERM, _terminate)

    log = Progress()
    env = Env(
        tmp=tmp,
        ports=PortPool(),
        python=args.python,
        repo=REPO,
        proxy_cpus="0" if pin else None,
        load_cpus="1" if pin else None,
    )
    ctx = Ctx(
        env=env,
        quick=args.quick,
        duration=args.duration,
        repeat=max(1, args.repeat),
        workers=max(1, args.workers),
        http_enabled=os.environ.get(HTTP_ENV, "1") != "0",  # HTTP forwarding is built: on unless MESHPROXY_BENCH_HTTP=0
        log=log,
    )
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    machine = report.machine()
    versions = report.versions(args.python, REPO)
    log(
        f"meshproxy bench: {', '.join(names)}; {'quick' if args.quick else 'full'}; "
        f"{machine.get('cpus')} CPUs; N={ctx.workers}; {'pinned' if pin else 'unpinned'}; out={out}"
    )
    log(f"versions: {', '.join(f'{k} {v}' for k, v in versions.items() if k != 'python_path')}")

    scenarios = [SCENARIOS[n]() for n in names]
    rows: dict[str, list[Row]] = {}
    interrupted = False
    try:
        for scn in scenarios:
            log(f"== {scn.name}: {scn.title}")
            try:
                rows[scn.name] = scn.run(ctx)
            except (RuntimeError, OSError) as e:  # the backend itself did not start
                log(f"{scn.name}: backend failed: {e}")
                rows[scn.name] = [Row(scn.name, "backend", "direct", "error", str(e))]
            report.add_ratios(rows[scn.name])
            scn.derive(rows[scn.name])
    except KeyboardInterrupt:
        interrupted = True
        for scn in scenarios:  # the scenario that was running keeps its measured rows
            if scn.name not in rows and getattr(scn, "rows", None):
                rows[scn.name] = scn.rows
                report.add_ratios(scn.rows)
                scn.derive(scn.rows)
        log("interrupted: servers stopped; writing what was measured")
    finally:
        failed = any(r.failures for rs in rows.values() for r in rs)
        if args.keep_tmp or failed:
            log(f"configs and logs kept in {tmp}" + (" (some rounds failed)" if failed else ""))
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    done = [s for s in scenarios if s.name in rows]
    doc = {
        "started": started,
        "elapsed_s": time.monotonic() - log.t0,
        "command": "python bench/run.py " + shlex.join(argv),
        "interrupted": interrupted,
        "args": {
            "quick": args.quick,
            "duration": args.duration,
            "scenarios": names,
            "repeat": ctx.repeat,
            "workers": ctx.workers,
            "pin": pin,
            "http_enabled": ctx.http_enabled,
        },
        "machine": machine,
        "versions": versions,
        "scenarios": {
            s.name: {
                "family": s.family,
                "title": s.title,
                "unit": s.unit,
                "cost_unit": s.cost_unit,
                "rows": [r.to_json() for r in rows[s.name]],
                "checks": s.checks,
            }
            for s in done
        },
    }
    report.write_json(out / "results.json", doc)
    report.write_markdown(out / "results.md", doc, done, rows)
    why_no_png = report.write_png(out / "results.png", done, rows)
    log(
        f"wrote {out / 'results.json'}, {out / 'results.md'}"
        + (f", {out / 'results.png'}" if why_no_png is None else f" (no PNG: {why_no_png})")
    )
    summary(done, rows, log)
    for scn in done:
        for c in scn.checks:
            verdict = {True: "PASS", False: "FAIL", None: "----"}[c["pass"]]
            log(f"{scn.name:15} {verdict} {c['requirement']}: {c['figure']}")
    return 130 if interrupted else 0


def summary(scenarios: list[Scenario], rows: dict[str, list[Row]], log: Progress) -> None:
    for scn in scenarios:
        for r in rows[scn.name]:
            if r.status != "ok":
                log(
                    f"{scn.name:15} {r.label:24} {r.status}: {r.reason.splitlines()[0] if r.reason else ''}"[
                        :200
                    ]
                )
                continue
            m = r.metrics
            xd = f"{m['x_direct']:.2f}x direct" if m.get("x_direct") is not None else ""
            xh = f"{m['x_haproxy']:.2f}x haproxy" if m.get("x_haproxy") is not None else ""
            extra = scn.summary_figures(m)
            log(
                f"{scn.name:15} {r.label:24} {m['throughput']:>12,.2f} {scn.unit:7} {xd:>14} {xh:>15}"
                + (f"  {extra}" if extra else "")
                + (f"  ({len(r.failures)} round(s) failed)" if r.failures else "")
            )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
