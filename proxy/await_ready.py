"""`meshproxy await`: wait for the local proxy to be ready, then run a command.

The same job as linkerd-await (linkerd/linkerd-await:src/main.rs), so an app
image can start with ``meshproxy await -- ./app`` and never talk before its
proxy can carry traffic (users.md A9), and a Job can end its pod with
``meshproxy await --shutdown -- ./job`` (users.md A7).

Theory of operation:
1. Poll ``GET http://<admin>/ready`` until it answers 2xx, sleeping ``--backoff``
   after every failure. The admin address is ``--port`` on loopback, else the
   port (and host, unless it is a wildcard) of ``LINKERD2_PROXY_ADMIN_LISTEN_ADDR``,
   else 127.0.0.1:4191. No ``--timeout`` (or ``0``) waits forever, as
   linkerd-await does: kubelet's own probes and deadlines bound a pod anyway.
2. On timeout, print the URL and the timeout and exit 69 (EX_UNAVAILABLE)
   without running the command; ``--timeout-fatal=false`` runs it anyway.
3. Without ``--shutdown`` the command replaces this process (exec), as in
   linkerd-await: signals reach it directly and its exit status is the status.
   With ``--shutdown`` it runs as a child, SIGTERM and SIGINT are forwarded to
   it, and after it exits ``POST /shutdown`` is sent (the proxy must have
   ``LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED=true``); the exit status is the
   child's, or 128 + signal when a signal killed it.
``LINKERD_AWAIT_DISABLED`` or ``LINKERD_DISABLED`` (non-empty) skips the wait,
as in linkerd-await, so one image runs with and without a mesh.
Only the standard library is used: this runs inside application images.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from proxy.config import parse_addr, parse_bool, parse_duration

EX_USAGE = 64  # sysexits.h: bad command line
EX_UNAVAILABLE = 69  # sysexits.h: linkerd-await exits with it when the proxy never got ready
EX_OSERR = 71  # sysexits.h: linkerd-await exits with it when the command cannot be started

DEFAULT_ADMIN_PORT = 4191  # linkerd2-proxy's admin listener (ref 1.1)
DEFAULT_BACKOFF = "1s"  # linkerd-await's default pause after a failed readiness check
REQUEST_TIMEOUT = 5.0  # seconds per HTTP request; linkerd-await bounds each check to 5 s
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what kubelet and a terminal send

PROG = "meshproxy await"


def admin_target(port: int | None, env: Mapping[str, str]) -> tuple[str, int]:
    """Host and port of the admin server: `--port`, else the env address, else 4191.

    A wildcard listen host (0.0.0.0, [::]) is reached on the loopback address of
    the same family; `[::]` listeners accept `::1` whatever IPV6_V6ONLY says.
    """
    host, env_port = "127.0.0.1", DEFAULT_ADMIN_PORT
    raw = env.get("LINKERD2_PROXY_ADMIN_LISTEN_ADDR", "").strip()
    if raw:
        addr = parse_addr(raw)
        host, env_port = addr.host, addr.port
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass  # a name such as localhost: use it as given
        else:
            if ip.is_unspecified:
                host = "::1" if ip.version == 6 else "127.0.0.1"
    return host, port if port is not None else env_port


def url_of(host: str, port: int, path: str) -> str:
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def request(host: str, port: int, method: str, path: str, timeout: float) -> tuple[int, str]:
    """One HTTP/1.1 request; returns (status, body text). Raises OSError on failure."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Content-Length": "0"} if method == "POST" else {})
        response = conn.getresponse()
        return response.status, response.read(4096).decode("utf-8", "replace").strip()
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP response: {exc!r}") from exc
    finally:
        conn.close()


