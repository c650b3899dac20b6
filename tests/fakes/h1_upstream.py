"""A scriptable HTTP/1.1 upstream over plain blocking sockets, and a raw response reader.

    python tests/fakes/h1_upstream.py [--port N]      (prints ``listening <port>``)

Written by hand, not on an HTTP library, so that it sees and sends exactly the
bytes on the wire: it records every request head byte for byte (header name
case, hop-by-hop headers, the request target as sent), and its responses are
fixed bytes (no Date header), so a response fetched directly and one fetched
through the proxy can be compared byte for byte.

What it answers depends on the method and path:

  CONNECT <any>        ``200 Connection established``, then echoes every byte until EOF
  /hash                reads the whole body (content-length or chunked), then 200 with
                       ``sha256=<hex> len=<n> framing=<chunked|length|none>``;
                       with ``Expect: 100-continue`` it first sends ``100 Continue``
  /big                 the 8 MiB ``blob`` with content-length (HEAD: the head only)
  /chunked/<n>         the first n bytes of ``blob``, chunked in 64 KiB chunks
  /close/<n>           the first n bytes of ``blob``, close-delimited (no length)
  /status/<code>       that status; 204 and 304 without a body, others ``status <code>\\n``
  /hang                never answers; notes when the client closes (``Seen.hung_up``)
  /hop                 200 with hop-by-hop headers of its own (``Connection: X-Srv-Drop``,
                       ``X-Srv-Drop: 1``, ``Keep-Alive: timeout=5``) and ``X-Srv-Keep: yes``
  anything else        200 ``<METHOD> <target>\\n``

Every response carries ``X-Reply-CaSe: 2`` (a mixed-case name a proxy must not fold).
The connection is kept alive unless the request asks for close (or is HTTP/1.0
without keep-alive); then the response says ``Connection: close`` and the
server closes after it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 204: b"No Content", 301: b"Moved Permanently",
    304: b"Not Modified", 400: b"Bad Request", 404: b"Not Found", 418: b"I'm a teapot",
    500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
}
BLOB_SIZE = 8 << 20
CHUNK = 64 << 10
MAX_HEAD = 256 << 10  # the fake itself accepts larger heads than the proxy does


class Closed(Exception):
    """The peer closed before the expected bytes arrived."""


class Reader:
    """Buffered reads from a blocking socket: up to a separator, an exact count, or EOF."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 18)
        if not data:
            raise Closed(f"closed with {len(self.buf)} bytes unread")
        self.buf += data

    def until(self, sep: bytes, limit: int = MAX_HEAD) -> bytes:
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                out = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise ValueError("head too large")
            start = max(0, len(self.buf) - len(sep) + 1)
            self._fill()

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def some(self) -> bytes:
        """What is buffered, or else one read (b"" at EOF)."""
        if self.buf:
            out = bytes(self.buf)
            self.buf.clear()
            return out
        return self.sock.recv(1 << 18)

    def to_eof(self) -> bytes:
        out = bytearray(self.buf)
        self.buf.clear()
        while True:
            data = self.sock.recv(1 << 18)
            if not data:
                return bytes(out)
            out += data


