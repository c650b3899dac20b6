"""Processes the harness starts, the ports they listen on, and what they cost.

- ``PortPool`` hands out free loopback ports from a range below the kernel's ephemeral
  range, so a port we picked is not taken by some client's outgoing connection meanwhile.
- ``Proc`` starts one server in its own session and stops it by PID: SIGTERM, a bounded
  wait, then SIGKILL; descendants it leaves behind are killed one by one by PID.
- ``TreeMeter`` samples a process tree from /proc while a load runs: CPU seconds
  (utime+stime of every process in the tree, including ones that appear or exit during the
  window) and peak RSS (sum of the tree's resident sets at one sampling instant).
- ``MachineMeter`` reads /proc/stat: how many cores were busy over the window.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Ports come from below Linux's default ephemeral range (32768-60999): a port picked there
# could be grabbed by an outgoing connection of the load itself between pick and bind.
PORT_RANGE = (20000, 32000)
# How long a server gets to exit after SIGTERM before SIGKILL (meshproxy drains).
STOP_GRACE_S = 5.0
# TreeMeter sampling period: fine enough for peak RSS, cheap enough (one /proc scan costs
# ~1-2 ms of CPU) not to disturb a 2-core machine.
SAMPLE_INTERVAL_S = 0.2


class PortPool:
    """Free TCP ports on 127.0.0.1, never the same one twice in a run."""

    def __init__(self, lo: int = PORT_RANGE[0], hi: int = PORT_RANGE[1]) -> None:
        self._lo, self._hi = lo, hi
        self._given: set[int] = set()

    def take(self) -> int:
        for _ in range(500):
            port = random.randint(self._lo, self._hi)
            if port in self._given or not _bindable(port):
                continue
            self._given.add(port)
            return port
        raise RuntimeError(f"no free port found in {self._lo}-{self._hi}")


def _bindable(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError as e:
            if family == socket.AF_INET6 and e.errno == 99:  # no ::1 on this host
                continue
            return False
    return True


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    start: int  # start time in ticks since boot: tells a reused PID apart
    cpu_ticks: int  # utime + stime
    rss_bytes: int


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    if rest[0] in (b"Z", b"X"):  # zombie/dead: no memory, CPU already final
        return None
    return ProcStat(
        pid=pid,
        ppid=int(rest[1]),
        start=int(rest[19]),
        cpu_ticks=int(rest[11]) + int(rest[12]),
        rss_bytes=int(rest[21]) * PAGE_SIZE,
    )


def all_stats() -> list[ProcStat]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None:
                out.append(st)
    return out


def tree(roots: Sequence[int], stats: list[ProcStat] | None = None) -> list[ProcStat]:
    """The processes ``roots`` and all their descendants, from one /proc scan."""
    stats = all_stats() if stats is None else stats
    by_parent: dict[int, list[ProcStat]] = {}
    by_pid = {}
    for st in stats:
        by_parent.setdefault(st.ppid, []).append(st)
        by_pid[st.pid] = st
    out: list[ProcStat] = []
    todo = [by_pid[p] for p in roots if p in by_pid]
    seen: set[int] = set()
    while todo:
        st = todo.pop()
        if st.pid in seen:
            continue
        seen.add(st.pid)
        out.append(st)
        todo.extend(by_parent.get(st.pid, ()))
    return out


# --------------------------------------------------------------------------- Proc


@dataclass
class Proc:
    """One server process started by the harness, stopped by its PID."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: str | None = None
    cpus: str | None = None  # taskset CPU list, e.g. "0"; None = not pinned
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    exit_code: int | None = None  # after stop(): the code it exited with
    stop_s: float = 0.0  # after stop(): seconds from SIGTERM to exit

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        argv = list(self.argv)
        if self.cpus is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", self.cpus, *argv]  # taskset execs: same PID
        log = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # our Ctrl-C reaches us, not the servers
            )
        finally:
            log.close()
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, wait up to ``grace``, SIGKILL; then kill leftover descendants by PID."""
        if self.popen is None:
            return None
        kids = [(st.pid, st.start) for st in tree([self.popen.pid])[1:]]
        t0 = time.monotonic()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self.stop_s = time.monotonic() - t0
        self.exit_code = self.popen.returncode
        deadline = time.monotonic() + grace
        for pid, start in kids:
            while time.monotonic() < deadline:
                st = read_stat(pid)
                if st is None or st.start != start:
                    break
                time.sleep(0.05)
            st = read_stat(pid)
            if st is not None and st.start == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return self.popen.returncode


# --------------------------------------------------------------------------- readiness


def listening_ports() -> set[int]:
    """Local ports in LISTEN state, from /proc/net/tcp{,6}: probing without connecting
    (a probe connection would look like a test client to iperf3)."""
    ports: set[int] = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def wait_listening(proc: Proc, ports: Sequence[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            tail = proc.log_tail()
            raise RuntimeError(
                f"{proc.name} exited early: {tail.splitlines()[-1] if tail else '(empty log)'}\n{tail}"
            )
        if set(ports) <= listening_ports():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{proc.name} not listening on {list(ports)} after {timeout}s:\n{proc.log_tail()}"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------- meters


@dataclass
class TreeUsage:
    cpu_s: float
    peak_rss_mb: float
    max_procs: int
    wall_s: float


class TreeMeter:
    """CPU seconds and peak RSS of process trees over a window (a background thread)."""

    def __init__(self, roots: Sequence[int], interval: float = SAMPLE_INTERVAL_S) -> None:
        self._roots = list(roots)
        self._interval = interval
        # (pid, start) -> [cpu ticks at first sight, cpu ticks at last sight]
        self._cpu: dict[tuple[int, int], list[int]] = {}
        self._root_of: dict[tuple[int, int], int] = {}  # (pid, start) -> the root it is under
        self._peak_rss = 0
        self._max_procs = 0
        self._first = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-meter", daemon=True)
        self._t0 = 0.0
        self._lock = threading.Lock()

    def _sample(self) -> None:
        stats = all_stats() if self._roots else []
        procs: list[ProcStat] = []
        with self._lock:
            # One /proc scan; each root's tree from it, so CPU can be told per root too
            # (the two proxies of a pair).
            for root in self._roots:
                for st in tree([root], stats):
                    key = (st.pid, st.start)
                    if key in self._root_of:
                        if self._root_of[key] != root:
                            continue  # already counted under another root
                    else:
                        self._root_of[key] = root
                    procs.append(st)
                    seen = self._cpu.get(key)
                    if seen is None:
                        # Present at the first sample: count from now. Born later: its whole
                        # life is inside the window.
                        self._cpu[key] = [st.cpu_ticks if self._first else 0, st.cpu_ticks]
                    else:
                        seen[1] = st.cpu_ticks
            self._first = False
            self._peak_rss = max(self._peak_rss, sum(st.rss_bytes for st in procs))
            self._max_procs = max(self._max_procs, len(procs))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> TreeMeter:
        self._t0 = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._wall = time.monotonic() - self._t0

    def cpu_by_root(self) -> dict[int, float]:
        """CPU seconds of each root's tree over the window."""
        out = dict.fromkeys(self._roots, 0.0)
        for key, (first, last) in self._cpu.items():
            out[self._root_of[key]] += (last - first) / CLK_TCK
        return out

    def usage(self) -> TreeUsage:
        ticks = sum(last - first for first, last in self._cpu.values())
        return TreeUsage(
            cpu_s=ticks / CLK_TCK,
            peak_rss_mb=self._peak_rss / 2**20,
            max_procs=self._max_procs,
            wall_s=self._wall,
        )


def _cpu_totals() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]), idle  # user..steal; guest time is already inside user


class MachineMeter:
    """Busy cores (0..ncpu) over a window, from /proc/stat."""

    def __enter__(self) -> MachineMeter:
        self._start = _cpu_totals()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = _cpu_totals()

    def busy_cores(self) -> float:
        total = self._end[0] - self._start[0]
        idle = self._end[1] - self._start[1]
        ncpu = os.cpu_count() or 1
        return 0.0 if total <= 0 else (total - idle) / total * ncpu


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stop every process in ``procs`` (appended to inside the block too) on the way out."""
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()
