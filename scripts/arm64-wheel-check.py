"""Checks for scripts/arm64-wheel.sh (standard library only, any Python >= 3.8).

  arm64-wheel-check.py wheel WHEEL   (on the host) the file name carries an aarch64
      platform tag, it has proxy/_native/relay*.so, and that and every other .so in it
      is a 64-bit little-endian ELF for AArch64 (e_machine 183), read from the ELF header.
  arm64-wheel-check.py smoke         (inside the arm64 chroot, with the venv's python)
      platform.machine() is aarch64, proxy.transport.relay.IMPLEMENTATION is "cython";
      then `python -m proxy run` on free 127.0.0.1 ports (identity disabled) answers
      GET /ready 200, relays bytes through its outbound listener to an echo server
      (MESHPROXY_OUTBOUND_FALLBACK_ADDR) and exits 0 on SIGTERM. Every wait is bounded
      (under qemu-user everything is ~5-10x slower than native).
  arm64-wheel-check.py reqs PYPROJECT [build|run|all]  (on the host, Python >= 3.11)
      print the build requirements and/or the runtime dependencies, one per line.
Exit status 0 on success, 1 with a message on stderr otherwise.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile

EM_AARCH64 = 183


def fail(msg: str) -> None:
    print(f"check: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check_wheel(path: str) -> None:
    name = os.path.basename(path)
    if not re.search(r"-(linux_aarch64|manylinux[0-9_a-z]*aarch64)\.whl$", name):
        fail(f"{name}: the platform tag is not linux_aarch64 / manylinux*_aarch64")
    with zipfile.ZipFile(path) as zf:
        sos = [n for n in zf.namelist() if n.endswith(".so")]  # every extension, relay first of all
        if not any(re.fullmatch(r"proxy/_native/relay[^/]*\.so", n) for n in sos):
            fail(f"{name} has no proxy/_native/relay*.so: the Cython extension was not built "
                 f"(setup.py makes it optional; see the build log)")
        for so in sos:
            head = zf.read(so)[:20]
            if head[:4] != b"\x7fELF":
                fail(f"{so} is not an ELF file")
            ei_class, ei_data = head[4], head[5]
            if ei_class != 2 or ei_data != 1:
                fail(f"{so}: ELF class {ei_class} / data {ei_data}, not 64-bit little-endian")
            (machine,) = struct.unpack_from("<H", head, 18)
            if machine != EM_AARCH64:
                fail(f"{so}: ELF e_machine {machine}, not AArch64 ({EM_AARCH64})")
            print(f"check: {so}: ELF64 LSB, e_machine {machine} (AArch64)")
    print(f"check: {name}: aarch64 wheel with the compiled relay")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def echo_server() -> int:
    """Echo every byte back; answer the client's half-close with our own FIN."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def relay(port: int, size: int, timeout: float) -> None:
    payload = os.urandom(size)
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        def send() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while chunk := s.recv(65536):
            received += chunk
        sender.join(timeout)
    if hashlib.sha256(received).digest() != hashlib.sha256(payload).digest():
        fail(f"relay: sent {len(payload)} bytes, got back {len(received)} different ones")


def smoke() -> None:
    import platform
    import urllib.request

    t0 = time.monotonic()
    step_start = t0

    def ok(what: str) -> None:
        nonlocal step_start
        now = time.monotonic()
        print(f"check: {what} ({now - step_start:.1f} s)", flush=True)
        step_start = now

    import proxy._native.relay as native
    import proxy.transport.relay as r

    machine = platform.machine()
    if machine != "aarch64":
        fail(f"platform.machine() is {machine!r}, not 'aarch64'")
    if r.IMPLEMENTATION != "cython":
        fail(f"proxy.transport.relay.IMPLEMENTATION is {r.IMPLEMENTATION!r}, not 'cython'")
    compiled = sorted(p.name for p in __import__("pathlib").Path(native.__file__).parent.glob("*.so"))
    ok(f"{machine} {r.IMPLEMENTATION} {native.__file__}; compiled: {' '.join(compiled)}")

    echo = echo_server()
    admin, outbound, inbound, control = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINKERD2_PROXY_", "MESHPROXY_"))}
    env.update(
        MESHPROXY_IDENTITY_DISABLED="true",
        LINKERD2_PROXY_ADMIN_LISTEN_ADDR=f"127.0.0.1:{admin}",
        LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR=f"127.0.0.1:{outbound}",
        LINKERD2_PROXY_INBOUND_LISTEN_ADDR=f"127.0.0.1:{inbound}",
        LINKERD2_PROXY_CONTROL_LISTEN_ADDR=f"127.0.0.1:{control}",
        MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{echo}",
        LINKERD2_PROXY_CORES="1",
        LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD="10s",
        PYTHONUNBUFFERED="1",
    )
    log_path = os.environ.get("SMOKE_LOG", "/tmp/meshproxy-smoke.log")
    log = open(log_path, "wb")
    # A session of its own, so that its workers can be killed with it if anything fails.
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def show_log() -> None:
        log.flush()
        with open(log_path, "rb") as f:
            tail = f.read().decode(errors="replace").splitlines()[-30:]
        print("--- proxy log (last 30 lines)", *tail, sep="\n", file=sys.stderr)

    try:
        ready_timeout = float(os.environ.get("SMOKE_READY_TIMEOUT", "120"))
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                show_log()
                fail(f"`python -m proxy run` exited with status {proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                show_log()
                fail(f"GET /ready did not answer 200 within {ready_timeout:.0f} s")
            time.sleep(0.2)
        ok(f"python -m proxy run: GET http://127.0.0.1:{admin}/ready = 200")

        size = 256 * 1024
        relay(outbound, size, timeout=30)
        ok(f"relayed {size} bytes through outbound :{outbound} to echo :{echo} and back")

        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            show_log()
            fail("the proxy did not exit within 30 s of SIGTERM")
        if code != 0:
            show_log()
            fail(f"the proxy exited with status {code} after SIGTERM")
        ok("SIGTERM: exit status 0")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        else:
            try:  # workers left behind by a supervisor that died
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
    print(f"check: smoke passed in {time.monotonic() - t0:.1f} s")


def reqs(pyproject: str, which: str) -> None:
    import tomllib

    with open(pyproject, "rb") as f:
        data = tomllib.load(f)
    build = data.get("build-system", {}).get("requires", [])
    run = data.get("project", {}).get("dependencies", [])
    for req in {"build": build, "run": run, "all": build + run}[which]:
        print(req)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "wheel":
        check_wheel(sys.argv[2])
    elif len(sys.argv) in (3, 4) and sys.argv[1] == "reqs" and sys.argv[3:] in ([], ["build"], ["run"], ["all"]):
        reqs(sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else "all")
    elif len(sys.argv) == 2 and sys.argv[1] == "smoke":
        smoke()
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(64)


if __name__ == "__main__":
    main()
