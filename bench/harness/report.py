"""Ratios, machine facts and the three outputs: results.json, results.md, results.png.

Ratios are taken inside one scenario of one run only (same machine state, same backend):
- ``x_direct``: throughput / the direct row's (1.0 = the proxy costs nothing);
- ``x_haproxy`` / ``x_nginx``: throughput / the first measured row of that peer;
- ``cost_x_haproxy`` / ``cost_x_nginx``: proxy CPU cost / the peer's (lower is better).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from .scenarios import Row, Scenario

PEERS = ("haproxy", "nginx")
PNG_PER_LINE = 4  # scenarios per line of charts


def add_ratios(rows: list[Row]) -> None:
    ok = [r for r in rows if r.status == "ok"]
    direct = next((r for r in ok if r.kind == "direct"), None)
    peers = {k: next((r for r in ok if r.kind == k), None) for k in PEERS}
    for r in ok:
        m = r.metrics
        m["x_direct"] = _ratio(
            m.get("throughput"), direct.metrics.get("throughput") if direct else None
        )
        for name, peer in peers.items():
            pm = peer.metrics if peer else {}
            m[f"x_{name}"] = _ratio(m.get("throughput"), pm.get("throughput"))
            m[f"cost_x_{name}"] = _ratio(m.get("cpu_cost"), pm.get("cpu_cost"))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# --------------------------------------------------------------------------- facts


def _cmd(argv: list[str], cwd: Path | None = None) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (cp.stdout + cp.stderr).strip()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _first_match(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "arch": platform.machine(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = _first_match(r"model name\s*:\s*(.*)", cpuinfo)
        info["mem_gib"] = round(
            int(_first_match(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()) or 0) / 2**20,
            1,
        )
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
        info["os"] = _first_match(r'PRETTY_NAME="(.*)"', Path("/etc/os-release").read_text())
    except OSError:
        pass
    return info


NATIVE_PROBE = """\
import pkgutil
try:
    import proxy._native as n
    print(",".join(sorted(m.name for m in pkgutil.iter_modules(n.__path__))) or "none built")
except ImportError as e:
    print("none built (" + str(e) + ")")