def wait_ready(host: str, port: int, timeout: float | None, backoff: float) -> tuple[bool, str]:
    """Poll /ready until 2xx or the deadline; returns (ready, last failure seen)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = "no attempt"
    while True:
        remaining = REQUEST_TIMEOUT if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            return False, last
        try:
            status, body = request(host, port, "GET", "/ready", min(REQUEST_TIMEOUT, remaining))
            if 200 <= status < 300:
                return True, ""
            last = f"HTTP {status} {body!r}"
        except OSError as exc:  # refused while the proxy starts, timeouts, resets
            last = str(exc) or type(exc).__name__
        pause = backoff if deadline is None else min(backoff, deadline - time.monotonic())
        if pause > 0:
            time.sleep(pause)


def send_shutdown(host: str, port: int) -> bool:
    """Best effort `POST /shutdown`; any failure is reported on stderr."""
    url = url_of(host, port, "/shutdown")
    try:
        status, body = request(host, port, "POST", "/shutdown", REQUEST_TIMEOUT)
    except OSError as exc:
        print(f"{PROG}: POST {url} failed: {exc}", file=sys.stderr)
        return False
    if status != 200:
        hint = ""
        if status == 404:
            hint = " (is LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED=true set on the proxy?)"
        print(f"{PROG}: POST {url} answered HTTP {status} {body!r}{hint}", file=sys.stderr)
        return False
    return True


def exec_command(cmd: Sequence[str]) -> int:
    """Replace this process with the command; returns only if exec failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(cmd[0], list(cmd))
    except OSError as exc:
        print(f"{PROG}: cannot run {cmd[0]!r}: {exc}", file=sys.stderr)
    return EX_OSERR


def run_child(cmd: Sequence[str]) -> int:
    """Run the command as a child, forwarding SIGTERM/SIGINT; return its exit status."""
    try:
        child = subprocess.Popen(list(cmd))
    except OSError as exc:
        print(f"{PROG}: cannot run {cmd[0]!r}: {exc}", file=sys.stderr)
        return EX_OSERR

    def forward(signum: int, _frame: object) -> None:
        # Ctrl-C on a terminal already reached the child through the shared
        # foreground process group; forwarding it again would deliver it twice.
        if signum == signal.SIGINT and in_foreground_group():
            return
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        status = child.wait()  # PEP 475: retried after each handler runs
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


def in_foreground_group() -> bool:
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):  # no terminal, or stdin closed
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Wait until the local proxy's /ready answers 200, then run CMD "
        "(linkerd-await compatible).",
    )
    parser.add_argument("-p", "--port", type=int, help="admin port on loopback (default: the "
                        "port of LINKERD2_PROXY_ADMIN_LISTEN_ADDR, else 4191)")
    parser.add_argument("-t", "--timeout", default="0", help="give up after this long, e.g. 2m, "
                        "30s, 500ms; 0 (the default) waits forever")
    parser.add_argument("--timeout-fatal", nargs="?", const="true", default="true", metavar="BOOL",
                        help="on timeout exit 69 without running CMD (default true)")
    parser.add_argument("-b", "--backoff", default=DEFAULT_BACKOFF,
                        help=f"pause after a failed check (default {DEFAULT_BACKOFF})")
    parser.add_argument("-S", "--shutdown", action="store_true",
                        help="run CMD as a child, then POST /shutdown to the proxy (for Jobs)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        default=bool(os.environ.get("LINKERD_AWAIT_VERBOSE")),
                        help="say so when the wait is skipped by LINKERD_AWAIT_DISABLED")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run (after --)")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    if "--" in argv:  # everything after the first -- is the command, untouched
        split = argv.index("--")
        options, cmd = argv[:split], argv[split + 1:]
    else:
        options, cmd = argv, []
    try:
        args = parser.parse_args(options)
    except SystemExit as exc:  # argparse already printed the problem
        return EX_USAGE if exc.code else 0
    cmd = list(args.cmd) + cmd
    try:
        timeout = parse_duration(args.timeout)
        backoff = parse_duration(args.backoff)
        timeout_fatal = parse_bool(args.timeout_fatal)
        host, port = admin_target(args.port, os.environ)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EX_USAGE
    if args.shutdown and not cmd:
        print(f"{PROG}: --shutdown needs a command to run (after --)", file=sys.stderr)
        return EX_USAGE

    disabled = os.environ.get("LINKERD_AWAIT_DISABLED") or os.environ.get("LINKERD_DISABLED")
    if disabled:
        if args.verbose:
            print(f"{PROG}: readiness check skipped: {disabled}", file=sys.stderr)
    else:
        ready, last = wait_ready(host, port, timeout or None, backoff)
        if not ready:
            print(f"{PROG}: the proxy did not become ready: {url_of(host, port, '/ready')} "
                  f"did not answer 200 within the {args.timeout.strip()} timeout "
                  f"(last attempt: {last})", file=sys.stderr)
            if timeout_fatal:
                return EX_UNAVAILABLE

    if not cmd:
        return 0
    if not args.shutdown:
        return exec_command(cmd)
    status = run_child(cmd)
    if not disabled:
        send_shutdown(host, port)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
