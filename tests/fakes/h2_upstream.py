"""A scriptable HTTP/2 upstream (prior knowledge, cleartext) built on h2.

    python tests/fakes/h2_upstream.py [--port N]

Prints ``listening <port>``. What it does depends on the request path:

  /size/<n>              200 with n bytes (sent as the client's windows allow)
  /echo                  200 with the request body, once the request has ended
  /reset/<code>          RST_STREAM(code) as soon as the request head arrives
  /reset-after/<code>    200 head and 1 KiB of body, then RST_STREAM(code)
  /delay/<ms>            200 "ok" after ms milliseconds
  /hold                  answered (200 "held") only when a /second arrives on the
                         same connection; then GOAWAY(last_stream_id = /hold's
                         stream): /second is never answered
  /conn                  200 "conn=<connection number> stream=<id>"
  /headers               200 with the request head as JSON
  /trailers              200, body "body", trailers x-trailer: yes
  /stall-read            never reads the request body: its stream window is not
                         reopened (the connection window is, as real servers do)
  /die                   closes the connection on the request head
  /die-after-headers     sends a 200 head, then closes the connection
  /stats                 200 with JSON: resets received [path, code], and bytes
                         received on /stall-read streams
  anything else          200 "ok"

A query string (``?...``) is ignored, except that /stats reports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from hyperframe.frame import GoAwayFrame

STATS: dict[str, list] = {"resets": [], "stalled_bytes": [0]}
CONNECTIONS = 0


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        global CONNECTIONS
        CONNECTIONS += 1
        self.number = CONNECTIONS
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport = None
        self.paths: dict[int, str] = {}
        self.heads: dict[int, list] = {}
        self.bodies: dict[int, bytearray] = {}
        self.sending: dict[int, tuple[bytes, list | None]] = {}  # stream -> (body left, trailers)
        self.hold: int | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            self.flush()
            self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self.paths[event.stream_id] = dict(event.headers).get(":path", "/")  # the query is kept for /stats
                self.heads[event.stream_id] = event.headers
                self.bodies[event.stream_id] = bytearray()
                self.on_head(event.stream_id, self.paths[event.stream_id])
            elif isinstance(event, DataReceived):
                if self.paths.get(event.stream_id, "").startswith("/stall-read"):
                    STATS["stalled_bytes"][0] += len(event.data)
                    self.conn.increment_flow_control_window(event.flow_controlled_length)  # connection only
                    continue
                if event.stream_id in self.bodies:
                    self.bodies[event.stream_id] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self.on_end(event.stream_id, self.paths.get(event.stream_id, "/"))
            elif isinstance(event, StreamReset):
                STATS["resets"].append([self.paths.get(event.stream_id, "?"), int(event.error_code)])
                self.sending.pop(event.stream_id, None)
            elif isinstance(event, WindowUpdated):
                self.pump()
            elif isinstance(event, ConnectionTerminated):
                pass
        self.flush()

    def on_head(self, sid: int, path: str) -> None:
        path = path.split("?")[0]
        if path.startswith("/reset/"):
            self.conn.reset_stream(sid, int(path.rsplit("/", 1)[1]))
        elif path.startswith("/reset-after/"):
            self.conn.send_headers(sid, [(":status", "200")])
            self.conn.send_data(sid, b"x" * 1024)
            self.conn.reset_stream(sid, int(path.rsplit("/", 1)[1]))
        elif path == "/die":
            self.transport.abort()
        elif path == "/die-after-headers":
            self.conn.send_headers(sid, [(":status", "200")])
            self.flush()
            self.transport.abort()
        elif path == "/hold":
            self.hold = sid
        elif path == "/second" and self.hold is not None:
            held, self.hold = self.hold, None
            # GOAWAY written by hand: h2's own close_connection() would end its state
            # machine, and a graceful GOAWAY lets streams up to last_stream_id finish.
            self.flush()
            self.transport.write(GoAwayFrame(0, last_stream_id=held).serialize())
            asyncio.get_running_loop().call_later(0.1, self.respond, held, b"held")

    def on_end(self, sid: int, path: str) -> None:
        path = path.split("?")[0]
        if path.startswith(("/reset", "/hold", "/second", "/stall-read", "/die")):
            return
        if path.startswith("/delay/"):
            asyncio.get_running_loop().call_later(int(path.rsplit("/", 1)[1]) / 1000, self.respond, sid, b"ok")
            return
        if path.startswith("/size/"):
            self.respond(sid, os.urandom(16) * (int(path.rsplit("/", 1)[1]) // 16))
        elif path == "/echo":
            self.respond(sid, bytes(self.bodies.get(sid, b"")))
        elif path == "/conn":
            self.respond(sid, f"conn={self.number} stream={sid}".encode())
        elif path == "/headers":
            self.respond(sid, json.dumps(self.heads.get(sid, [])).encode())
        elif path == "/trailers":
            self.respond(sid, b"body", trailers=[("x-trailer", "yes")])
        elif path == "/stats":
            self.respond(sid, json.dumps(STATS).encode())
        else:
            self.respond(sid, b"ok")

    def respond(self, sid: int, body: bytes, trailers: list | None = None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self.conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(body)))], end_stream=not body and not trailers)
        except ProtocolError:
            return
        if body or trailers:
            self.sending[sid] = (body, trailers)
            self.pump()
        self.flush()

    def pump(self) -> None:
        for sid, (body, trailers) in list(self.sending.items()):
            try:
                while body:
                    n = min(len(body), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                    if n <= 0:
                        break
                    self.conn.send_data(sid, body[:n], end_stream=(n == len(body) and trailers is None))
                    body = body[n:]
                if body:
                    self.sending[sid] = (body, trailers)
                    continue
                if trailers is not None:
                    self.conn.send_headers(sid, trailers, end_stream=True)
            except ProtocolError:
                pass
            self.sending.pop(sid, None)
        self.flush()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", args.port)
    print("listening", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
