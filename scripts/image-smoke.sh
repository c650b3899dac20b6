#!/usr/bin/env bash
# Smoke test of a built meshproxy image, on this machine, on loopback only:
#   - the container (host network, free loopback ports, read-only root filesystem
#     as Linkerd's injector sets it) reports /ready 200;
#   - it runs as uid 2102 and its relay is the compiled Cython twin;
#   - `meshproxy await` and Linkerd's postStart hook (/usr/lib/linkerd/linkerd-await)
#     find the admin port;
#   - 1 MiB of random bytes sent to the outbound port comes back unchanged from an
#     echo server on the host (MESHPROXY_OUTBOUND_FALLBACK_ADDR), half-close included;
#   - SIGTERM (podman stop) ends PID 1 with exit status 0;
#   - the same with 2 workers (LINKERD2_PROXY_CORES=2).
# Every wait is bounded. Prints the time of each step.
#
# Usage: scripts/image-smoke.sh [IMAGE]   (default localhost/meshproxy:amd64)
# Needs root (or rootless podman), podman, runc and python3 on the host.
set -euo pipefail

IMAGE="${1:-localhost/meshproxy:amd64}"
PODMAN=(podman --runtime runc)
ULIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
PY=python3
containers=()
echo_pid=""
workdir=$(mktemp -d)

cleanup() {
  local c
  for c in "${containers[@]}"; do "${PODMAN[@]}" rm -f -t 2 "$c" >/dev/null 2>&1 || true; done
  if [ -n "$echo_pid" ]; then kill "$echo_pid" 2>/dev/null || true; fi
  rm -rf "$workdir"
}
trap cleanup EXIT

t0=$(date +%s.%N)
step_start=$t0
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }
step() { step_start=$(date +%s.%N); printf '== %s\n' "$*"; }
ok() { printf '   ok (%s s)%s\n' "$(since "$step_start")" "${1:+: $1}"; }
fail() {
  local c
  printf 'FAIL: %s\n' "$*" >&2
  for c in "${containers[@]}"; do
    echo "--- log of ${c:0:12} (last 40 lines)" >&2
    "${PODMAN[@]}" logs --tail 40 "$c" >&2 || true
  done
  exit 1
}

# Free loopback ports: admin, outbound, inbound for two containers, and the echo server.
read -r ADMIN OUTBOUND INBOUND ADMIN2 OUTBOUND2 INBOUND2 ECHO < <(
  $PY -c '
import socket
socks = [socket.socket() for _ in range(7)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))'
)

cat >"$workdir/echo.py" <<'PYEOF'
"""Echo every byte back; answer the client's half-close with our own FIN."""
import socket, sys, threading

def serve(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
PYEOF

cat >"$workdir/ready.py" <<'PYEOF'
"""ready.py ADMIN_PORT CONTAINER: exit 0 once /ready is 200 (30 s at most), 1 if the container exits."""
import subprocess, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/ready"
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    state = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", sys.argv[2]],
                           capture_output=True, text=True).stdout.strip()
    if state != "true":
        print(f"container is not running ({state or 'gone'})", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.1)
sys.exit(1)
PYEOF

cat >"$workdir/relay.py" <<'PYEOF'
"""relay.py PORT: 1 MiB of random bytes through PORT (to the echo server) must come back unchanged."""
import hashlib, os, socket, sys, threading
payload = os.urandom(1 << 20)
received = bytearray()
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20) as s:
    def send():
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # the echo server answers our FIN with its own
    sender = threading.Thread(target=send)
    sender.start()
    while chunk := s.recv(65536):
        received += chunk
    sender.join(20)
if hashlib.sha256(received).digest() != hashlib.sha256(payload).digest():
    print(f"sent {len(payload)} bytes, got back {len(received)} different ones", file=sys.stderr)
    sys.exit(1)
PYEOF

$PY "$workdir/echo.py" "$ECHO" &
echo_pid=$!

# An arm64 image on an amd64 host runs under qemu-user (binfmt_misc); naming its
# architecture keeps podman from warning about the mismatch.
ARCH=$("${PODMAN[@]}" image inspect --format '{{.Architecture}}' "$IMAGE") || fail "no image $IMAGE"

# A file identity made by the image's own `meshproxy identity` commands (SPEC 6): the proxy is
# ready only once it has loaded it.
IDENTITY_NAME=smoke.default.serviceaccount.identity.linkerd.cluster.local
mkdir -p "$workdir/id" && chmod 777 "$workdir/id"
for args in "init --dir /id/ca" "issue --dir /id/ca --name $IDENTITY_NAME --out /id/leaf"; do
  # shellcheck disable=SC2086
  "${PODMAN[@]}" run --rm --pull=never --arch "$ARCH" --network=none "${ULIMITS[@]}" -v "$workdir/id:/id" \
    --entrypoint /opt/meshproxy/bin/meshproxy "$IMAGE" identity $args >/dev/null || fail "meshproxy identity $args failed in the image"
