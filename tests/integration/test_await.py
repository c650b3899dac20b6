"""`meshproxy await` against a fake admin server, as real processes.

The fake is a real HTTP server on a free loopback port (in a thread of the test
process): `/ready` answers 503 until `ready_after` seconds have passed, then 200,
and `POST /shutdown` is recorded. The command under test runs as a subprocess,
exactly as an application container would run it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 20  # seconds; every subprocess below is bounded by it
EX_USAGE, EX_UNAVAILABLE = 64, 69

AWAIT = [sys.executable, "-m", "proxy", "await"]  # what `meshproxy await` runs

pytestmark = pytest.mark.timeout(60)


class FakeAdmin:
    """A proxy admin server that becomes ready `ready_after` seconds after start."""

    def __init__(self, ready_after: float = 0.0, shutdown_status: int = 200):
        self.ready_after = ready_after
        self.shutdown_status = shutdown_status
        self.started = time.time()
        self.ready_at: float | None = None  # wall clock of the first 200 on /ready
        self.checks: list[int] = []  # status of every /ready answer, in order
        self.shutdowns: list[float] = []  # wall clock of every POST /shutdown
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/ready":
                    return self.answer(404, "")
                now = time.time()
                if now - fake.started >= fake.ready_after:
                    if fake.ready_at is None:
                        fake.ready_at = now
                    fake.checks.append(200)
                    return self.answer(200, "ready\n")
                fake.checks.append(503)
                self.answer(503, "not ready\n")

            def do_POST(self) -> None:
                if self.path != "/shutdown":
                    return self.answer(404, "")
                fake.shutdowns.append(time.time())
                if fake.shutdown_status == 200:
                    return self.answer(200, "shutdown\n")
                self.answer(fake.shutdown_status, "shutdown endpoint is not enabled\n")

            def answer(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def admin():
    made: list[FakeAdmin] = []

    def make(**kwargs) -> FakeAdmin:
        made.append(FakeAdmin(**kwargs))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LINKERD2_PROXY_ADMIN_LISTEN_ADDR", "LINKERD_AWAIT_DISABLED",
                        "LINKERD_DISABLED", "LINKERD_AWAIT_VERBOSE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_await(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*AWAIT, *args], cwd=REPO, env=env or clean_env(), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)


PRINT_TIME = [sys.executable, "-c", "import time; print(time.time())"]


def test_waits_for_readiness_then_runs_the_command(admin):
    fake = admin(ready_after=2.0)
    started = time.monotonic()
    done = run_await("--port", str(fake.port), "--timeout", "10s", "--", *PRINT_TIME)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started >= 2.0
    assert fake.checks[0] == 503 and fake.checks[-1] == 200
    assert fake.ready_at is not None
    assert float(done.stdout) >= fake.ready_at  # the command ran only after /ready said 200
    assert not fake.shutdowns


def test_timeout_is_a_clear_error_and_the_command_does_not_run(admin, tmp_path):
    fake = admin(ready_after=3600)
    marker = tmp_path / "ran"
    started = time.monotonic()
    done = run_await("--port", str(fake.port), "--timeout", "1s", "--backoff", "100ms",
                     "--", "touch", str(marker))
    elapsed = time.monotonic() - started
    assert done.returncode == EX_UNAVAILABLE
    assert f"http://127.0.0.1:{fake.port}/ready" in done.stderr
    assert "1s timeout" in done.stderr
    assert "HTTP 503" in done.stderr  # the last answer seen is part of the message
    assert not marker.exists()
    assert 1.0 <= elapsed < 5.0
    assert len(fake.checks) >= 3


def test_timeout_fatal_false_runs_the_command_anyway(admin, tmp_path):
    fake = admin(ready_after=3600)
    marker = tmp_path / "ran"
    done = run_await("--port", str(fake.port), "--timeout", "300ms", "--timeout-fatal=false",
                     "--", "touch", str(marker))
    assert done.returncode == 0, done.stderr
    assert "did not become ready" in done.stderr
    assert marker.exists()


def test_connection_refused_is_retried_until_timeout():
    done = run_await("--port", "1", "--timeout", "500ms", "--backoff", "100ms", "--", "true")
    assert done.returncode == EX_UNAVAILABLE
    assert "http://127.0.0.1:1/ready" in done.stderr
    assert "refused" in done.stderr.lower()


@pytest.mark.parametrize("shutdown", [False, True], ids=["exec", "child"])
def test_exit_status_is_the_commands(admin, shutdown):
    fake = admin()
    flags = ["--shutdown"] if shutdown else []
    done = run_await("--port", str(fake.port), *flags, "--", "sh", "-c", "exit 7")
    assert done.returncode == 7, done.stderr


def test_command_without_double_dash(admin):
    fake = admin()
    done = run_await("--port", str(fake.port), "sh", "-c", "exit 5")
    assert done.returncode == 5, done.stderr


def test_shutdown_is_posted_after_the_command(admin):
    fake = admin(ready_after=0.5)
    done = run_await("--port", str(fake.port), "--backoff", "100ms", "--shutdown", "--",
                     *PRINT_TIME)
    assert done.returncode == 0, done.stderr
    assert len(fake.shutdowns) == 1
    assert fake.shutdowns[0] >= float(done.stdout)
    assert done.stderr == ""


def test_shutdown_failure_is_reported_but_keeps_the_status(admin):
    fake = admin(shutdown_status=404)
    done = run_await("--port", str(fake.port), "--shutdown", "--", "sh", "-c", "exit 3")
    assert done.returncode == 3
    assert f"POST http://127.0.0.1:{fake.port}/shutdown" in done.stderr
    assert "404" in done.stderr
    assert "LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED" in done.stderr


def test_killed_by_a_signal_exits_128_plus_signal(admin):
    fake = admin()
    done = run_await("--port", str(fake.port), "--shutdown", "--", "sh", "-c", "kill -KILL $$")
    assert done.returncode == 128 + signal.SIGKILL
    assert len(fake.shutdowns) == 1  # the Job still ends its proxy


def test_sigterm_is_forwarded_to_the_command(admin):
    fake = admin()
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\n"
             "print('started', flush=True)\n"
             "time.sleep(30)\n")
    proc = subprocess.Popen([*AWAIT, "--port", str(fake.port), "--shutdown", "--",
                             sys.executable, "-c", child],
                            cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=RUN_TIMEOUT) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(fake.shutdowns) == 1


def test_no_command_just_waits(admin):
    fake = admin(ready_after=0.5)
    done = run_await("--port", str(fake.port), "--backoff", "100ms")
    assert done.returncode == 0, done.stderr
    assert fake.checks[-1] == 200


@pytest.mark.parametrize("listen", ["0.0.0.0:{port}", "127.0.0.1:{port}"])
def test_admin_address_from_the_environment(admin, listen):
    fake = admin()
    env = clean_env(LINKERD2_PROXY_ADMIN_LISTEN_ADDR=listen.format(port=fake.port))
    done = run_await("--", "true", env=env)
    assert done.returncode == 0, done.stderr
    assert fake.checks == [200]


def test_disabled_skips_the_wait(admin):
    done = run_await("--port", "1", "--verbose", "--", "sh", "-c", "exit 4",
                     env=clean_env(LINKERD_AWAIT_DISABLED="no mesh here"))
    assert done.returncode == 4
    assert "no mesh here" in done.stderr


@pytest.mark.parametrize("args", [["--timeout", "10"], ["--timeout", "1.5s"],
                                  ["--backoff", "soon"], ["--shutdown"]])
def test_bad_arguments_exit_64(args):
    done = run_await("--port", "1", *args)
    assert done.returncode == EX_USAGE
    assert "meshproxy await" in done.stderr