"""


def versions(python: str, repo: Path) -> dict[str, Any]:
    probe = (
        "import json, sys, importlib.metadata as m\n"
        "out = [sys.version.split()[0]]\n"
        "for p in ('uvloop', 'meshproxy'):\n"
        "    try: out.append(m.version(p))\n"
        "    except Exception: out.append(None)\n"
        "print(json.dumps(out))\n"
    )
    py = _cmd([python, "-c", probe])
    try:
        pyv, uvloop, meshproxy = json.loads(py.splitlines()[-1])
    except (ValueError, TypeError, IndexError):
        pyv = uvloop = meshproxy = None
    if meshproxy is None:  # not pip-installed: run from the checkout, say its version
        meshproxy = _first_match(r'(?m)^version\s*=\s*"([^"]+)"', _read(repo / "pyproject.toml"))
    rev = _cmd(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _cmd(["git", "-C", str(repo), "status", "--porcelain", "--", "proxy", "native"])
    return {
        "python": pyv,
        "python_path": python,
        "uvloop": uvloop,
        "meshproxy": meshproxy,
        "meshproxy_git": (rev if re.fullmatch(r"[0-9a-f]{4,40}", rev) else "no commit")
        + (" +dirty" if dirty else ""),
        "haproxy": _first_match(r"HA-?Proxy version (\S+)", _cmd(["haproxy", "-v"])),
        "nginx": _first_match(r"nginx/(\S+)", _cmd(["nginx", "-v"])),
        "iperf3": _first_match(r"iperf (\S+)", _cmd(["iperf3", "-v"])),
        "wrk": _first_match(r"wrk (\S+)", _cmd(["wrk", "-v"])),
        "h2load": _first_match(r"nghttp2/(\S+)", _cmd(["h2load", "--version"])),
        # Whether the Cython twins are built: if not, "1w" and "1w pure" run the same code.
        "meshproxy_native": _cmd([python, "-c", NATIVE_PROBE], cwd=repo) or None,
    }


# --------------------------------------------------------------------------- JSON


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str) + "\n")


# --------------------------------------------------------------------------- Markdown


def _num(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _rate(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:.2f} {unit}" if unit == "Gbit/s" else f"{v:,.0f} {unit}"


MD_COLUMNS = (
    "scenario",
    "row",
    "throughput",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "proxy CPU cost",
    "proxy CPU util",
    "peak RSS MB",
    "vs direct",
    "vs haproxy",
    "vs nginx",
    "CPU vs haproxy",
    "CPU vs nginx",
)
PEER_COLUMNS = ("vs haproxy", "vs nginx", "CPU vs haproxy", "CPU vs nginx")


def _extra_cell(kind: str, v: Any) -> str:
    if v is None:
        return "-"
    if kind == "x":
        return _x(v)
    if kind == "us":
        return f"{v:+.2f} us"
    if kind == "ms":
        return f"{v:+.3f} ms"
    if kind == "split":  # {proc name: cost}
        return " + ".join(_num(c) for c in v.values()) if v else "-"
    return str(v)


def _columns(scns: list[Scenario], rows: dict[str, list[Row]]) -> list[str]:
    """The family table's columns: the base ones, each scenario's extra ones; the peer
    columns only where a family has peer rows."""
    has_peers = any(r.kind in PEERS for s in scns for r in rows.get(s.name, []))
    cols = [c for c in MD_COLUMNS if has_peers or c not in PEER_COLUMNS]
    for scn in scns:
        cols += [h for h, _, _ in scn.extra_columns if h not in cols]
    return [*cols, "status"]


def _md_row(scn: Scenario, r: Row, columns: list[str]) -> str:
    if r.status != "ok":
        reason = r.reason.splitlines()[0] if r.reason else ""
        cells = {"scenario": scn.name, "row": r.label, "status": f"{r.status}: {reason[:160]}"}
        return "| " + " | ".join(cells.get(c, "-") for c in columns) + " |\n"
    m = r.metrics
    cost = "-" if m.get("cpu_cost") is None else f"{_num(m['cpu_cost'])} {m['cost_unit']}"
    status = "ok"
    if m.get("errors"):
        status += f", {m['errors']} errors"
    if m.get("proxy_alive_after") is False:
        status += ", proxy died"
    if r.failures:
        status += f", {len(r.failures)} of {len(r.failures) + len(r.runs)} rounds failed: "
        status += r.failures[0]["reason"].splitlines()[0][:120]
    cells = dict(
        zip(
            MD_COLUMNS,
            [
                scn.name,
                r.label,
                _rate(m.get("throughput"), scn.unit),
                _num(m.get("p50_ms")),
                _num(m.get("p99_ms")),
                _num(m.get("p999_ms")),
                cost,
                _num(m.get("proxy_cpu_util")),
                _num(m.get("peak_rss_mb"), 1),
                _x(m.get("x_direct")),
                _x(m.get("x_haproxy")),
                _x(m.get("x_nginx")),
                _x(m.get("cost_x_haproxy")),
                _x(m.get("cost_x_nginx")),
            ],
            strict=True,
        )
    )
    cells.update({h: _extra_cell(kind, m.get(key)) for h, key, kind in scn.extra_columns})
    cells["status"] = status
    return "| " + " | ".join(cells.get(c, "-") for c in columns) + " |\n"


def write_markdown(
    path: Path, doc: dict[str, Any], scenarios: list[Scenario], rows: dict[str, list[Row]]
) -> None:
    mach, ver, args = doc["machine"], doc["versions"], doc["args"]
    out = [
        "# meshproxy benchmark results\n\n",
        f"Run {doc['started']} ({doc['elapsed_s']:.0f} s), `{doc['command']}`.  \n",
        f"Machine: {mach.get('cpus')} x {mach.get('cpu_model')}, {mach.get('mem_gib')} GiB, kernel {mach.get('kernel')}, "
        f"{mach.get('os')}; load average at start {' '.join(mach.get('loadavg_at_start', []))}.  \n",
        f"meshproxy {ver.get('meshproxy')} ({ver.get('meshproxy_git')}; Cython twins built: {ver.get('meshproxy_native')}), "
        f"Python {ver.get('python')}, uvloop {ver.get('uvloop')}; "
        f"HAProxy {ver.get('haproxy')}, nginx {ver.get('nginx')}, iperf3 {ver.get('iperf3')}, wrk {ver.get('wrk')}, "
        f"h2load {ver.get('h2load')}.  \n",
        f"Layout: {'pinned (single-threaded proxies on CPU 0, backends and load on CPU 1, N-worker rows unpinned)' if args.get('pin') else 'unpinned'}; "
        f"N = {args.get('workers')} workers; {args.get('repeat')} run(s) per row (median shown).\n\n",
        "Absolute figures on a shared 2-core machine are noise; compare the ratios within one table. "
        "Columns are explained in bench/README.md.\n",
    ]
    families: dict[str, list[Scenario]] = {}
    for scn in scenarios:
        families.setdefault(scn.family, []).append(scn)
    for family, scns in families.items():
        out.append(f"\n## {family.upper()}\n\n")
        out.extend(
            f"- **{s.name}**: {s.title}; throughput in {s.unit}, proxy CPU cost in {s.cost_unit}.\n"
            for s in scns
        )
        columns = _columns(scns, rows)
        out.append("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
        for scn in scns:
            out.extend(_md_row(scn, r, columns) for r in rows.get(scn.name, []))
        checks = [(scn.name, c) for scn in scns for c in scn.checks]
        if checks:
            out.append("\nRequirement checks:\n\n| scenario | requirement | measured | result |\n")
            out.append("|---|---|---|---|\n")
            out.extend(
                f"| {name} | {c['requirement']} | {c['figure']} | "
                f"{ {True: '**pass**', False: '**FAIL**', None: '-'}[c['pass']] } |\n"
                for name, c in checks
            )
        notes = [
            (f"{scn.name} / {r.label}", n)
            for scn in scns
            for r in rows.get(scn.name, [])
            for n in [
                f"round {f['round']} failed: {f['reason'].splitlines()[0]}" for f in r.failures
            ]
            + r.notes
        ]
        if notes:
            out.append("\nFailures and proxy notes (full log tails in results.json):\n")
            out.extend(f"- {label}: {n}\n" for label, n in notes)
    path.write_text("".join(out))


# --------------------------------------------------------------------------- PNG


def write_png(path: Path, scenarios: list[Scenario], rows: dict[str, list[Row]]) -> str | None:
    """Two bar charts per scenario: throughput / direct, proxy CPU cost / haproxy.
    Returns why no plot was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not importable by this interpreter"
    shown = [s for s in scenarios if any(r.status == "ok" for r in rows.get(s.name, []))]
    if not shown:
        return "no measured rows"
    colors = {"direct": "#7f7f7f", "meshproxy": "#1f77b4", "haproxy": "#ff7f0e", "nginx": "#2ca02c"}
    nrows_max = max(len(rows[s.name]) for s in shown)
    per_line = min(len(shown), PNG_PER_LINE)  # scenarios side by side; more wrap below
    lines = -(-len(shown) // per_line)
    fig, axes = plt.subplots(
        2 * lines,
        per_line,
        figsize=(5.2 * per_line, lines * (1.2 + 0.55 * nrows_max * 2)),
        squeeze=False,
    )
    for j in range(len(shown), lines * per_line):  # empty slots of the last line
        axes[2 * (lines - 1)][j % per_line].set_visible(False)
        axes[2 * (lines - 1) + 1][j % per_line].set_visible(False)
    for i, scn in enumerate(shown):
        line, col = divmod(i, per_line)
        rs = list(reversed(rows[scn.name]))  # first row on top
        labels = [r.label for r in rs]
        cost_key, cost_ref = scn.cost_ref
        top_key, top_abs, top_title = scn.top_chart or (
            "x_direct",
            "throughput",
            f"throughput / direct ({scn.unit})",
        )
        for axrow, (key, ref, title) in enumerate(
            (
                (top_key, "direct", f"{scn.name}\n{top_title}"),
                (
                    cost_key,
                    cost_ref,
                    f"{scn.name}\nproxy CPU cost / {cost_ref} ({scn.cost_unit}, lower is better)",
                ),
            )
        ):
            ax = axes[2 * line + axrow][col]
            vals = [r.metrics.get(key) if r.status == "ok" else None for r in rs]
            ys = range(len(rs))
            ax.barh(
                list(ys), [v or 0 for v in vals], color=[colors.get(r.kind, "#9467bd") for r in rs]
            )
            ax.set_yticks(list(ys), labels, fontsize=9)
            ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_title(title, fontsize=10)
            top = max([v for v in vals if v] or [1.0])
            ax.set_xlim(0, top * 1.35)
            for y, r, v in zip(ys, rs, vals, strict=True):
                if v is not None:
                    absval = r.metrics[top_abs] if axrow == 0 else r.metrics.get("cpu_cost")
                    if axrow == 0 and top_abs != "throughput":
                        fmt = f"{absval:.3f}"
                    elif axrow == 1 or scn.unit == "Gbit/s":
                        fmt = f"{absval:.2f}"
                    else:
                        fmt = f"{absval:,.0f}"
                    ax.text(v, y, f" {v:.2f}x ({fmt})", va="center", fontsize=8)
                else:
                    if r.status != "ok":
                        why = r.status
                    elif r.kind == "direct":
                        why = "no proxy"
                    else:
                        why = f"no {ref} row"
                    ax.text(0.02 * top, y, f" {why}", va="center", fontsize=8, color="#555555")
    fig.suptitle("meshproxy bench (ratios within one run; loopback, shared cores)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