done
[ -s "$workdir/id/leaf/roots.pem" ] || fail "meshproxy identity issue wrote no roots.pem"
IDENTITY_ENV=(
  -v "$workdir/id:/id:ro"
  -e MESHPROXY_IDENTITY_CERT_FILE=/id/leaf/cert.pem
  -e MESHPROXY_IDENTITY_KEY_FILE=/id/leaf/key.pem
  -e LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS="$(cat "$workdir/id/leaf/roots.pem")"
  -e LINKERD2_PROXY_IDENTITY_LOCAL_NAME=$IDENTITY_NAME
)

# start_proxy ADMIN OUTBOUND INBOUND [podman run options...]: prints the container id.
# --read-only without tmpfs mounts, as Linkerd's injector sets readOnlyRootFilesystem.
start_proxy() {
  local admin=$1 outbound=$2 inbound=$3
  shift 3
  "${PODMAN[@]}" run -d --pull=never --arch "$ARCH" --network=host "${ULIMITS[@]}" \
    --read-only --read-only-tmpfs=false \
    -e LINKERD2_PROXY_ADMIN_LISTEN_ADDR="127.0.0.1:$admin" \
    -e LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR="127.0.0.1:$outbound" \
    -e LINKERD2_PROXY_INBOUND_LISTEN_ADDR="127.0.0.1:$inbound" \
    -e MESHPROXY_OUTBOUND_FALLBACK_ADDR="127.0.0.1:$ECHO" \
    "${IDENTITY_ENV[@]}" \
    -e LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD=10s \
    "$@" "$IMAGE"
}

# stop_proxy CID: SIGTERM to PID 1 (SIGKILL after 15 s); its exit status must be 0.
stop_proxy() {
  local code
  "${PODMAN[@]}" stop -t 15 "$1" >/dev/null || fail "podman stop failed"
  code=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$1")
  [ "$code" = 0 ] || fail "the proxy exited with status $code after SIGTERM"
}

step "start $IMAGE ($ARCH; admin 127.0.0.1:$ADMIN, outbound :$OUTBOUND, inbound :$INBOUND, echo :$ECHO)"
cid=$(start_proxy "$ADMIN" "$OUTBOUND" "$INBOUND") || fail "podman run failed"
containers+=("$cid")
ok "container ${cid:0:12}"

step "wait for GET /ready = 200 (at most 30 s)"
$PY "$workdir/ready.py" "$ADMIN" "$cid" || fail "/ready never answered 200"
ok "ready $(since "$t0") s after start"

step "runs as uid 2102"
uid=$("${PODMAN[@]}" exec "$cid" id -u) || fail "podman exec id failed"
[ "$uid" = 2102 ] || fail "container runs as uid $uid"
ok

step "compiled relay"
impl=$("${PODMAN[@]}" exec "$cid" /opt/meshproxy/bin/python -c \
  'import proxy.transport.relay as r; print(r.IMPLEMENTATION)' 2>/dev/null) || impl=""
if [ -n "$impl" ]; then
  [ "$impl" = cython ] || fail "proxy.transport.relay.IMPLEMENTATION is '$impl', not 'cython'"
  ok "IMPLEMENTATION=$impl"
else
  # No IMPLEMENTATION attribute: at least an extension must be installed.
  so=$("${PODMAN[@]}" exec "$cid" /opt/meshproxy/bin/python -c '
import pathlib, proxy
print(*sorted(p.name for p in pathlib.Path(proxy.__file__).parent.rglob("*.so")))') ||
    fail "cannot import proxy in the image"
  [ -n "$so" ] || fail "no compiled extension (.so) under the installed proxy package"
  ok "no IMPLEMENTATION attribute; extensions present: $so"
fi

step "meshproxy await inside the container (admin address from the environment)"
"${PODMAN[@]}" exec "$cid" /opt/meshproxy/bin/meshproxy await --timeout 5s -- true ||
  fail "meshproxy await failed in the container"
ok

step "Linkerd's postStart hook: /usr/lib/linkerd/linkerd-await --timeout=2m --port=ADMIN"
"${PODMAN[@]}" exec "$cid" /usr/lib/linkerd/linkerd-await --timeout=2m "--port=$ADMIN" ||
  fail "/usr/lib/linkerd/linkerd-await failed in the container"
ok

step "relay 1 MiB through the outbound port to the echo server"
$PY "$workdir/relay.py" "$OUTBOUND" || fail "relay through the outbound port failed"
ok "1048576 bytes back unchanged"

step "SIGTERM to PID 1 (podman stop, 15 s before SIGKILL)"
stop_proxy "$cid"
ok "exit status 0"

step "2 workers (LINKERD2_PROXY_CORES=2), read-only root: ready, relaying, clean stop"
cid2=$(start_proxy "$ADMIN2" "$OUTBOUND2" "$INBOUND2" -e LINKERD2_PROXY_CORES=2) || fail "podman run failed"
containers+=("$cid2")
$PY "$workdir/ready.py" "$ADMIN2" "$cid2" || fail "/ready never answered 200 with 2 workers"
$PY "$workdir/relay.py" "$OUTBOUND2" || fail "relay with 2 workers failed"
stop_proxy "$cid2"
ok

echo "PASS $IMAGE in $(since "$t0") s"