def parse_head(raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(first line, [(name, value)]) of a head ending in CRLF CRLF; names keep their case."""
    lines = raw[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return lines[0], headers


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def read_chunked(reader: Reader) -> tuple[bytes, bytes]:
    """(de-framed body, raw bytes as received) of a chunked body, trailers included."""
    body = bytearray()
    raw = bytearray()
    while True:
        line = reader.until(b"\r\n", 4096)
        raw += line
        size = int(line.split(b";", 1)[0].strip(), 16)  # ValueError on a bad size
        if size == 0:
            while True:
                trailer = reader.until(b"\r\n", 64 << 10)
                raw += trailer
                if trailer == b"\r\n":
                    return bytes(body), bytes(raw)
        data = reader.exact(size + 2)
        raw += data
        if data[-2:] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        body += data[:-2]


@dataclass
class Response:
    """One response as a raw reader saw it: ``raw`` is every byte, 1xx heads included;
    ``heads`` the bytes of every head (1xx and final); ``body`` the body, chunked framing removed."""

    raw: bytes
    heads: bytes
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    informational: list[int] = field(default_factory=list)

    def get(self, name: bytes) -> bytes | None:
        return header(self.headers, name.lower())

    def message(self) -> tuple[bytes, bytes]:
        """What must match across hops: every head byte for byte, and the de-framed body
        (a proxy re-chunks as bytes arrive, so chunk sizes may differ)."""
        return self.heads, self.body


def read_response(reader: Reader, method: bytes = b"GET") -> Response:
    """One response (after any 1xx) from ``reader``; the body framed as RFC 9112 6.3 says."""
    raw = bytearray()
    informational = []
    while True:
        head = reader.until(b"\r\n\r\n")
        raw += head
        first, headers = parse_head(head)
        status = int(first.split(b" ", 2)[1])
        if 100 <= status < 200 and status != 101:
            informational.append(status)
            continue
        break
    heads = bytes(raw)
    if method == b"HEAD" or status in (101, 204, 304) or (method == b"CONNECT" and 200 <= status < 300):
        body = b""
    elif (header(headers, b"transfer-encoding") or b"").lower().endswith(b"chunked"):
        body, framed = read_chunked(reader)
        raw += framed
    elif (length := header(headers, b"content-length")) is not None:
        body = reader.exact(int(length))
        raw += body
    else:
        body = reader.to_eof()
        raw += body
    return Response(bytes(raw), heads, status, headers, body, informational)


@dataclass
class Seen:
    """One request as the upstream received it."""

    conn: int  # number of the upstream connection it came on (1, 2, ...)
    head: bytes  # the request head exactly as received
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body_len: int = 0
    body_sha256: str = ""
    framing: str = "none"
    hung_up: float | None = None  # /hang, or a body cut short: when the client closed (time.monotonic())

    def get(self, name: bytes) -> bytes | None:
        return header(self.headers, name.lower())


class H1Upstream:
    """The server; ``requests`` lists what it received, in order."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.blob = os.urandom(BLOB_SIZE)
        self.requests: list[Seen] = []  # complete requests (head and body read)
        self.aborted: list[Seen] = []  # heads whose connection closed before the body was complete
        self.connections = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            for conn in list(self._open):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(60)
        reader = Reader(conn)
        try:
            while self._one(conn, reader, number):
                pass
        except (Closed, ConnectionError, TimeoutError):
            pass  # the client (the proxy) went away: normal for an upstream
        except Exception as exc:  # noqa: BLE001 - surfaced to tests through .errors
            self.errors.append(exc)
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def _one(self, conn: socket.socket, reader: Reader, number: int) -> bool:
        try:
            head = reader.until(b"\r\n\r\n")
        except Closed:
            return False
        first, headers = parse_head(head)
        method, target, version = first.split(b" ", 2)
        seen = Seen(number, head, method, target, version, headers)
        connection = (header(headers, b"connection") or b"").lower()
        keep = b"close" not in connection if version == b"HTTP/1.1" else b"keep-alive" in connection

        if method == b"CONNECT":
            with self._lock:
                self.requests.append(seen)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            while data := reader.some():
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            return False

        path = target
        if path.startswith(b"http://"):
            path = b"/" + path.split(b"/", 3)[3] if path.count(b"/") >= 3 else b"/"
        path = path.split(b"?", 1)[0]

        if path == b"/hash" and (header(headers, b"expect") or b"").lower() == b"100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        te = (header(headers, b"transfer-encoding") or b"").lower()
        try:
            if te.endswith(b"chunked"):
                seen.framing = "chunked"
                body, _ = read_chunked(reader)
            elif (length := header(headers, b"content-length")) is not None:
                seen.framing = "length"
                body = reader.exact(int(length))
            else:
                body = b""
        except Closed:
            seen.hung_up = time.monotonic()
            with self._lock:
                self.aborted.append(seen)
            raise
        seen.body_len = len(body)
        seen.body_sha256 = hashlib.sha256(body).hexdigest()
        with self._lock:
            self.requests.append(seen)

        if path == b"/hang":
            while reader.some():
                pass
            seen.hung_up = time.monotonic()
            return False

        extra: list[tuple[bytes, bytes]] = []
        status = 200
        close_delimited = False
        chunked = False
        if path == b"/hash":
            payload = b"sha256=%s len=%d framing=%s\n" % (seen.body_sha256.encode(), len(body), seen.framing.encode())
        elif path == b"/big":
            payload = self.blob
        elif path.startswith(b"/chunked/"):
            payload = self.blob[: int(path[9:])]
            chunked = True
        elif path.startswith(b"/close/"):
            payload = self.blob[: int(path[7:])]
            close_delimited = True
            keep = False
        elif path == b"/hop":
            payload = b"hop\n"
            extra += [(b"Connection", b"X-Srv-Drop"), (b"X-Srv-Drop", b"1"), (b"Keep-Alive", b"timeout=5"), (b"X-Srv-Keep", b"yes")]
        elif path.startswith(b"/status/"):
            status = int(path[8:])
            payload = b"" if status in (204, 304) else b"status %d\n" % status
            if status == 304:
                extra.append((b"ETag", b'"v1"'))
        else:
            payload = method + b" " + target + b"\n"

        lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Status"))]
        lines.append(b"Content-Type: " + (b"application/octet-stream" if path == b"/big" or b"/chunked/" in path or b"/close/" in path else b"text/plain"))
        lines.append(b"X-Reply-CaSe: 2")
        lines += [n + b": " + v for n, v in extra]
        if chunked:
            lines.append(b"Transfer-Encoding: chunked")
        elif not close_delimited and status not in (204, 304):
            lines.append(b"Content-Length: %d" % len(payload))
        if not keep:
            lines.append(b"Connection: close")
        out = b"\r\n".join(lines) + b"\r\n\r\n"
        if method == b"HEAD" or status in (204, 304):
            conn.sendall(out)
        elif chunked:
            conn.sendall(out)
            for off in range(0, len(payload), CHUNK):
                conn.sendall(b"%x\r\n%s\r\n" % (len(payload[off:off + CHUNK]), payload[off:off + CHUNK]))
            conn.sendall(b"0\r\n\r\n")
        else:
            conn.sendall(out + payload)
        if close_delimited:
            conn.shutdown(socket.SHUT_WR)
        return keep


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = H1Upstream(port=args.port)
    print(f"listening {server.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
