"""The HTTP access log (LINKERD2_PROXY_ACCESS_LOG=apache|json): one line per inbound request, on stderr.

Off by default (users.md A21); Linkerd writes it for inbound requests only, to stderr, apart
from the diagnostic logs on stdout. Lines are queued and written in batches by the event loop
(call_soon), so a burst of requests costs one write, not one per request.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any


class AccessLog:
    def __init__(self, fmt: str, stream: Any = None) -> None:
        self.fmt = fmt
        self.stream = stream or sys.stderr
        self.pending: list[str] = []

    def record(self, client: str, client_id: str, method: bytes, target: bytes, version: bytes, status: int,
               host: bytes, user_agent: bytes, started: float) -> None:
        now = time.time()
        total_ns = int((time.monotonic() - started) * 1e9)
        if self.fmt == "json":
            line = json.dumps({
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z",
                "client.addr": client, "client.id": client_id or "-", "method": method.decode("latin-1"),
                "uri": target.decode("latin-1"), "version": "HTTP/" + version.decode("latin-1"), "status": status,
                "host": host.decode("latin-1"), "user_agent": user_agent.decode("latin-1"), "total_ns": total_ns,
            })
        else:  # apache common log format, with the client identity as the user
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
            line = (f'{client.rsplit(":", 1)[0]} - {client_id or "-"} [{stamp}] '
                    f'"{method.decode("latin-1")} {target.decode("latin-1")} HTTP/{version.decode("latin-1")}" {status} -')
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(line)

    def flush(self) -> None:
        lines, self.pending = self.pending, []
        if lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
